//! Flutterwave: `flutterwave-signature: <base64 HMAC-SHA256 of the raw
//! body>`, keyed with the "secret hash" set on the dashboard's webhook
//! settings. The older v3 `verif-hash` header carries the secret hash
//! itself: it proves the sender knows the secret but protects nothing of the
//! body, and anyone who once saw it can forge any event, so it is accepted
//! only when enabled with [`FlutterwaveSignature::accept_verif_hash`].
//! Neither signs a timestamp.
//! <https://developer.flutterwave.com/docs/webhooks>

use std::time::SystemTime;

use http::request::Parts;
use subtle::ConstantTimeEq;

use super::{
    alternative_header, decode_signature, header, mismatch_unless, verify_mac, Algorithm, Encoding,
    InvalidSignatureConfig, Secrets, SignatureError, VerifySignature,
};

const SIGNATURE: &str = "flutterwave-signature";
const VERIF_HASH: &str = "verif-hash";

/// Verifies Flutterwave's `flutterwave-signature` header, and optionally
/// the legacy `verif-hash`.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::FlutterwaveSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signature = FlutterwaveSignature::new("my-secret-hash")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::flutterwave().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct FlutterwaveSignature {
    secrets: Secrets,
    verif_hash: bool,
}

impl FlutterwaveSignature {
    /// Verifies with this secret hash. An empty one is refused.
    pub fn new(secret_hash: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(secret_hash.as_ref(), "Flutterwave")?,
            verif_hash: false,
        })
    }

    /// Accepts another secret hash as well (rotation).
    pub fn secret(mut self, secret_hash: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(secret_hash.as_ref(), "Flutterwave")?;
        Ok(self)
    }

    /// Whether a request without `flutterwave-signature` may instead carry
    /// the legacy v3 `verif-hash` header, compared (in constant time) with
    /// the secret hash (default `false`). It does not cover the body.
    pub fn accept_verif_hash(mut self, accept: bool) -> Self {
        self.verif_hash = accept;
        self
    }
}

impl VerifySignature for FlutterwaveSignature {
    fn verify(&self, parts: &Parts, body: &[u8], _now: SystemTime) -> Result<(), SignatureError> {
        let signature = match header(parts, SIGNATURE) {
            Err(SignatureError::Missing(_)) if self.verif_hash => return self.verify_hash(parts),
            other => other?,
        };
        let digest = decode_signature(signature, "", Encoding::Base64, "flutterwave-signature")?;
        verify_mac(Algorithm::Sha256, &self.secrets, &[body], &[digest])
    }
}

impl FlutterwaveSignature {
    fn verify_hash(&self, parts: &Parts) -> Result<(), SignatureError> {
        let sent = alternative_header(parts, VERIF_HASH, SIGNATURE)?;
        let mut matched = false;
        for secret in self.secrets.iter() {
            matched |= bool::from(secret.ct_eq(sent.as_bytes()));
        }
        mismatch_unless(matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    // Flutterwave publishes no test vector. The body is shaped like the
    // `charge.completed` sample in Flutterwave's webhook docs; the secret
    // hash is made up. The signature was computed independently with
    // `printf '%s' "$BODY" | openssl dgst -sha256 -hmac "$HASH" -binary | base64`
    // and checked with Python's hmac module.
    const HASH: &str = "my-secret-hash";
    const BODY: &str = r#"{"event":"charge.completed","data":{"id":285959875,"tx_ref":"Links-616626414629","flw_ref":"PeterEkene/FLW270177170","amount":100,"currency":"NGN","status":"successful"}}"#;
    const SIGNATURE: &str = "0r8zqSHZGi/xpy2V1I7jIzd83L3XtVTei9iJSYArS40=";

    fn verify(verifier: &FlutterwaveSignature, headers: &[(&str, &str)], body: &str) -> Result<(), SignatureError> {
        verdict(verifier, headers, body, 0)
    }

    fn flutterwave() -> FlutterwaveSignature {
        FlutterwaveSignature::new(HASH).unwrap()
    }

    #[test]
    fn accepts_the_vector() {
        assert_eq!(
            verify(&flutterwave(), &[("flutterwave-signature", SIGNATURE)], BODY),
            Ok(())
        );
    }

    #[test]
    fn accepts_any_configured_secret_hash() {
        let rotated = FlutterwaveSignature::new("new").unwrap().secret(HASH).unwrap();
        assert_eq!(verify(&rotated, &[("flutterwave-signature", SIGNATURE)], BODY), Ok(()));
    }

    #[test]
    fn refuses_a_tampered_body_or_a_wrong_secret_hash() {
        let header = [("flutterwave-signature", SIGNATURE)];
        assert_eq!(
            verify(&flutterwave(), &header, &BODY.replace("100,", "100000,")),
            Err(SignatureError::Mismatch)
        );
        let other = FlutterwaveSignature::new("other").unwrap();
        assert_eq!(verify(&other, &header, BODY), Err(SignatureError::Mismatch));
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        assert_eq!(
            verify(&flutterwave(), &[], BODY),
            Err(SignatureError::Missing("flutterwave-signature"))
        );
        assert!(matches!(
            verify(&flutterwave(), &[("flutterwave-signature", "%%%")], BODY),
            Err(SignatureError::Malformed(_))
        ));
        // The secret hash itself in the signature header is no signature.
        assert_eq!(
            verify(&flutterwave(), &[("flutterwave-signature", HASH)], BODY),
            Err(SignatureError::Malformed("flutterwave-signature is not base64".into()))
        );
    }

    #[test]
    fn verif_hash_is_refused_unless_enabled() {
        assert_eq!(
            verify(&flutterwave(), &[("verif-hash", HASH)], BODY),
            Err(SignatureError::Missing("flutterwave-signature"))
        );
        let legacy = flutterwave().accept_verif_hash(true);
        assert_eq!(verify(&legacy, &[("verif-hash", HASH)], BODY), Ok(()));
        assert_eq!(
            verify(&legacy, &[("verif-hash", "my-secret-has")], BODY),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&legacy, &[], BODY),
            Err(SignatureError::Missing("flutterwave-signature"))
        );
        // A present signature is always checked, even with the legacy path on.
        assert_eq!(
            verify(
                &legacy,
                &[("flutterwave-signature", SIGNATURE), ("verif-hash", "wrong")],
                "{}"
            ),
            Err(SignatureError::Mismatch)
        );
    }
}
