//! Twilio: `X-Twilio-Signature: <base64 HMAC-SHA1>`, keyed with the
//! account's Auth Token, of the full URL Twilio requested followed by each
//! form parameter's name and value, sorted by name (then value). A request
//! with a JSON (or other non-form) body carries a `bodySHA256` query
//! parameter instead: the URL alone is signed and the body must hash to it.
//! No timestamp is signed.
//! <https://www.twilio.com/docs/usage/webhooks/webhooks-security>

use std::time::SystemTime;

use http::header::CONTENT_TYPE;
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    decode_signature, header, mismatch_unless, verify_mac, Algorithm, Encoding, InvalidSignatureConfig, Secrets,
    SignatureError, VerifySignature,
};

const SIGNATURE: &str = "x-twilio-signature";

/// Verifies Twilio's `X-Twilio-Signature` header.
///
/// Twilio signs the public URL it was given, which a server behind a proxy
/// or load balancer cannot see, so the verifier is told it: the signed URL
/// is `base_url` followed by the request's path and query as the layer
/// sees them (under axum's `nest`, that path lacks the nest's prefix: put
/// the prefix in `base_url`). Like Twilio's own libraries, it accepts the
/// URL with and without the port.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::TwilioSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Twilio posts to https://example.com/twilio/sms; the route is /twilio/sms.
/// let signature = TwilioSignature::new("auth-token", "https://example.com")?;
/// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).preset(Preset::twilio().verify_signature(signature));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct TwilioSignature {
    secrets: Secrets,
    /// The base URL without a port, then with its port (or the default).
    bases: [String; 2],
}

impl TwilioSignature {
    /// Verifies with this Auth Token, for requests Twilio sent to
    /// `base_url` + path (an `http` or `https` URL without query or
    /// fragment; a path prefix is kept, a trailing `/` dropped). An empty
    /// token or an unusable URL is refused.
    pub fn new(auth_token: impl AsRef<[u8]>, base_url: &str) -> Result<Self, InvalidSignatureConfig> {
        Ok(Self {
            secrets: Secrets::first(auth_token.as_ref(), "Twilio")?,
            bases: port_variants(base_url)?,
        })
    }

    /// Accepts another Auth Token as well (Twilio's secondary token, while
    /// rotating).
    pub fn secret(mut self, auth_token: impl AsRef<[u8]>) -> Result<Self, InvalidSignatureConfig> {
        self.secrets = self.secrets.with(auth_token.as_ref(), "Twilio")?;
        Ok(self)
    }
}

/// `scheme://host[:port][/prefix]` as two strings: without a port, and
/// with the explicit or default one.
fn port_variants(base_url: &str) -> Result<[String; 2], InvalidSignatureConfig> {
    let invalid = |why: &str| InvalidSignatureConfig(format!("the Twilio base URL `{base_url}` {why}"));
    let (scheme, rest) = base_url
        .split_once("://")
        .ok_or_else(|| invalid("is not an absolute URL"))?;
    let default_port = match scheme {
        "https" => "443",
        "http" => "80",
        _ => return Err(invalid("is not http or https")),
    };
    if rest.contains(['?', '#']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("has a query, a fragment or whitespace"));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = path.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() || port.is_some_and(|port| port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit())) {
        return Err(invalid("has no host or an invalid port"));
    }
    Ok([
        format!("{scheme}://{host}{path}"),
        format!("{scheme}://{host}:{}{path}", port.unwrap_or(default_port)),
    ])
}

impl VerifySignature for TwilioSignature {
    fn verify(&self, parts: &Parts, body: &[u8], _now: SystemTime) -> Result<(), SignatureError> {
        let signature = decode_signature(header(parts, SIGNATURE)?, "", Encoding::Base64, "X-Twilio-Signature")?;
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        let body_hash = parts.uri.query().and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(name, _)| name == "bodySHA256")
                .map(|(_, value)| value.into_owned())
        });
        let params = match body_hash {
            Some(expected) => {
                let actual = hex::encode(Sha256::digest(body));
                if !bool::from(actual.as_bytes().ct_eq(expected.to_ascii_lowercase().as_bytes())) {
                    return Err(SignatureError::Mismatch);
                }
                String::new()
            }
            None if is_form(parts) => sorted_params(body),
            None => String::new(),
        };
        let candidates = [signature];
        let matched = self.bases.iter().any(|base| {
            let message: [&[u8]; 3] = [base.as_bytes(), path.as_bytes(), params.as_bytes()];
            verify_mac(Algorithm::Sha1, &self.secrets, &message, &candidates).is_ok()
        });
        mismatch_unless(matched)
    }
}

fn is_form(parts: &Parts) -> bool {
    parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// Every form parameter's decoded name and value, sorted by name then
/// value, concatenated without separators.
fn sorted_params(body: &[u8]) -> String {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    pairs.sort();
    pairs.into_iter().map(|(name, value)| name + &value).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::testing::{at, parts};

    // twilio/twilio-python tests/unit/test_request_validator.py: token
    // "12345", uri https://mycompany.com/myapp.php?foo=1&bar=2 and these
    // parameters ("+" is %2B in a form body).
    const TOKEN: &str = "12345";
    const PATH: &str = "/myapp.php?foo=1&bar=2";
    const FORM: &str =
        "CallSid=CA1234567890ABCDE&Digits=1234&From=%2B14158675309&To=%2B18005551212&Caller=%2B14158675309";
    const EXPECTED: &str = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
    const FORM_CONTENT: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    fn verify(base: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<(), SignatureError> {
        TwilioSignature::new(TOKEN, base)
            .unwrap()
            .verify(&parts(path, headers), body.as_bytes(), at(0))
    }

    fn signed(signature: &str) -> [(&str, &str); 2] {
        [FORM_CONTENT, ("X-Twilio-Signature", signature)]
    }

    #[test]
    fn accepts_the_form_vector() {
        assert_eq!(verify("https://mycompany.com", PATH, &signed(EXPECTED), FORM), Ok(()));
        assert_eq!(verify("https://mycompany.com/", PATH, &signed(EXPECTED), FORM), Ok(()));
    }

    #[test]
    fn accepts_repeated_parameters_sorted_by_value() {
        // test_compute_signature_duplicate_multi_dict.
        let form = "Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234";
        assert_eq!(
            verify(
                "https://mycompany.com",
                PATH,
                &signed("IK+Dwps556ElfBT0I3Rgjkr1wJU="),
                form
            ),
            Ok(())
        );
    }

    #[test]
    fn accepts_the_url_with_or_without_its_port() {
        // test_validation_removes_port_on_https: a base with a port also
        // matches a signature over the URL without it.
        assert_eq!(
            verify("https://mycompany.com:1234", PATH, &signed(EXPECTED), FORM),
            Ok(())
        );
        // test_validation_adds_port_on_https: the hash of the URL with :443.
        assert_eq!(
            verify(
                "https://mycompany.com",
                PATH,
                &signed("kvajT1Ptam85bY51eRf/AJRuM3w="),
                FORM
            ),
            Ok(())
        );
        // test_validation_adds_port_on_http: the hash of the URL with :80.
        assert_eq!(
            verify(
                "http://mycompany.com",
                PATH,
                &signed("0ZXoZLH/DfblKGATFgpif+LLRf4="),
                FORM
            ),
            Ok(())
        );
        // test_validation_removes_port_on_http: the hash of the URL with :1234.
        assert_eq!(
            verify(
                "http://mycompany.com:1234",
                PATH,
                &signed("Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
                FORM
            ),
            Ok(())
        );
    }

    #[test]
    fn accepts_a_json_body_signed_through_body_sha256() {
        // test_validation_of_body_succeeds.
        let body = r#"{"property": "value", "boolean": true}"#;
        let path = format!("{PATH}&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620");
        let headers = [
            ("content-type", "application/json"),
            ("X-Twilio-Signature", "a9nBmqA0ju/hNViExpshrM61xv4="),
        ];
        assert_eq!(verify("https://mycompany.com", &path, &headers, body), Ok(()));
        assert_eq!(
            verify(
                "https://mycompany.com",
                &path,
                &headers,
                r#"{"property": "value", "boolean": false}"#
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn accepts_any_configured_token() {
        let rotated = TwilioSignature::new("secondary", "https://mycompany.com")
            .unwrap()
            .secret(TOKEN)
            .unwrap();
        assert_eq!(
            rotated.verify(&parts(PATH, &signed(EXPECTED)), FORM.as_bytes(), at(0)),
            Ok(())
        );
    }

    #[test]
    fn refuses_tampered_parameters_urls_and_tokens() {
        let tampered = FORM.replace("Digits=1234", "Digits=1235");
        assert_eq!(
            verify("https://mycompany.com", PATH, &signed(EXPECTED), &tampered),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                "https://mycompany.com",
                "/myapp.php?foo=1&bar=3",
                &signed(EXPECTED),
                FORM
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("https://other.example", PATH, &signed(EXPECTED), FORM),
            Err(SignatureError::Mismatch)
        );
        let wrong = TwilioSignature::new("54321", "https://mycompany.com").unwrap();
        assert_eq!(
            wrong.verify(&parts(PATH, &signed(EXPECTED)), FORM.as_bytes(), at(0)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        assert_eq!(
            verify("https://mycompany.com", PATH, &[FORM_CONTENT], FORM),
            Err(SignatureError::Missing("x-twilio-signature"))
        );
        assert!(matches!(
            verify("https://mycompany.com", PATH, &signed("not base64!"), FORM),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_unusable_base_urls_and_tokens() {
        for base in [
            "",
            "mycompany.com",
            "ftp://mycompany.com",
            "https://",
            "https://h:x",
            "https://h/?q",
            "https://h/#f",
        ] {
            assert!(TwilioSignature::new(TOKEN, base).is_err(), "{base:?}");
        }
        assert!(TwilioSignature::new("", "https://mycompany.com").is_err());
        assert!(TwilioSignature::new(TOKEN, "https://[::1]:8443/prefix").is_ok());
    }
}
