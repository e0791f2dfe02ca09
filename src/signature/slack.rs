//! Slack: `X-Slack-Signature: v0=<hex HMAC-SHA256>`, the HMAC of
//! `"v0:{X-Slack-Request-Timestamp}:{raw body}"` keyed with the app's
//! signing secret; requests more than five minutes off are refused.
//! <https://docs.slack.dev/authentication/verifying-requests-from-slack/>

use std::time::{Duration, SystemTime};

use http::request::Parts;

use super::{
    check_timestamp, decode_signature, header, parse_timestamp, verify_mac, Algorithm, Encoding,
    InvalidSignatureConfig, Secrets, SignatureError, VerifySignature, DEFAULT_SIGNATURE_TOLERANCE,
};

const SIGNATURE: &str = "x-slack-signature";
const TIMESTAMP: &str = "x-slack-request-timestamp";

/// Verifies Slack's `X-Slack-Signature` and `X-Slack-Request-Timestamp`
/// headers, for the Events API, slash commands and interactivity alike.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::SlackSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signature = SlackSignature::new("8f742231b10e8888abcd99yyyzzz85a5")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::slack().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SlackSignature {
    secrets: Secrets,
    tolerance: Duration,
}

impl SlackSignature {
    /// Verifies with this signing secret. An empty secret is refused.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(secret.as_ref(), "Slack")?,
            tolerance: DEFAULT_SIGNATURE_TOLERANCE,
        })
    }

    /// Accepts another secret as well (rotation).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(secret.as_ref(), "Slack")?;
        Ok(self)
    }

    /// How far the signed timestamp may be from now (default five minutes).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }
}

impl VerifySignature for SlackSignature {
    fn verify(&self, parts: &Parts, body: &[u8], now: SystemTime) -> Result<(), SignatureError> {
        let timestamp = header(parts, TIMESTAMP)?;
        let signature = header(parts, SIGNATURE)?;
        let seconds = parse_timestamp(timestamp)?;
        let digest = decode_signature(signature, "v0=", Encoding::Hex, "X-Slack-Signature")?;
        let message: [&[u8]; 4] = [b"v0:", timestamp.as_bytes(), b":", body];
        verify_mac(Algorithm::Sha256, &self.secrets, &message, &[digest])?;
        check_timestamp(seconds, now, self.tolerance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::verdict;

    // Slack's "Verifying requests from Slack" walkthrough, also the fixture
    // of slackapi/python-slack-sdk tests/slack_sdk/signature/
    // test_signature_verifier.py.
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const T: u64 = 1_531_420_618;
    const SIGNATURE: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    fn verify(secret: &str, headers: &[(&str, &str)], body: &str, now: u64) -> Result<(), SignatureError> {
        verdict(&SlackSignature::new(secret).unwrap(), headers, body, now)
    }

    fn signed() -> [(&'static str, &'static str); 2] {
        [
            ("X-Slack-Request-Timestamp", "1531420618"),
            ("X-Slack-Signature", SIGNATURE),
        ]
    }

    #[test]
    fn accepts_the_vector() {
        assert_eq!(verify(SECRET, &signed(), BODY, T), Ok(()));
    }

    #[test]
    fn accepts_any_configured_secret() {
        let rotated = SlackSignature::new("new").unwrap().secret(SECRET).unwrap();
        assert_eq!(verdict(&rotated, &signed(), BODY, T), Ok(()));
    }

    #[test]
    fn refuses_a_tampered_body_or_a_wrong_secret() {
        let tampered = format!("{BODY}------");
        assert_eq!(verify(SECRET, &signed(), &tampered, T), Err(SignatureError::Mismatch));
        assert_eq!(verify("other", &signed(), BODY, T), Err(SignatureError::Mismatch));
    }

    #[test]
    fn refuses_stale_and_future_timestamps() {
        assert_eq!(verify(SECRET, &signed(), BODY, T + 300), Ok(()));
        assert_eq!(verify(SECRET, &signed(), BODY, T + 301), Err(SignatureError::Stale));
        assert_eq!(verify(SECRET, &signed(), BODY, T - 301), Err(SignatureError::Stale));
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        assert_eq!(
            verify(SECRET, &[("X-Slack-Signature", SIGNATURE)], BODY, T),
            Err(SignatureError::Missing("x-slack-request-timestamp"))
        );
        assert_eq!(
            verify(SECRET, &[("X-Slack-Request-Timestamp", "1531420618")], BODY, T),
            Err(SignatureError::Missing("x-slack-signature"))
        );
        for (timestamp, signature) in [
            ("soon", SIGNATURE),
            (
                "1531420618",
                "a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
            (
                "1531420618",
                "v1=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
            ("1531420618", "v0=not-hex"),
        ] {
            let headers = [
                ("X-Slack-Request-Timestamp", timestamp),
                ("X-Slack-Signature", signature),
            ];
            assert!(
                matches!(verify(SECRET, &headers, BODY, T), Err(SignatureError::Malformed(_))),
                "{timestamp} {signature}"
            );
        }
    }
}
