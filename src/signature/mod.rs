//! Signature verification: proof that a webhook comes from its provider,
//! checked on the raw body before any key is read or claimed, so that a
//! forged request can never claim a genuine event's id first.
//!
//! One file per provider scheme; each verifier holds one or more secrets
//! (several at once while a secret is rotated) and compares in constant
//! time. The helpers below are what the schemes share.

mod flutterwave;
mod github;
mod paystack;
mod shopify;
mod slack;
mod standard;
mod stripe;
mod twilio;

use std::fmt;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use http::request::Parts;
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;

pub use flutterwave::FlutterwaveSignature;
pub use github::GitHubSignature;
pub use paystack::PaystackSignature;
pub use shopify::ShopifySignature;
pub use slack::SlackSignature;
pub use standard::StandardWebhooksSignature;
pub use stripe::StripeSignature;
pub use twilio::TwilioSignature;

/// How far a signed timestamp may be from the receiver's clock, in either
/// direction, for the schemes that sign one (Stripe, Standard Webhooks,
/// Svix, Slack): five minutes, as each of them documents.
pub const DEFAULT_SIGNATURE_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Checks a request's signature. A route verifies with
/// [`IdempotencyLayer::verify_signature`](crate::IdempotencyLayer::verify_signature);
/// a refused request gets `401` problem+json and leaves no trace in the
/// store.
///
/// ```
/// use std::time::SystemTime;
/// use http::request::Parts;
/// use tower_idempotency::signature::{SignatureError, VerifySignature};
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

/// A signature verifier's configuration that cannot work: an empty or
/// undecodable secret, or a base URL that is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid signature configuration: {0}")]
pub struct InvalidSignatureConfig(pub(crate) String);

/// The secrets a verifier accepts, oldest first. Never printed.
#[derive(Clone, Default)]
pub(crate) struct Secrets(Vec<Vec<u8>>);

impl Secrets {
    /// One secret used as its bytes; an empty one is refused, since an
    /// empty HMAC key is no secret at all.
    pub(crate) fn first(secret: &[u8], scheme: &str) -> Result<Self, InvalidSignatureConfig> {
        Self::default().with(secret, scheme)
    }

    pub(crate) fn with(mut self, secret: &[u8], scheme: &str) -> Result<Self, InvalidSignatureConfig> {
        if secret.iter().all(u8::is_ascii_whitespace) {
            return Err(InvalidSignatureConfig(format!("the {scheme} secret is empty")));
        }
        self.0.push(secret.to_vec());
        Ok(self)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(Vec::as_slice)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} redacted]", self.0.len())
    }
}

/// `Ok` when a comparison matched, [`SignatureError::Mismatch`] otherwise.
pub(crate) fn mismatch_unless(matched: bool) -> Result<(), SignatureError> {
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The HMAC hash functions the providers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

/// The HMAC of the concatenated `message` parts under `key`.
pub(crate) fn hmac(algorithm: Algorithm, key: &[u8], message: &[&[u8]]) -> Vec<u8> {
    fn run<M: Mac + KeyInit>(key: &[u8], message: &[&[u8]]) -> Vec<u8> {
        // HMAC takes keys of any length: this cannot fail.
        let Ok(mut mac) = <M as KeyInit>::new_from_slice(key) else {
            return Vec::new();
        };
        for part in message {
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    }
    match algorithm {
        Algorithm::Sha1 => run::<Hmac<Sha1>>(key, message),
        Algorithm::Sha256 => run::<Hmac<Sha256>>(key, message),
        Algorithm::Sha512 => run::<Hmac<Sha512>>(key, message),
    }
}

/// `Ok` when any secret's HMAC of `message` equals any of the `candidates`,
/// each compared in constant time, else [`SignatureError::Mismatch`]. An
/// empty MAC never matches.
pub(crate) fn verify_mac(
    algorithm: Algorithm,
    secrets: &Secrets,
    message: &[&[u8]],
    candidates: &[Vec<u8>],
) -> Result<(), SignatureError> {
    let mut matched = false;
    for secret in secrets.iter() {
        let expected = hmac(algorithm, secret, message);
        for candidate in candidates {
            // Lengths are public (every signature of a scheme has the same);
            // the bytes are compared without an early exit.
            matched |= !expected.is_empty() && bool::from(expected.as_slice().ct_eq(candidate.as_slice()));
        }
    }
    mismatch_unless(matched)
}

/// How a header writes a signature's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    Hex,
    Base64,
}

/// The MAC in `value`, a signature header's value: `prefix`, then the MAC
/// in `encoding`. `label` names the header in the error.
pub(crate) fn decode_signature(
    value: &str,
    prefix: &str,
    encoding: Encoding,
    label: &str,
) -> Result<Vec<u8>, SignatureError> {
    let digest = value
        .strip_prefix(prefix)
        .ok_or_else(|| SignatureError::Malformed(format!("{label} does not start with `{prefix}`")))?;
    // Empty hex decodes to no bytes, which match no MAC; empty base64 is
    // unreadable.
    let (decoded, encoding) = match encoding {
        Encoding::Hex => (hex::decode(digest).ok(), "hexadecimal"),
        Encoding::Base64 => (decode_base64(digest), "base64"),
    };
    decoded.ok_or_else(|| SignatureError::Malformed(format!("{label} is not {encoding}")))
}

/// The value of a header the scheme needs: exactly once, visible ASCII.
pub(crate) fn header<'p>(parts: &'p Parts, name: &'static str) -> Result<&'p str, SignatureError> {
    let mut values = parts.headers.get_all(name).iter();
    let value = values.next().ok_or(SignatureError::Missing(name))?;
    if values.next().is_some() {
        return Err(SignatureError::Malformed(format!(
            "the `{name}` header was sent more than once"
        )));
    }
    value
        .to_str()
        .map(str::trim)
        .map_err(|_| SignatureError::Malformed(format!("the `{name}` header is not visible ASCII")))
}

/// The value of `alternative`, a header accepted in place of `name`; its
/// absence is reported as `name`'s, the header a sender should send.
pub(crate) fn alternative_header<'p>(
    parts: &'p Parts,
    alternative: &'static str,
    name: &'static str,
) -> Result<&'p str, SignatureError> {
    header(parts, alternative).map_err(|error| match error {
        SignatureError::Missing(_) => SignatureError::Missing(name),
        other => other,
    })
}

/// A signed Unix timestamp in seconds.
pub(crate) fn parse_timestamp(text: &str) -> Result<i64, SignatureError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed(format!(
            "the timestamp `{text}` is not a whole number of seconds"
        )));
    }
    text.parse()
        .map_err(|_| SignatureError::Malformed(format!("the timestamp `{text}` is out of range")))
}

/// Refuses a timestamp more than `tolerance` before or after `now`.
pub(crate) fn check_timestamp(timestamp: i64, now: SystemTime, tolerance: Duration) -> Result<(), SignatureError> {
    let now = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => i128::from(since.as_secs()),
        Err(before) => -i128::from(before.duration().as_secs()),
    };
    if (now - i128::from(timestamp)).unsigned_abs() > u128::from(tolerance.as_secs()) {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// A base64 signature's bytes; `None` when it is empty or not base64, so
/// that one unreadable entry in a list can be skipped without hiding a good
/// one.
pub(crate) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .filter(|bytes| !bytes.is_empty())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Request heads, clocks and verdicts for the schemes' unit tests.

    use std::time::{Duration, SystemTime};

    use http::request::Parts;
    use http::Request;

    use super::{SignatureError, VerifySignature};

    /// A POST to `uri` with these headers.
    pub(crate) fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::post(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    /// The clock at `seconds` after the Unix epoch.
    pub(crate) fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// What `verifier` says of a POST to `/` with these headers and `body`,
    /// received at `now` seconds after the Unix epoch.
    pub(crate) fn verdict(
        verifier: &impl VerifySignature,
        headers: &[(&str, &str)],
        body: &str,
        now: u64,
    ) -> Result<(), SignatureError> {
        verifier.verify(&parts("/", headers), body.as_bytes(), at(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_refused_past_the_tolerance_either_way() {
        let now = testing::at(1_000_000);
        let five_minutes = Duration::from_secs(300);
        assert_eq!(check_timestamp(1_000_000 - 300, now, five_minutes), Ok(()));
        assert_eq!(check_timestamp(1_000_000 + 300, now, five_minutes), Ok(()));
        assert_eq!(
            check_timestamp(1_000_000 - 301, now, five_minutes),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check_timestamp(1_000_000 + 301, now, five_minutes),
            Err(SignatureError::Stale)
        );
        assert_eq!(check_timestamp(i64::MAX, now, five_minutes), Err(SignatureError::Stale));
    }

    #[test]
    fn timestamps_must_be_whole_seconds() {
        for text in ["", "-5", "1.5", " 1", "1e9", "abc", "99999999999999999999"] {
            assert!(
                matches!(parse_timestamp(text), Err(SignatureError::Malformed(_))),
                "{text:?}"
            );
        }
        assert_eq!(parse_timestamp("1614265330"), Ok(1_614_265_330));
    }

    #[test]
    fn empty_secrets_are_refused() {
        assert!(Secrets::first(b"", "test").is_err());
        assert!(Secrets::first(b"  ", "test").is_err());
        assert!(Secrets::first(b"s", "test").unwrap().with(b"", "test").is_err());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let secrets = Secrets::first(b"hunter2", "test").unwrap();
        assert_eq!(format!("{secrets:?}"), "[1 redacted]");
    }

    #[test]
    fn repeated_signature_headers_are_malformed() {
        let parts = testing::parts("/", &[("x-sig", "a"), ("x-sig", "b")]);
        assert!(matches!(header(&parts, "x-sig"), Err(SignatureError::Malformed(_))));
        assert_eq!(header(&parts, "x-other"), Err(SignatureError::Missing("x-other")));
    }

    #[test]
    fn signatures_decode_after_their_prefix_and_errors_name_the_header() {
        assert_eq!(
            decode_signature("v0=0aff", "v0=", Encoding::Hex, "X-Sig"),
            Ok(vec![0x0a, 0xff])
        );
        assert_eq!(decode_signature("AAE=", "", Encoding::Base64, "X-Sig"), Ok(vec![0, 1]));
        assert_eq!(
            decode_signature("0aff", "v0=", Encoding::Hex, "X-Sig"),
            Err(SignatureError::Malformed("X-Sig does not start with `v0=`".into()))
        );
        assert_eq!(
            decode_signature("zz", "", Encoding::Hex, "X-Sig"),
            Err(SignatureError::Malformed("X-Sig is not hexadecimal".into()))
        );
        assert_eq!(
            decode_signature("not base64!", "", Encoding::Base64, "X-Sig"),
            Err(SignatureError::Malformed("X-Sig is not base64".into()))
        );
        // Empty hex is no bytes (a mismatch later); empty base64 is unreadable.
        assert_eq!(decode_signature("", "", Encoding::Hex, "X-Sig"), Ok(Vec::new()));
        assert!(matches!(
            decode_signature("", "", Encoding::Base64, "X-Sig"),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        // RFC 4231 §4.3: key "Jefe", data "what do ya want for nothing?".
        let mac = hmac(Algorithm::Sha256, b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
