//! JSON Pointer paths and the request body parsed once per request.

use bytes::Bytes;
use serde_json::Value;

use super::KeyError;

/// An RFC 6901 JSON Pointer, kept in its pointer form (`/data/object/id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct JsonPointer(String);

impl JsonPointer {
    /// Accepts an RFC 6901 pointer (`/data/id`) or the dotted JSONPath subset
    /// (`$.data.id`, `$.items[0].id`).
    pub(crate) fn parse(path: &str) -> Result<Self, InvalidJsonPath> {
        if path.is_empty() || path.starts_with('/') {
            return Ok(Self(path.to_owned()));
        }
        let Some(rest) = path.strip_prefix('$') else {
            return Err(InvalidJsonPath(path.to_owned()));
        };
        let mut pointer = String::with_capacity(rest.len() + 1);
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '.' => {
                    let mut token = String::new();
                    while let Some(&next) = chars.peek() {
                        if next == '.' || next == '[' {
                            break;
                        }
                        token.push(next);
                        chars.next();
                    }
                    if token.is_empty() {
                        return Err(InvalidJsonPath(path.to_owned()));
                    }
                    push_token(&mut pointer, &token);
                }
                '[' => {
                    let mut index = String::new();
                    for next in chars.by_ref() {
                        if next == ']' {
                            break;
                        }
                        index.push(next);
                    }
                    let index = index.trim_matches(|c| c == '\'' || c == '"');
                    if index.is_empty() {
                        return Err(InvalidJsonPath(path.to_owned()));
                    }
                    push_token(&mut pointer, index);
                }
                _ => return Err(InvalidJsonPath(path.to_owned())),
            }
        }
        Ok(Self(pointer))
    }

    /// A pointer written in this crate's source, already in RFC 6901 form.
    pub(crate) fn from_pointer(pointer: &str) -> Self {
        Self(pointer.to_owned())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn find<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        value.pointer(&self.0)
    }
}

fn push_token(pointer: &mut String, token: &str) {
    pointer.push('/');
    for c in token.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            other => pointer.push(other),
        }
    }
}

/// A path that is neither a JSON Pointer nor a supported JSONPath.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a JSON Pointer (`/data/id`) or a dotted JSONPath (`$.data.id`)")]
pub struct InvalidJsonPath(pub(crate) String);

/// The request body, parsed as JSON at most once and only when asked.
#[derive(Debug)]
pub(crate) struct JsonBody<'b> {
    raw: &'b Bytes,
    parsed: Option<Result<Option<Value>, String>>,
}

impl<'b> JsonBody<'b> {
    pub(crate) fn new(raw: &'b Bytes) -> Self {
        Self { raw, parsed: None }
    }

    /// The parsed document; `None` for an empty body (no document, so every
    /// pointer is absent).
    pub(crate) fn value(&mut self) -> Result<Option<&Value>, KeyError> {
        let raw = self.raw;
        let parsed = self.parsed.get_or_insert_with(|| {
            if raw.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            serde_json::from_slice::<Value>(raw)
                .map(Some)
                .map_err(|error| error.to_string())
        });
        match parsed {
            Ok(value) => Ok(value.as_ref()),
            Err(reason) => Err(KeyError::MalformedJson(reason.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_pass_through_unchanged() {
        assert_eq!(JsonPointer::parse("/data/id").unwrap().as_str(), "/data/id");
        assert_eq!(JsonPointer::parse("").unwrap().as_str(), "");
    }

    #[test]
    fn dotted_paths_become_pointers() {
        assert_eq!(JsonPointer::parse("$.data.id").unwrap().as_str(), "/data/id");
        assert_eq!(JsonPointer::parse("$.items[0].id").unwrap().as_str(), "/items/0/id");
        assert_eq!(JsonPointer::parse("$.a/b.c~d").unwrap().as_str(), "/a~1b/c~0d");
        assert_eq!(JsonPointer::parse("$['x']").unwrap().as_str(), "/x");
    }

    #[test]
    fn malformed_paths_are_refused() {
        for path in ["data.id", "$..id", "$.", "$[]", "$x"] {
            assert!(JsonPointer::parse(path).is_err(), "{path}");
        }
    }

    #[test]
    fn an_empty_body_has_no_document() {
        let raw = Bytes::from_static(b"  \n");
        assert!(JsonBody::new(&raw).value().unwrap().is_none());
    }

    #[test]
    fn a_malformed_body_is_an_error() {
        let raw = Bytes::from_static(b"{\"id\":");
        assert!(matches!(JsonBody::new(&raw).value(), Err(KeyError::MalformedJson(_))));
    }
}
