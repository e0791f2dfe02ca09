//! The request fingerprint: what makes "the same key with another payload"
//! detectable.
//!
//! By default the fingerprint is the SHA-256 of the method, the path with its
//! query string and the raw body. For senders that re-serialise their JSON,
//! [`Fingerprint::canonical_json`] ignores key order and whitespace, and
//! [`Fingerprint::json_fields`] covers only selected fields.

use bytes::Bytes;
use http::request::Parts;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::key::{InvalidJsonPath, JsonBody, JsonPointer, KeyError};

/// How a route fingerprints its requests.
///
/// ```
/// use tower_idempotency::Fingerprint;
///
/// let exact = Fingerprint::raw_body();
/// let reordered_is_same = Fingerprint::canonical_json();
/// let amount_only = Fingerprint::json_fields(["/amount", "/currency"]).unwrap();
/// # let _ = (exact, reordered_is_same, amount_only);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint {
    body: BodyPart,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
enum BodyPart {
    #[default]
    Raw,
    CanonicalJson,
    Fields(Vec<JsonPointer>),
}

impl Fingerprint {
    /// Method, path with query string, and the body byte for byte (the
    /// default).
    pub fn raw_body() -> Self {
        Self { body: BodyPart::Raw }
    }

    /// Method, path with query string, and the body as canonical JSON: object
    /// keys sorted, no insignificant whitespace.
    pub fn canonical_json() -> Self {
        Self {
            body: BodyPart::CanonicalJson,
        }
    }

    /// Method, path with query string, and the canonical JSON of the listed
    /// fields (JSON Pointers or dotted JSONPaths); an absent field counts as
    /// `null`.
    pub fn json_fields<I, P>(paths: I) -> Result<Self, InvalidJsonPath>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        let pointers = paths
            .into_iter()
            .map(|path| JsonPointer::parse(path.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            body: BodyPart::Fields(pointers),
        })
    }

    pub(crate) fn reads_json(&self) -> bool {
        !matches!(self.body, BodyPart::Raw)
    }

    /// The 32-byte digest of a request.
    pub(crate) fn digest(&self, parts: &Parts, body: &Bytes, json: &mut JsonBody<'_>) -> Result<[u8; 32], KeyError> {
        let mut hasher = Sha256::new();
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        for field in [parts.method.as_str().as_bytes(), path.as_bytes()] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        match &self.body {
            BodyPart::Raw => hasher.update(body),
            BodyPart::CanonicalJson => {
                let mut out = Vec::with_capacity(body.len());
                if let Some(document) = json.value()? {
                    write_canonical(document, &mut out);
                }
                hasher.update(&out);
            }
            BodyPart::Fields(pointers) => {
                let document = json.value()?;
                let mut out = Vec::new();
                for pointer in pointers {
                    let value = document.and_then(|d| pointer.find(d)).unwrap_or(&Value::Null);
                    write_canonical(value, &mut out);
                    out.push(0);
                }
                hasher.update(&out);
            }
        }
        Ok(hasher.finalize().into())
    }
}

/// Serialises with sorted object keys whatever map type serde_json was built
/// with (another crate may enable its `preserve_order` feature).
pub(crate) fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (index, (name, field)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(name.clone()), out);
                out.push(b':');
                write_canonical(field, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Serialising a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn digest(fingerprint: &Fingerprint, method: &str, uri: &str, body: &'static str) -> [u8; 32] {
        let parts = Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let body = Bytes::from_static(body.as_bytes());
        let mut json = JsonBody::new(&body);
        fingerprint.digest(&parts, &body, &mut json).unwrap()
    }

    #[test]
    fn the_raw_fingerprint_covers_method_path_query_and_body() {
        let f = Fingerprint::raw_body();
        let base = digest(&f, "POST", "/a?x=1", "{}");
        assert_eq!(base, digest(&f, "POST", "/a?x=1", "{}"));
        assert_ne!(base, digest(&f, "PUT", "/a?x=1", "{}"));
        assert_ne!(base, digest(&f, "POST", "/a?x=2", "{}"));
        assert_ne!(base, digest(&f, "POST", "/a?x=1", "{ }"));
    }

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace() {
        let f = Fingerprint::canonical_json();
        assert_eq!(
            digest(&f, "POST", "/a", r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#),
            digest(&f, "POST", "/a", r#"{"a":{"x":"s","y":[1,2]},"b":1}"#)
        );
        assert_ne!(
            digest(&f, "POST", "/a", r#"{"a": 1}"#),
            digest(&f, "POST", "/a", r#"{"a": 2}"#)
        );
    }

    #[test]
    fn field_fingerprints_ignore_other_fields() {
        let f = Fingerprint::json_fields(["/amount"]).unwrap();
        assert_eq!(
            digest(&f, "POST", "/a", r#"{"amount": 5, "note": "x"}"#),
            digest(&f, "POST", "/a", r#"{"note": "y", "amount": 5}"#)
        );
        assert_ne!(
            digest(&f, "POST", "/a", r#"{"amount": 5}"#),
            digest(&f, "POST", "/a", r#"{"amount": 6}"#)
        );
    }
}
