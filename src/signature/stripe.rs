//! Stripe: `Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`, the
//! HMAC of `"{t}.{raw body}"` keyed with the endpoint's signing secret
//! (`whsec_...`, used as it is). The header may carry several `v1` entries
//! while Stripe rolls a secret; `v0` and other schemes are ignored.
//! <https://docs.stripe.com/webhooks#verify-manually>

use std::time::{Duration, SystemTime};

use http::request::Parts;

use super::{
    check_timestamp, header, parse_timestamp, verify_mac, Algorithm, InvalidSignatureConfig, Secrets, SignatureError,
    VerifySignature, DEFAULT_SIGNATURE_TOLERANCE,
};

const SIGNATURE: &str = "stripe-signature";

/// Verifies Stripe's `Stripe-Signature` header.
///
/// The timestamp must be within the tolerance (default five minutes) of the
/// receiver's clock, in the past or the future.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::StripeSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // While rotating, accept the old and the new secret.
/// let signature = StripeSignature::new("whsec_old")?.secret("whsec_new")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::stripe().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct StripeSignature {
    secrets: Secrets,
    tolerance: Duration,
}

impl StripeSignature {
    /// Verifies with this endpoint signing secret. An empty secret is
    /// refused.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(secret.as_ref(), "Stripe")?,
            tolerance: DEFAULT_SIGNATURE_TOLERANCE,
        })
    }

    /// Accepts another secret as well (rotation).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(secret.as_ref(), "Stripe")?;
        Ok(self)
    }

    /// How far the signed timestamp may be from now (default five minutes).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }
}

impl VerifySignature for StripeSignature {
    fn verify(&self, parts: &Parts, body: &[u8], now: SystemTime) -> Result<(), SignatureError> {
        let value = header(parts, SIGNATURE)?;
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for item in value.split(',') {
            let Some((name, value)) = item.trim().split_once('=') else {
                return Err(SignatureError::Malformed(format!(
                    "`{item}` in Stripe-Signature is not name=value"
                )));
            };
            match name {
                "t" if timestamp.is_some() => {
                    return Err(SignatureError::Malformed("Stripe-Signature has two timestamps".into()))
                }
                "t" => timestamp = Some(value),
                // An unreadable entry is skipped: another may match.
                "v1" => signatures.extend(hex::decode(value).ok().filter(|bytes| !bytes.is_empty())),
                _ => {}
            }
        }
        let timestamp =
            timestamp.ok_or_else(|| SignatureError::Malformed("Stripe-Signature has no timestamp".into()))?;
        let seconds = parse_timestamp(timestamp)?;
        if signatures.is_empty() {
            return Err(SignatureError::Malformed(
                "Stripe-Signature has no readable v1 signature".into(),
            ));
        }
        let message: [&[u8]; 3] = [timestamp.as_bytes(), b".", body];
        verify_mac(Algorithm::Sha256, &self.secrets, &message, &signatures)?;
        check_timestamp(seconds, now, self.tolerance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    // Stripe's SDKs compute their test signatures at run time, so there is no
    // published fixed vector. The secret and payload are stripe-python's
    // (tests/test_webhook.py: DUMMY_WEBHOOK_SECRET, DUMMY_WEBHOOK_PAYLOAD);
    // the signature for t=1700000000 was computed independently with
    // Python's hmac module and checked with
    // `printf '1700000000.<payload>' | openssl dgst -sha256 -hmac whsec_test_secret`.
    const SECRET: &str = "whsec_test_secret";
    const PAYLOAD: &str = "{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\",\n  \"data\": { \"object\": { \"id\": \"rdr_123\", \"object\": \"terminal.reader\" } }\n}";
    const T: u64 = 1_700_000_000;
    const V1: &str = "3bfab77baf5f7b6991a46c9b53b6547d7afc56148b10468fcad9f35c1992ffbd";

    fn verify(signature: &StripeSignature, header: &str, body: &str, now: u64) -> Result<(), SignatureError> {
        verdict(signature, &[("Stripe-Signature", header)], body, now)
    }

    fn stripe() -> StripeSignature {
        StripeSignature::new(SECRET).unwrap()
    }

    #[test]
    fn accepts_the_vector() {
        assert_eq!(verify(&stripe(), &format!("t={T},v1={V1}"), PAYLOAD, T), Ok(()));
    }

    #[test]
    fn accepts_a_header_listing_several_signatures_and_schemes() {
        // The shape of the example in Stripe's docs: t, v1, then v0.
        let header = format!("t={T},v1={},v1=not-hex,v1={V1},v0={}", "ab".repeat(32), "cd".repeat(32));
        assert_eq!(verify(&stripe(), &header, PAYLOAD, T), Ok(()));
    }

    #[test]
    fn accepts_any_configured_secret() {
        let rotated = StripeSignature::new("whsec_new").unwrap().secret(SECRET).unwrap();
        assert_eq!(verify(&rotated, &format!("t={T},v1={V1}"), PAYLOAD, T), Ok(()));
    }

    #[test]
    fn refuses_a_tampered_body() {
        let tampered = PAYLOAD.replace("rdr_123", "rdr_124");
        assert_eq!(
            verify(&stripe(), &format!("t={T},v1={V1}"), &tampered, T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_a_wrong_secret() {
        let other = StripeSignature::new("whsec_other").unwrap();
        assert_eq!(
            verify(&other, &format!("t={T},v1={V1}"), PAYLOAD, T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_a_changed_timestamp() {
        assert_eq!(
            verify(&stripe(), &format!("t={},v1={V1}", T + 1), PAYLOAD, T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_stale_and_future_timestamps() {
        let header = format!("t={T},v1={V1}");
        assert_eq!(verify(&stripe(), &header, PAYLOAD, T + 300), Ok(()));
        assert_eq!(verify(&stripe(), &header, PAYLOAD, T + 301), Err(SignatureError::Stale));
        assert_eq!(verify(&stripe(), &header, PAYLOAD, T - 301), Err(SignatureError::Stale));
        let lenient = stripe().tolerance(Duration::from_secs(3600));
        assert_eq!(verify(&lenient, &header, PAYLOAD, T + 3600), Ok(()));
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        assert_eq!(
            verdict(&stripe(), &[], PAYLOAD, T),
            Err(SignatureError::Missing("stripe-signature"))
        );
        for header in [
            "",
            "bad_header",
            &format!("v1={V1}"),
            &format!("t=,v1={V1}"),
            &format!("t=abc,v1={V1}"),
            &format!("t={T},t={T},v1={V1}"),
            &format!("t={T}"),
            &format!("t={T},v0={V1}"),
            &format!("t={T},v1=zz"),
            &format!("t={T},v1="),
        ] {
            assert!(
                matches!(verify(&stripe(), header, PAYLOAD, T), Err(SignatureError::Malformed(_))),
                "{header:?}"
            );
        }
    }

    #[test]
    fn refuses_an_empty_secret() {
        assert!(StripeSignature::new("").is_err());
    }
}
