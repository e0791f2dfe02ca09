//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`,
//! keyed with the webhook's secret. GitHub signs no timestamp, so a captured
//! delivery stays valid: the idempotency record is what stops its replay.
//! <https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries>

use std::time::SystemTime;

use http::request::Parts;

use super::{
    decode_signature, header, verify_mac, Algorithm, Encoding, InvalidSignatureConfig, Secrets, SignatureError,
    VerifySignature,
};

const SIGNATURE: &str = "x-hub-signature-256";

/// Verifies GitHub's `X-Hub-Signature-256` header (the legacy SHA-1
/// `X-Hub-Signature` is not accepted).
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::GitHubSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signature = GitHubSignature::new("It's a Secret to Everybody")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::github().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct GitHubSignature {
    secrets: Secrets,
}

impl GitHubSignature {
    /// Verifies with this webhook secret. An empty secret is refused.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(secret.as_ref(), "GitHub")?,
        })
    }

    /// Accepts another secret as well (rotation).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(secret.as_ref(), "GitHub")?;
        Ok(self)
    }
}

impl VerifySignature for GitHubSignature {
    fn verify(&self, parts: &Parts, body: &[u8], _now: SystemTime) -> Result<(), SignatureError> {
        let value = header(parts, SIGNATURE)?;
        let digest = decode_signature(value, "sha256=", Encoding::Hex, "X-Hub-Signature-256")?;
        verify_mac(Algorithm::Sha256, &self.secrets, &[body], &[digest])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    fn verify(secret: &str, signature: &str, body: &str) -> Result<(), SignatureError> {
        let github = GitHubSignature::new(secret).unwrap();
        verdict(&github, &[("X-Hub-Signature-256", signature)], body, 0)
    }

    // GitHub docs, "Validating webhook deliveries", section "Testing the
    // webhook payload validation".
    const DOCS_SECRET: &str = "It's a Secret to Everybody";
    const DOCS_PAYLOAD: &str = "Hello, World!";
    const DOCS_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    // octokit/webhooks-methods.js test/verify.test.ts: secret "mysecret",
    // payload JSON.stringify({foo: "bar"}, null, 2) + "\n".
    const OCTOKIT_PAYLOAD: &str = "{\n  \"foo\": \"bar\"\n}\n";
    const OCTOKIT_SIGNATURE: &str = "sha256=e3eccac34c43c7dc1cbb905488b1b81347fcc700a7b025697a9d07862256023f";

    #[test]
    fn accepts_the_documented_vector() {
        assert_eq!(verify(DOCS_SECRET, DOCS_SIGNATURE, DOCS_PAYLOAD), Ok(()));
    }

    #[test]
    fn accepts_the_octokit_vector() {
        assert_eq!(verify("mysecret", OCTOKIT_SIGNATURE, OCTOKIT_PAYLOAD), Ok(()));
    }

    #[test]
    fn accepts_any_configured_secret() {
        let rotated = GitHubSignature::new("new").unwrap().secret(DOCS_SECRET).unwrap();
        let header = [("X-Hub-Signature-256", DOCS_SIGNATURE)];
        assert_eq!(verdict(&rotated, &header, DOCS_PAYLOAD, 0), Ok(()));
    }

    #[test]
    fn refuses_a_tampered_body_or_a_wrong_secret() {
        assert_eq!(
            verify(DOCS_SECRET, DOCS_SIGNATURE, "Hello, World?"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("foo", DOCS_SIGNATURE, DOCS_PAYLOAD),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        let github = GitHubSignature::new(DOCS_SECRET).unwrap();
        assert_eq!(
            verdict(&github, &[], DOCS_PAYLOAD, 0),
            Err(SignatureError::Missing("x-hub-signature-256"))
        );
        for signature in [
            "",
            "foo",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha256=xxxccac34c43c7dc1cbb905488b1b81347fcc700a7b025697a9d07862256023f",
        ] {
            assert!(
                matches!(
                    verify(DOCS_SECRET, signature, DOCS_PAYLOAD),
                    Err(SignatureError::Malformed(_))
                ),
                "{signature:?}"
            );
        }
        // A truncated signature is a mismatch, never a prefix match.
        assert_eq!(
            verify(DOCS_SECRET, "sha256=757107ea0eb2509f", DOCS_PAYLOAD),
            Err(SignatureError::Mismatch)
        );
    }
}
