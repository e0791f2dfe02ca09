//! Signature verification: proof that a webhook comes from its provider,
//! checked on the raw body before any key is read or claimed, so that a
//! forged request can never claim a genuine event's id first.

use std::fmt;
use std::time::SystemTime;

use http::request::Parts;

/// Checks a request's signature. A route verifies with
/// [`IdempotencyLayer::verify_signature`](crate::IdempotencyLayer::verify_signature);
/// a refused request gets `401` problem+json and leaves no trace in the
/// store.
///
/// ```
/// use std::time::SystemTime;
/// use http::request::Parts;
/// use tower_idempotency::{SignatureError, VerifySignature};
///
/// /// Accepts requests that carry a shared token (for illustration only:
/// /// real schemes sign the body).
/// #[derive(Debug)]
/// struct SharedToken(String);
///
/// impl VerifySignature for SharedToken {
///     fn verify(&self, parts: &Parts, _body: &[u8], _now: SystemTime) -> Result<(), SignatureError> {
///         let sent = parts.headers.get("x-token").ok_or(SignatureError::Missing("x-token"))?;
///         if sent.as_bytes() == self.0.as_bytes() { Ok(()) } else { Err(SignatureError::Mismatch) }
///     }
/// }
/// # let _ = SharedToken("t".into());
/// ```
pub trait VerifySignature: fmt::Debug + Send + Sync + 'static {
    /// `Ok` when the request is authentic: `body` is the raw body as
    /// received, `now` the time to judge signed timestamps by.
    fn verify(&self, parts: &Parts, body: &[u8], now: SystemTime) -> Result<(), SignatureError>;
}

/// Why a signature was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// A header the scheme needs is absent.
    #[error("the `{0}` header is missing")]
    Missing(&'static str),
    /// A header is present but cannot be parsed.
    #[error("the signature is malformed: {0}")]
    Malformed(String),
    /// The signed timestamp is outside the scheme's tolerance.
    #[error("the signature timestamp is too old or too far in the future")]
    Stale,
    /// No signature matches any configured secret.
    #[error("no signature matches")]
    Mismatch,
}
