//! Entry points for the micro-benchmarks in `benches/`, compiled only with
//! the `bench-internals` feature: they reach the crate-private pure steps of
//! the request path without widening the public API. Not part of the API.

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Empty;

use crate::body::ResponseBody;
use crate::key::{JsonBody, KeyError, Role};
use crate::record::{decode_headers, encode_headers, StoredResponse};
use crate::{Extractor, Fingerprint, IdempotencyLayer};

/// Everything the layer reads from a request before its first store step:
/// the body parsed as JSON where the route needs it, the source, event type
/// and key extracted and checked, and the fingerprint. Returns the key.
pub fn identify(layer: &IdempotencyLayer, parts: &Parts, body: &Bytes) -> Result<Option<String>, KeyError> {
    crate::pipeline::bench::identify(layer.config(), parts, body)
}

/// One extractor on its own, with a fresh JSON parse as the layer does once
/// per request.
pub fn extract_key(extractor: &Extractor, parts: &Parts, body: &Bytes) -> Result<Option<String>, KeyError> {
    extractor.extract(Role::Key, parts, body, &mut JsonBody::new(body))
}

/// The request fingerprint alone.
pub fn fingerprint(fingerprint: &Fingerprint, parts: &Parts, body: &Bytes) -> Result<[u8; 32], KeyError> {
    fingerprint.digest(parts, body, &mut JsonBody::new(body))
}

/// The stored headers and trailers as the `response_headers` column holds
/// them.
pub fn encode_response_headers(
    headers: &[(HeaderName, HeaderValue)],
    trailers: Option<&[(HeaderName, HeaderValue)]>,
) -> Vec<u8> {
    encode_headers(headers, trailers)
}

/// What a duplicate costs once its row is read: the header block decoded,
/// the body taken out of the row, and the replay response built.
pub fn replay_from_columns(
    status: StatusCode,
    response_headers: &[u8],
    response_body: &[u8],
) -> Result<Response<ResponseBody<Empty<Bytes>>>, String> {
    let (headers, trailers) = decode_headers(response_headers).map_err(|error| error.to_string())?;
    let stored = StoredResponse {
        status,
        headers,
        body: Some(Bytes::copy_from_slice(response_body)),
        trailers,
    };
    Ok(crate::pipeline::bench::replay(stored))
}
