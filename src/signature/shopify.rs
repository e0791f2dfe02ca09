//! Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the raw body>`,
//! keyed with the app's client secret (`Shopify-Hmac-Sha256` on Events
//! deliveries). No timestamp is signed. After a secret is rotated Shopify
//! may sign with the old one for up to an hour, so configure both.
//! <https://shopify.dev/docs/apps/build/webhooks/verify-deliveries>

use std::time::SystemTime;

use http::request::Parts;

use super::{
    any_matches, decode_base64, header, Algorithm, InvalidSignatureConfig, Secrets, SignatureError, VerifySignature,
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
            Err(SignatureError::Missing(_)) => header(parts, EVENTS_SIGNATURE).map_err(|error| match error {
                SignatureError::Missing(_) => SignatureError::Missing(SIGNATURE),
                other => other,
            })?,
            other => other?,
        };
        let digest = decode_base64(value)
            .ok_or_else(|| SignatureError::Malformed("the Shopify HMAC header is not base64".into()))?;
        if any_matches(Algorithm::Sha256, &self.secrets, &[body], &[digest]) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::{at, parts};

    // Shopify/shopify-app-js, packages/apps/shopify-api/lib/webhooks/__tests__/
    // validate.test.ts ("returns true for valid request"): apiSecretKey
    // "test_secret_key" (lib/__tests__/test-config.ts), raw body
    // `{"foo": "bar"}`, hmac B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=.
    const SECRET: &str = "test_secret_key";
    const BODY: &str = r#"{"foo": "bar"}"#;
    const HMAC: &str = "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=";

    fn verify(secret: &str, headers: &[(&str, &str)], body: &str) -> Result<(), SignatureError> {
        ShopifySignature::new(secret)
            .unwrap()
            .verify(&parts("/", headers), body.as_bytes(), at(0))
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
        let request = parts("/", &[("X-Shopify-Hmac-Sha256", HMAC)]);
        assert_eq!(rotated.verify(&request, BODY.as_bytes(), at(0)), Ok(()));
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
