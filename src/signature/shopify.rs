//! Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the raw body>`,
//! keyed with the app's client secret (`Shopify-Hmac-Sha256` on Events
//! deliveries). No timestamp is signed. After a secret is rotated Shopify
//! may sign with the old one for up to an hour, so configure both.
//! <https://shopify.dev/docs/apps/build/webhooks/verify-deliveries>

use std::time::SystemTime;

use http::request::Parts;

use super::{
    alternative_header, decode_signature, header, verify_mac, Algorithm, Encoding, InvalidSignatureConfig, Secrets,
    SignatureError, VerifySignature,
};

const SIGNATURE: &str = "x-shopify-hmac-sha256";
const EVENTS_SIGNATURE: &str = "shopify-hmac-sha256";

/// Verifies Shopify's `X-Shopify-Hmac-Sha256` header.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::ShopifySignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signature = ShopifySignature::new("client-secret")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::shopify().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ShopifySignature {
    secrets: Secrets,
}

impl ShopifySignature {
    /// Verifies with this client secret. An empty secret is refused.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(secret.as_ref(), "Shopify")?,
        })
    }

    /// Accepts another secret as well (rotation).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(secret.as_ref(), "Shopify")?;
        Ok(self)
    }
}

impl VerifySignature for ShopifySignature {
    fn verify(&self, parts: &Parts, body: &[u8], _now: SystemTime) -> Result<(), SignatureError> {
        let value = match header(parts, SIGNATURE) {
            Err(SignatureError::Missing(_)) => alternative_header(parts, EVENTS_SIGNATURE, SIGNATURE)?,
            other => other?,
        };
        let digest = decode_signature(value, "", Encoding::Base64, "the Shopify HMAC header")?;
        verify_mac(Algorithm::Sha256, &self.secrets, &[body], &[digest])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    // Shopify/shopify-app-js, packages/apps/shopify-api/lib/webhooks/__tests__/
    // validate.test.ts ("returns true for valid request"): apiSecretKey
    // "test_secret_key" (lib/__tests__/test-config.ts), raw body
    // `{"foo": "bar"}`, hmac B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=.
    const SECRET: &str = "test_secret_key";
    const BODY: &str = r#"{"foo": "bar"}"#;
    const HMAC: &str = "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=";

    fn verify(secret: &str, headers: &[(&str, &str)], body: &str) -> Result<(), SignatureError> {
        verdict(&ShopifySignature::new(secret).unwrap(), headers, body, 0)
    }

    #[test]
    fn accepts_the_vector() {
        assert_eq!(verify(SECRET, &[("X-Shopify-Hmac-Sha256", HMAC)], BODY), Ok(()));
    }

    #[test]
    fn accepts_the_events_header_name() {
        assert_eq!(verify(SECRET, &[("Shopify-Hmac-Sha256", HMAC)], BODY), Ok(()));
    }

    #[test]
    fn accepts_any_configured_secret() {
        let rotated = ShopifySignature::new("new").unwrap().secret(SECRET).unwrap();
        assert_eq!(verdict(&rotated, &[("X-Shopify-Hmac-Sha256", HMAC)], BODY, 0), Ok(()));
    }

    #[test]
    fn refuses_a_tampered_body_or_a_wrong_secret() {
        let header = [("X-Shopify-Hmac-Sha256", HMAC)];
        assert_eq!(
            verify(SECRET, &header, r#"{"foo": "baz"}"#),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify("wrong", &header, BODY), Err(SignatureError::Mismatch));
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        assert_eq!(
            verify(SECRET, &[], BODY),
            Err(SignatureError::Missing("x-shopify-hmac-sha256"))
        );
        assert!(matches!(
            verify(SECRET, &[("X-Shopify-Hmac-Sha256", "not base64!")], BODY),
            Err(SignatureError::Malformed(_))
        ));
        // The same digest in hex, where base64 is expected, is a mismatch.
        let hex = "076ded5cdebcd60674a8858d46b82dcc113d5d20e8e72694bbac1f9a1bb76bb8";
        assert_eq!(
            verify(SECRET, &[("X-Shopify-Hmac-Sha256", hex)], BODY),
            Err(SignatureError::Mismatch)
        );
    }
}
