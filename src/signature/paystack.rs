//! Paystack: `x-paystack-signature: <hex HMAC-SHA512 of the raw body>`,
//! keyed with the account's secret API key (`sk_live_...`/`sk_test_...`).
//! No timestamp is signed. Paystack's own sample hashes the re-serialised
//! JSON; this verifies the raw body as received, which is what was signed.
//! <https://paystack.com/docs/payments/webhooks/>

use std::time::SystemTime;

use http::request::Parts;

use super::{
    decode_signature, header, verify_mac, Algorithm, Encoding, InvalidSignatureConfig, Secrets, SignatureError,
    VerifySignature,
};

const SIGNATURE: &str = "x-paystack-signature";

/// Verifies Paystack's `x-paystack-signature` header.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::PaystackSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signature = PaystackSignature::new("sk_live_...")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::paystack().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PaystackSignature {
    secrets: Secrets,
}

impl PaystackSignature {
    /// Verifies with this secret key. An empty key is refused.
    pub fn new(secret_key: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(secret_key.as_ref(), "Paystack")?,
        })
    }

    /// Accepts another secret key as well (rotation).
    pub fn secret(mut self, secret_key: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(secret_key.as_ref(), "Paystack")?;
        Ok(self)
    }
}

impl VerifySignature for PaystackSignature {
    fn verify(&self, parts: &Parts, body: &[u8], _now: SystemTime) -> Result<(), SignatureError> {
        let digest = decode_signature(header(parts, SIGNATURE)?, "", Encoding::Hex, "x-paystack-signature")?;
        verify_mac(Algorithm::Sha512, &self.secrets, &[body], &[digest])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    // Paystack publishes no test vector. The body is cut down from the
    // `charge.success` sample in Paystack's webhook docs; the key is made
    // up. The signature was computed independently with
    // `printf '%s' "$BODY" | openssl dgst -sha512 -hmac "$KEY"` and
    // checked with Python's hmac module.
    const KEY: &str = "sk_test_5f3c7a0b9c1d2e4f60718293a4b5c6d7e8f90a1b";
    const BODY: &str = r#"{"event":"charge.success","data":{"id":302961,"domain":"live","status":"success","reference":"qTPrJoy9Bx","amount":10000}}"#;
    const SIGNATURE: &str = "6f92847f98d1a14693f82e99fe3e116ac95e56cfc66219fce3150b7e02f3378e8b2ec06cba1d21c505a81ed18cf25aea6fa221019d99447180dae4a7e6f90643";

    fn verify(key: &str, headers: &[(&str, &str)], body: &str) -> Result<(), SignatureError> {
        verdict(&PaystackSignature::new(key).unwrap(), headers, body, 0)
    }

    #[test]
    fn accepts_the_vector() {
        assert_eq!(verify(KEY, &[("x-paystack-signature", SIGNATURE)], BODY), Ok(()));
    }

    #[test]
    fn accepts_any_configured_key() {
        let rotated = PaystackSignature::new("sk_test_new").unwrap().secret(KEY).unwrap();
        assert_eq!(
            verdict(&rotated, &[("x-paystack-signature", SIGNATURE)], BODY, 0),
            Ok(())
        );
    }

    #[test]
    fn refuses_a_tampered_body_or_a_wrong_key() {
        let header = [("x-paystack-signature", SIGNATURE)];
        assert_eq!(
            verify(KEY, &header, &BODY.replace("10000", "1000000")),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify("sk_test_other", &header, BODY), Err(SignatureError::Mismatch));
        // The same bytes re-serialised with other whitespace were not signed.
        let reformatted = BODY.replace(",\"", ", \"");
        assert_eq!(verify(KEY, &header, &reformatted), Err(SignatureError::Mismatch));
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        assert_eq!(
            verify(KEY, &[], BODY),
            Err(SignatureError::Missing("x-paystack-signature"))
        );
        assert!(matches!(
            verify(KEY, &[("x-paystack-signature", "sha512=abc")], BODY),
            Err(SignatureError::Malformed(_))
        ));
        // A SHA-256-sized digest can never match a SHA-512 MAC.
        assert_eq!(
            verify(KEY, &[("x-paystack-signature", &SIGNATURE[..64])], BODY),
            Err(SignatureError::Mismatch)
        );
    }
}
