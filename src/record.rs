//! Stored responses: what a record keeps of the first response, and its
//! byte encoding in the `response_headers` column.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// The part of a response a record keeps and replays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    /// Allow-listed headers, repeated names kept in order.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// `None` when the body was larger than the storage limit.
    pub(crate) body: Option<Bytes>,
    pub(crate) trailers: Option<Vec<(HeaderName, HeaderValue)>>,
}

/// Headers that are never stored, whatever the allow-list says: credentials,
/// cookies, and hop-by-hop or framing headers that belong to one connection.
const NEVER_STORED: [HeaderName; 10] = [
    header::SET_COOKIE,
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    HeaderName::from_static("keep-alive"),
];

/// Whether a header may be stored at all.
pub(crate) fn is_storable(name: &HeaderName) -> bool {
    !NEVER_STORED.contains(name) && name.as_str() != "proxy-connection"
}

/// The allow-listed headers of `headers`, in order.
pub(crate) fn allowed_headers(headers: &HeaderMap, allow: &[HeaderName]) -> Vec<(HeaderName, HeaderValue)> {
    // HeaderMap iterates each name's values in insertion order.
    headers
        .iter()
        .filter(|(name, _)| allow.contains(name) && is_storable(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Every storable header of `headers`, in order (the `date` of the first
/// response is not replayed either).
pub(crate) fn storable_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| is_storable(name) && *name != header::DATE)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Format version of the encoded header block.
const FORMAT: u8 = 1;
/// Marks "no trailers" where a trailer count would stand.
const NO_TRAILERS: u32 = u32::MAX;

/// Encodes headers and trailers: a version byte, then a counted list of
/// (u16 name length, name, u32 value length, value) for the headers, then the
/// same for the trailers (or `NO_TRAILERS`).
pub(crate) fn encode_headers(
    headers: &[(HeaderName, HeaderValue)],
    trailers: Option<&[(HeaderName, HeaderValue)]>,
) -> Vec<u8> {
    let mut out = vec![FORMAT];
    write_list(&mut out, headers);
    match trailers {
        Some(trailers) => write_list(&mut out, trailers),
        None => out.extend_from_slice(&NO_TRAILERS.to_be_bytes()),
    }
    out
}

fn write_list(out: &mut Vec<u8>, list: &[(HeaderName, HeaderValue)]) {
    out.extend_from_slice(&(list.len() as u32).to_be_bytes());
    for (name, value) in list {
        // Header names are at most 64 KiB by construction in `http`; values
        // are bounded by the response that produced them.
        out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&(value.as_bytes().len() as u32).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
}

/// A stored header block that cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the stored response headers are corrupt: {0}")]
pub(crate) struct CorruptRecord(pub(crate) &'static str);

/// The decoded headers and trailers.
pub(crate) type DecodedHeaders = (Vec<(HeaderName, HeaderValue)>, Option<Vec<(HeaderName, HeaderValue)>>);

/// Decodes what [`encode_headers`] wrote; any other input is an error, never
/// a panic.
pub(crate) fn decode_headers(mut input: &[u8]) -> Result<DecodedHeaders, CorruptRecord> {
    let version = take(&mut input, 1)?;
    if version != [FORMAT] {
        return Err(CorruptRecord("unknown format version"));
    }
    let headers = read_list(&mut input, None)?.ok_or(CorruptRecord("missing header list"))?;
    let trailers = read_list(&mut input, Some(NO_TRAILERS))?;
    if !input.is_empty() {
        return Err(CorruptRecord("trailing bytes"));
    }
    Ok((headers, trailers))
}

fn read_list(input: &mut &[u8], absent: Option<u32>) -> Result<Option<Vec<(HeaderName, HeaderValue)>>, CorruptRecord> {
    let count = read_u32(input)?;
    if Some(count) == absent {
        return Ok(None);
    }
    // Each entry takes at least six bytes, so a count larger than that bound
    // is corrupt; checking first keeps a bad count from reserving memory.
    if count as usize > input.len() / 6 {
        return Err(CorruptRecord("header count exceeds the data"));
    }
    let mut list = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name_len = u16::from_be_bytes(take_array(input)?) as usize;
        let name = HeaderName::from_bytes(take(input, name_len)?).map_err(|_| CorruptRecord("invalid header name"))?;
        let value_len = read_u32(input)? as usize;
        let value =
            HeaderValue::from_bytes(take(input, value_len)?).map_err(|_| CorruptRecord("invalid header value"))?;
        list.push((name, value));
    }
    Ok(Some(list))
}

fn read_u32(input: &mut &[u8]) -> Result<u32, CorruptRecord> {
    Ok(u32::from_be_bytes(take_array(input)?))
}

fn take_array<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], CorruptRecord> {
    let bytes = take(input, N)?;
    let mut array = [0u8; N];
    array.copy_from_slice(bytes);
    Ok(array)
}

fn take<'a>(input: &mut &'a [u8], len: usize) -> Result<&'a [u8], CorruptRecord> {
    if input.len() < len {
        return Err(CorruptRecord("truncated"));
    }
    let (head, tail) = input.split_at(len);
    *input = tail;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &'static str, value: &'static str) -> (HeaderName, HeaderValue) {
        (HeaderName::from_static(name), HeaderValue::from_static(value))
    }

    #[test]
    fn headers_and_trailers_round_trip_in_order() {
        let headers = vec![
            pair("content-type", "application/json"),
            pair("x-a", "1"),
            pair("x-a", "2"),
        ];
        let trailers = vec![pair("grpc-status", "0")];
        let encoded = encode_headers(&headers, Some(&trailers));
        assert_eq!(decode_headers(&encoded).unwrap(), (headers.clone(), Some(trailers)));
        let encoded = encode_headers(&headers, None);
        assert_eq!(decode_headers(&encoded).unwrap(), (headers, None));
    }

    #[test]
    fn non_utf8_header_values_round_trip() {
        let headers = vec![(
            HeaderName::from_static("x-bin"),
            HeaderValue::from_bytes(b"\xff\x80").unwrap(),
        )];
        assert_eq!(decode_headers(&encode_headers(&headers, None)).unwrap().0, headers);
    }

    #[test]
    fn corrupt_blocks_are_errors_not_panics() {
        let good = encode_headers(&[pair("x-a", "1")], None);
        for cut in 0..good.len() {
            assert!(decode_headers(&good[..cut]).is_err(), "prefix {cut}");
        }
        assert!(decode_headers(&[FORMAT, 0xff, 0xff, 0xff, 0xfe]).is_err());
        assert!(decode_headers(&[9]).is_err());
    }

    #[test]
    fn only_allow_listed_storable_headers_are_kept() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        headers.append("x-other", HeaderValue::from_static("1"));
        let kept = allowed_headers(&headers, &[header::CONTENT_TYPE, header::SET_COOKIE]);
        assert_eq!(
            kept,
            vec![(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))]
        );
    }
}
