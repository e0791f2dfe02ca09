//! Entry points for the fuzz targets in `fuzz/`, compiled only with
//! `--cfg fuzzing` (which cargo-fuzz sets): they reach crate-private parsers
//! without widening the public API. Not part of the API.

use crate::key::JsonPointer;
use crate::record::{decode_headers, encode_headers};

/// Decodes a stored response's header block (the `response_headers`
/// column). Never panics; whatever decodes re-encodes to a block that
/// decodes to the same headers and trailers. Returns whether it decoded.
pub fn stored_response_headers(bytes: &[u8]) -> bool {
    let Ok((headers, trailers)) = decode_headers(bytes) else {
        return false;
    };
    let again = encode_headers(&headers, trailers.as_deref());
    assert_eq!(
        decode_headers(&again),
        Ok((headers, trailers)),
        "a decoded block must re-encode to itself"
    );
    true
}

/// Parses `path` as an RFC 6901 JSON Pointer or a dotted JSONPath and looks
/// it up in `document`: `None` for an invalid path, else the pointer form
/// and what it finds.
pub fn json_pointer(path: &str, document: &serde_json::Value) -> Option<(String, Option<serde_json::Value>)> {
    let pointer = JsonPointer::parse(path).ok()?;
    Some((pointer.as_str().to_owned(), pointer.find(document).cloned()))
}
