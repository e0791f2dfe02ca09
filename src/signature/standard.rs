//! Standard Webhooks (and Svix, which uses the same scheme under `svix-*`
//! header names): `webhook-signature` holds a space-separated list of
//! `v1,<base64 HMAC-SHA256>` entries, the HMAC of
//! `"{webhook-id}.{webhook-timestamp}.{raw body}"` keyed with the base64
//! decoding of the secret (`whsec_...`, prefix optional), and `v1a,<base64
//! Ed25519 signature>` entries, of the same message, verified with the
//! sender's public key (`whpk_...`). Several entries appear while a secret
//! is rotated; any valid one of a kind the verifier holds a key for passes.
//! <https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use http::request::Parts;

use super::{
    check_timestamp, decode_base64, header, mismatch_unless, parse_timestamp, verify_mac, Algorithm,
    InvalidSignatureConfig, Secrets, SignatureError, VerifySignature, DEFAULT_SIGNATURE_TOLERANCE,
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
/// The secret is the base64 key, with or without its `whsec_` prefix: it
/// verifies `v1` (HMAC-SHA256) signatures. A public key (`whpk_` and the
/// base64 of its 32 bytes) verifies asymmetric `v1a` (Ed25519) signatures
/// instead; a verifier may hold keys of both kinds, and a header listing
/// signatures of both kinds passes when any one verifies. The timestamp
/// must be within the tolerance (default five minutes) of the receiver's
/// clock, in the past or the future.
///
/// `v1a` follows the Standard Webhooks specification 1.0.0; no official
/// library verified it when this was written, so it is tested against
/// signatures made by a second implementation (Python's `cryptography`).
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
    /// The `whsec_` secrets, for `v1` signatures.
    secrets: Secrets,
    /// The `whpk_` public keys, for `v1a` signatures.
    public_keys: Vec<VerifyingKey>,
    tolerance: Duration,
    headers: Headers,
}

/// A key as configured: a shared secret or a sender's public key.
enum Key {
    Secret(Vec<u8>),
    Public(VerifyingKey),
}

impl StandardWebhooksSignature {
    /// Verifies the `webhook-*` headers with this key: a secret
    /// (`whsec_…`, or its bare base64) for `v1` signatures, or the sender's
    /// public key (`whpk_…`) for `v1a` ones. A key that is empty, not
    /// base64, not 32 bytes (a public key), or a signing key (`whsk_`, which
    /// belongs to the sender) is refused.
    pub fn new(key: &str) -> Result<Self, InvalidSignatureConfig> {
        let empty = Self {
            secrets: Secrets::default(),
            public_keys: Vec::new(),
            tolerance: DEFAULT_SIGNATURE_TOLERANCE,
            headers: STANDARD,
        };
        empty.with_key(decode_key(key)?)
    }

    /// Verifies Svix's `svix-id`, `svix-timestamp` and `svix-signature`
    /// headers with this key.
    pub fn svix(key: &str) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            headers: SVIX,
            ..Self::new(key)?
        })
    }

    /// Accepts another key as well (rotation, or a public key beside a
    /// secret while a sender moves to `v1a`).
    pub fn secret(self, key: &str) -> Result<Self, InvalidSignatureConfig> {
        self.with_key(decode_key(key)?)
    }

    /// How far the signed timestamp may be from now (default five minutes).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    fn with_key(mut self, key: Key) -> Result<Self, InvalidSignatureConfig> {
        match key {
            Key::Secret(secret) => self.secrets = self.secrets.with(&secret, "Standard Webhooks")?,
            Key::Public(public_key) => self.public_keys.push(public_key),
        }
        Ok(self)
    }

    /// Which signatures of the header this verifier can check: `v1` where
    /// it holds a secret, `v1a` where it holds a public key.
    fn readable_signatures(&self, listed: &str) -> (Vec<Vec<u8>>, Vec<Signature>) {
        let has_secrets = self.secrets.iter().next().is_some();
        let mut symmetric = Vec::new();
        let mut asymmetric = Vec::new();
        for entry in listed.split_whitespace() {
            if let (Some(encoded), true) = (entry.strip_prefix("v1,"), has_secrets) {
                symmetric.extend(decode_base64(encoded));
            } else if let (Some(encoded), false) = (entry.strip_prefix("v1a,"), self.public_keys.is_empty()) {
                let signature = decode_base64(encoded).and_then(|bytes| Signature::from_slice(&bytes).ok());
                asymmetric.extend(signature);
            }
        }
        (symmetric, asymmetric)
    }

    /// The kinds of signature this verifier reads, as an error names them.
    fn kinds(&self) -> &'static str {
        match (self.secrets.iter().next().is_some(), self.public_keys.is_empty()) {
            (true, true) => "v1",
            (false, false) => "v1a",
            _ => "v1 or v1a",
        }
    }
}

fn decode_key(key: &str) -> Result<Key, InvalidSignatureConfig> {
    let key = key.trim();
    let base64 = |text: &str, what: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| InvalidSignatureConfig(format!("the Standard Webhooks {what} is not base64")))
    };
    if key.starts_with("whsk_") {
        return Err(InvalidSignatureConfig(
            "`whsk_` is the sender's signing key, which a receiver must not hold: verify with its public key (`whpk_`)"
                .into(),
        ));
    }
    if let Some(public_key) = key.strip_prefix("whpk_") {
        let bytes = base64(public_key, "public key (after `whpk_`)")?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            InvalidSignatureConfig(format!(
                "the Standard Webhooks public key is {} bytes; an Ed25519 key is 32",
                bytes.len()
            ))
        })?;
        let public_key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| InvalidSignatureConfig("the Standard Webhooks public key is not an Ed25519 key".into()))?;
        return Ok(Key::Public(public_key));
    }
    Ok(Key::Secret(base64(
        key.strip_prefix("whsec_").unwrap_or(key),
        "secret (after `whsec_`)",
    )?))
}

impl VerifySignature for StandardWebhooksSignature {
    fn verify(&self, parts: &Parts, body: &[u8], now: SystemTime) -> Result<(), SignatureError> {
        let id = header(parts, self.headers.id)?;
        let timestamp = header(parts, self.headers.timestamp)?;
        let listed = header(parts, self.headers.signature)?;
        let seconds = parse_timestamp(timestamp)?;
        let (symmetric, asymmetric) = self.readable_signatures(listed);
        if symmetric.is_empty() && asymmetric.is_empty() {
            return Err(SignatureError::Malformed(format!(
                "`{}` lists no readable {} signature",
                self.headers.signature,
                self.kinds()
            )));
        }
        let message: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        let hmac_matched =
            !symmetric.is_empty() && verify_mac(Algorithm::Sha256, &self.secrets, &message, &symmetric).is_ok();
        let ed25519_verified = !asymmetric.is_empty() && {
            let signed = message.concat();
            asymmetric.iter().any(|signature| {
                self.public_keys
                    .iter()
                    .any(|public_key| public_key.verify_strict(&signed, signature).is_ok())
            })
        };
        mismatch_unless(hmac_matched || ed25519_verified)?;
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

    /// `v1a` vectors made by a second implementation, Python's
    /// `cryptography` 48.0.0 (`tests/vectors/make_standard_webhooks_v1a.py`):
    /// the key's seed is the bytes 0 to 31, the other key's 32 to 63.
    mod v1a {
        use super::*;

        const PUBLIC_KEY: &str = "whpk_A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
        const OTHER_PUBLIC_KEY: &str = "whpk_Kay64UG8yvCyLhqU000LxzYeUm0L/hLIl5S8kyKWbdc=";
        const SIGNING_KEY: &str = "whsk_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        const ID: &str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W";
        const T: u64 = 1_700_000_000;
        const BODY: &str = r#"{"type":"invoice.paid","data":{"id":"in_1"}}"#;
        const SIGNATURE: &str =
            "v1a,OmTL79G5cQUbFGtvpnKC1RlhwrthKkLsmRXLQoNI1C1Qt0kzMHnDnwDyy0+MV1ZHGH1vfVZKV5LEkdgLB+lGCw==";
        /// The same message signed with the other key.
        const OTHER_SIGNATURE: &str =
            "v1a,3R4kFIHh0WOqq9Jj+uCXwo1ip7UrOgTONsA+TUiP2P0VeWM9fN1QyHuM60CFdl8faA31q6VPKsndGMvOA5PVBQ==";

        fn delivery(signature: &str) -> Vec<(&'static str, String)> {
            vec![
                ("webhook-id", ID.to_owned()),
                ("webhook-timestamp", T.to_string()),
                ("webhook-signature", signature.to_owned()),
            ]
        }

        fn verify_with_key(key: &str, signature: &str, body: &str, now: u64) -> Result<(), SignatureError> {
            let verifier = StandardWebhooksSignature::new(key).unwrap();
            verify_with(&verifier, &delivery(signature), body, now)
        }

        #[test]
        fn accepts_the_vector_under_its_public_key() {
            assert_eq!(verify_with_key(PUBLIC_KEY, SIGNATURE, BODY, T), Ok(()));
        }

        #[test]
        fn refuses_it_under_another_public_key() {
            assert_eq!(
                verify_with_key(OTHER_PUBLIC_KEY, SIGNATURE, BODY, T),
                Err(SignatureError::Mismatch)
            );
            assert_eq!(verify_with_key(OTHER_PUBLIC_KEY, OTHER_SIGNATURE, BODY, T), Ok(()));
        }

        #[test]
        fn refuses_a_tampered_body_id_or_timestamp() {
            let tampered = BODY.replace("in_1", "in_2");
            assert_eq!(
                verify_with_key(PUBLIC_KEY, SIGNATURE, &tampered, T),
                Err(SignatureError::Mismatch)
            );
            let verifier = StandardWebhooksSignature::new(PUBLIC_KEY).unwrap();
            let mut other_id = delivery(SIGNATURE);
            other_id[0].1 = "msg_other".into();
            assert_eq!(
                verify_with(&verifier, &other_id, BODY, T),
                Err(SignatureError::Mismatch)
            );
            let mut other_time = delivery(SIGNATURE);
            other_time[1].1 = (T + 1).to_string();
            assert_eq!(
                verify_with(&verifier, &other_time, BODY, T),
                Err(SignatureError::Mismatch)
            );
        }

        #[test]
        fn refuses_a_stale_timestamp() {
            assert_eq!(verify_with_key(PUBLIC_KEY, SIGNATURE, BODY, T + 300), Ok(()));
            assert_eq!(
                verify_with_key(PUBLIC_KEY, SIGNATURE, BODY, T + 301),
                Err(SignatureError::Stale)
            );
        }

        #[test]
        fn a_v1a_signature_under_a_v1_secret_is_unreadable_and_refused() {
            assert!(matches!(
                verify_with_key(super::SECRET, SIGNATURE, BODY, T),
                Err(SignatureError::Malformed(message)) if message.contains("no readable v1 signature")
            ));
        }

        #[test]
        fn a_v1_signature_under_a_public_key_is_unreadable_and_refused() {
            assert!(matches!(
                verify_with_key(PUBLIC_KEY, super::SIGNATURE, super::PAYLOAD, super::T),
                Err(SignatureError::Malformed(message)) if message.contains("no readable v1a signature")
            ));
        }

        #[test]
        fn a_list_of_both_kinds_passes_when_any_verifies() {
            let both = StandardWebhooksSignature::new(super::SECRET)
                .unwrap()
                .secret(PUBLIC_KEY)
                .unwrap();
            let listed = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {OTHER_SIGNATURE} {SIGNATURE}");
            assert_eq!(verify_with(&both, &delivery(&listed), BODY, T), Ok(()));
            let none_valid = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {OTHER_SIGNATURE}");
            assert_eq!(
                verify_with(&both, &delivery(&none_valid), BODY, T),
                Err(SignatureError::Mismatch)
            );
            // And a v1 signature still passes the same verifier.
            assert_eq!(
                verify_with(&both, &headers(super::SIGNATURE), super::PAYLOAD, super::T),
                Ok(())
            );
        }

        #[test]
        fn refuses_a_signing_key_and_a_public_key_of_the_wrong_size() {
            let signing = StandardWebhooksSignature::new(SIGNING_KEY).unwrap_err();
            assert!(signing.to_string().contains("whpk_"), "{signing}");
            let short = StandardWebhooksSignature::new("whpk_AAECAwQF").unwrap_err();
            assert!(short.to_string().contains("32"), "{short}");
        }
    }
}
