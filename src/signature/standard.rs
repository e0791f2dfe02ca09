//! Standard Webhooks (and Svix, which uses the same scheme under `svix-*`
//! header names): `webhook-signature` holds a space-separated list of
//! `v1,<base64 HMAC-SHA256>` entries, the HMAC of
//! `"{webhook-id}.{webhook-timestamp}.{raw body}"` keyed with the base64
//! decoding of the secret (`whsec_...`, prefix optional). Several entries
//! appear while a secret is rotated; `v1a` (ed25519) entries are ignored.
//! <https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::request::Parts;

use super::{
    check_timestamp, decode_base64, header, parse_timestamp, verify_mac, Algorithm, InvalidSignatureConfig, Secrets,
    SignatureError, VerifySignature, DEFAULT_SIGNATURE_TOLERANCE,
};

/// The three headers a sender uses: the standard's or Svix's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Headers {
    id: &'static str,
    timestamp: &'static str,
    signature: &'static str,
}

const STANDARD: Headers = Headers {
    id: "webhook-id",
    timestamp: "webhook-timestamp",
    signature: "webhook-signature",
};

const SVIX: Headers = Headers {
    id: "svix-id",
    timestamp: "svix-timestamp",
    signature: "svix-signature",
};

/// Verifies Standard Webhooks signatures (`webhook-id`,
/// `webhook-timestamp`, `webhook-signature`), or Svix's (`svix-*`) with
/// [`StandardWebhooksSignature::svix`].
///
/// The secret is the base64 key, with or without its `whsec_` prefix. The
/// timestamp must be within the tolerance (default five minutes) of the
/// receiver's clock, in the past or the future.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::StandardWebhooksSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signature = StandardWebhooksSignature::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000))
///     .preset(Preset::standard_webhooks().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct StandardWebhooksSignature {
    secrets: Secrets,
    tolerance: Duration,
    headers: Headers,
}

impl StandardWebhooksSignature {
    /// Verifies the `webhook-*` headers with this secret. A secret that is
    /// empty, not base64, or an asymmetric key (`whsk_`, `whpk_`) is
    /// refused.
    pub fn new(secret: &str) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(&decode_secret(secret)?, "Standard Webhooks")?,
            tolerance: DEFAULT_SIGNATURE_TOLERANCE,
            headers: STANDARD,
        })
    }

    /// Verifies Svix's `svix-id`, `svix-timestamp` and `svix-signature`
    /// headers with this secret.
    pub fn svix(secret: &str) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            headers: SVIX,
            ..Self::new(secret)?
        })
    }

    /// Accepts another secret as well (rotation).
    pub fn secret(mut self, secret: &str) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(&decode_secret(secret)?, "Standard Webhooks")?;
        Ok(self)
    }

    /// How far the signed timestamp may be from now (default five minutes).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }
}

fn decode_secret(secret: &str) -> Result<Vec<u8>, InvalidSignatureConfig> {
    let secret = secret.trim();
    if secret.starts_with("whsk_") || secret.starts_with("whpk_") {
        return Err(InvalidSignatureConfig(
            "asymmetric (ed25519) Standard Webhooks keys are not supported; use a `whsec_` secret".into(),
        ));
    }
    let key = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| InvalidSignatureConfig("the Standard Webhooks secret is not base64 (after `whsec_`)".into()))
}

impl VerifySignature for StandardWebhooksSignature {
    fn verify(&self, parts: &Parts, body: &[u8], now: SystemTime) -> Result<(), SignatureError> {
        let id = header(parts, self.headers.id)?;
        let timestamp = header(parts, self.headers.timestamp)?;
        let listed = header(parts, self.headers.signature)?;
        let seconds = parse_timestamp(timestamp)?;
        let signatures: Vec<Vec<u8>> = listed
            .split_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(decode_base64)
            .collect();
        if signatures.is_empty() {
            return Err(SignatureError::Malformed(format!(
                "`{}` lists no readable v1 signature",
                self.headers.signature
            )));
        }
        let message: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        verify_mac(Algorithm::Sha256, &self.secrets, &message, &signatures)?;
        check_timestamp(seconds, now, self.tolerance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    // standard-webhooks/standard-webhooks, libraries/javascript/src/
    // webhook.test.ts, "sign function works" (the same vector is in the
    // Svix documentation and the other language libraries' tests).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const T: u64 = 1_614_265_330;
    const PAYLOAD: &str = r#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    // From the same file's "multi sig payload is valid".
    const OTHER: &str = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";

    fn headers(signature: &str) -> Vec<(&'static str, String)> {
        vec![
            ("webhook-id", ID.to_owned()),
            ("webhook-timestamp", T.to_string()),
            ("webhook-signature", signature.to_owned()),
        ]
    }

    fn verify_with(
        verifier: &StandardWebhooksSignature,
        headers: &[(&str, String)],
        body: &str,
        now: u64,
    ) -> Result<(), SignatureError> {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        verdict(verifier, &headers, body, now)
    }

    fn verify(headers: &[(&str, String)], body: &str, now: u64) -> Result<(), SignatureError> {
        verify_with(&StandardWebhooksSignature::new(SECRET).unwrap(), headers, body, now)
    }

    #[test]
    fn accepts_the_vector() {
        assert_eq!(verify(&headers(SIGNATURE), PAYLOAD, T), Ok(()));
    }

    #[test]
    fn accepts_the_secret_with_or_without_its_prefix() {
        let bare = StandardWebhooksSignature::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(verify_with(&bare, &headers(SIGNATURE), PAYLOAD, T), Ok(()));
    }

    #[test]
    fn accepts_a_list_of_several_signatures() {
        let listed = format!("{OTHER} v2,{} {SIGNATURE} v1a,abc {OTHER}", &OTHER[3..]);
        assert_eq!(verify(&headers(&listed), PAYLOAD, T), Ok(()));
    }

    #[test]
    fn accepts_any_configured_secret() {
        let rotated = StandardWebhooksSignature::new("whsec_c2VjcmV0")
            .unwrap()
            .secret(SECRET)
            .unwrap();
        assert_eq!(verify_with(&rotated, &headers(SIGNATURE), PAYLOAD, T), Ok(()));
    }

    #[test]
    fn svix_reads_the_svix_headers() {
        let svix = StandardWebhooksSignature::svix(SECRET).unwrap();
        let renamed: Vec<(&str, String)> = headers(SIGNATURE)
            .into_iter()
            .map(|(name, value)| (name.replacen("webhook-", "svix-", 1).leak() as &str, value))
            .collect();
        assert_eq!(verify_with(&svix, &renamed, PAYLOAD, T), Ok(()));
        assert_eq!(
            verify_with(&svix, &headers(SIGNATURE), PAYLOAD, T),
            Err(SignatureError::Missing("svix-id"))
        );
    }

    #[test]
    fn refuses_a_tampered_body_id_or_timestamp() {
        assert_eq!(
            verify(&headers(SIGNATURE), r#"{"test": 2432232315}"#, T),
            Err(SignatureError::Mismatch)
        );
        let mut other_id = headers(SIGNATURE);
        other_id[0].1 = "msg_other".into();
        assert_eq!(verify(&other_id, PAYLOAD, T), Err(SignatureError::Mismatch));
        let mut other_time = headers(SIGNATURE);
        other_time[1].1 = (T + 1).to_string();
        assert_eq!(verify(&other_time, PAYLOAD, T), Err(SignatureError::Mismatch));
    }

    #[test]
    fn refuses_a_wrong_secret() {
        let other = StandardWebhooksSignature::new("whsec_c2VjcmV0").unwrap();
        assert_eq!(
            verify_with(&other, &headers(SIGNATURE), PAYLOAD, T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_stale_and_future_timestamps() {
        assert_eq!(verify(&headers(SIGNATURE), PAYLOAD, T - 300), Ok(()));
        assert_eq!(
            verify(&headers(SIGNATURE), PAYLOAD, T + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&headers(SIGNATURE), PAYLOAD, T - 301),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let headers: Vec<_> = headers(SIGNATURE).into_iter().filter(|(n, _)| *n != missing).collect();
            assert!(
                matches!(verify(&headers, PAYLOAD, T), Err(SignatureError::Missing(name)) if name == missing),
                "{missing}"
            );
        }
        let mut bad_time = headers(SIGNATURE);
        bad_time[1].1 = "hello".into();
        assert!(matches!(
            verify(&bad_time, PAYLOAD, T),
            Err(SignatureError::Malformed(_))
        ));
        for signature in [
            "",
            "v1,",
            "v1,dawfeoifkpqwoekfpqoekf",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v2,abcd",
        ] {
            assert!(
                matches!(
                    verify(&headers(signature), PAYLOAD, T),
                    Err(SignatureError::Malformed(_))
                ),
                "{signature:?}"
            );
        }
        // Truncated: readable base64, but not the whole MAC.
        assert_eq!(
            verify(&headers("v1,g0hM9SsE"), PAYLOAD, T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_unusable_secrets() {
        for secret in ["", "whsec_", "whsec_not base64!", "whsk_abc", "whpk_abc"] {
            assert!(StandardWebhooksSignature::new(secret).is_err(), "{secret:?}");
        }
    }
}
