//! The layer's own error responses: RFC 9457 `application/problem+json` for
//! HTTP, trailers-only responses with a `grpc-status` for gRPC.
//!
//! Each kind of error has a stable `type` URI and gRPC code; clients may
//! match on them.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::ResponseBody;

/// The kinds of error the layer answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    /// 413: the request body is over the route's limit.
    PayloadTooLarge,
    /// 400: the request body could not be read.
    BodyUnreadable,
    /// 400: the body is not valid JSON on a route that reads JSON.
    MalformedJson,
    /// 401: the request's signature is missing, stale or wrong.
    InvalidSignature,
    /// 400: no key on a route that requires one.
    MissingKey,
    /// 400: the key, event type or source is invalid.
    InvalidKey,
    /// 409: a request with this key is in flight.
    InFlight,
    /// 422: the key was used with another payload.
    FingerprintMismatch,
    /// 503: the store did not answer in time or at all.
    StoreUnavailable,
    /// 503: the handler ran but its transaction could not commit.
    CommitFailed,
    /// 503: the in-memory store is full of live records.
    StoreFull,
    /// 503: the layer is shutting down and takes no new claims, or cut this
    /// request off at its deadline.
    ShuttingDown,
    /// 500: the handler panicked or was cancelled.
    HandlerFailed,
    /// 500: a stored record could not be decoded.
    CorruptRecord,
    /// 500: the store is set up wrong (the records table is missing, or the
    /// role lacks a privilege); retrying will not help until an operator
    /// fixes it.
    StoreMisconfigured,
    /// 500: the handler still held the request's transaction after it
    /// answered, a bug in the handler; its writes were rolled back.
    TransactionHeld,
    /// 503: the commit was sent but its answer never came: it may have
    /// committed. A retry replays the record if it did, or runs afresh.
    CommitOutcomeUnknown,
}

/// The protocol a request speaks, which decides the shape of an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    /// gRPC is `application/grpc`, alone or followed by `+codec` or
    /// parameters; `application/grpc-web` is not gRPC (its trailers live in
    /// the body).
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let is_grpc = headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("application/grpc"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'));
        if is_grpc {
            Protocol::Grpc
        } else {
            Protocol::Http
        }
    }
}

/// gRPC status codes the layer answers with.
pub(crate) mod grpc_code {
    pub(crate) const INVALID_ARGUMENT: u16 = 3;
    pub(crate) const RESOURCE_EXHAUSTED: u16 = 8;
    pub(crate) const FAILED_PRECONDITION: u16 = 9;
    pub(crate) const ABORTED: u16 = 10;
    pub(crate) const INTERNAL: u16 = 13;
    pub(crate) const UNAVAILABLE: u16 = 14;
    pub(crate) const UNAUTHENTICATED: u16 = 16;
}

/// Seconds a client should wait before retrying an in-flight key.
pub(crate) const IN_FLIGHT_RETRY_AFTER: u32 = 1;
/// Seconds a client should wait before retrying when the store is down.
pub(crate) const STORE_RETRY_AFTER: u32 = 2;

impl Problem {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Problem::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::BodyUnreadable | Problem::MalformedJson | Problem::MissingKey | Problem::InvalidKey => {
                StatusCode::BAD_REQUEST
            }
            Problem::InvalidSignature => StatusCode::UNAUTHORIZED,
            Problem::InFlight => StatusCode::CONFLICT,
            Problem::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::StoreUnavailable
            | Problem::CommitFailed
            | Problem::StoreFull
            | Problem::CommitOutcomeUnknown
            | Problem::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Problem::HandlerFailed
            | Problem::CorruptRecord
            | Problem::StoreMisconfigured
            | Problem::TransactionHeld => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code of this kind.
    pub(crate) fn grpc_code(self) -> u16 {
        use grpc_code::*;
        match self {
            Problem::PayloadTooLarge => RESOURCE_EXHAUSTED,
            Problem::BodyUnreadable | Problem::MalformedJson | Problem::MissingKey | Problem::InvalidKey => {
                INVALID_ARGUMENT
            }
            Problem::InvalidSignature => UNAUTHENTICATED,
            Problem::InFlight => ABORTED,
            Problem::FingerprintMismatch => FAILED_PRECONDITION,
            Problem::StoreUnavailable
            | Problem::CommitFailed
            | Problem::StoreFull
            | Problem::CommitOutcomeUnknown
            | Problem::ShuttingDown => UNAVAILABLE,
            Problem::HandlerFailed
            | Problem::CorruptRecord
            | Problem::TransactionHeld
            | Problem::StoreMisconfigured => INTERNAL,
        }
    }

    /// The stable `type` URI of this kind.
    pub(crate) fn type_uri(self) -> &'static str {
        match self {
            Problem::PayloadTooLarge => "urn:tower-idempotency:payload-too-large",
            Problem::BodyUnreadable => "urn:tower-idempotency:body-unreadable",
            Problem::MalformedJson => "urn:tower-idempotency:malformed-json",
            Problem::InvalidSignature => "urn:tower-idempotency:invalid-signature",
            Problem::MissingKey => "urn:tower-idempotency:missing-key",
            Problem::InvalidKey => "urn:tower-idempotency:invalid-key",
            Problem::InFlight => "urn:tower-idempotency:in-flight",
            Problem::FingerprintMismatch => "urn:tower-idempotency:fingerprint-mismatch",
            Problem::StoreUnavailable => "urn:tower-idempotency:store-unavailable",
            Problem::CommitFailed => "urn:tower-idempotency:commit-failed",
            Problem::StoreFull => "urn:tower-idempotency:store-full",
            Problem::ShuttingDown => "urn:tower-idempotency:shutting-down",
            Problem::HandlerFailed => "urn:tower-idempotency:handler-failed",
            Problem::CorruptRecord => "urn:tower-idempotency:corrupt-record",
            Problem::StoreMisconfigured => "urn:tower-idempotency:store-misconfigured",
            Problem::TransactionHeld => "urn:tower-idempotency:transaction-held",
            Problem::CommitOutcomeUnknown => "urn:tower-idempotency:commit-outcome-unknown",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Problem::PayloadTooLarge => "Request body too large",
            Problem::BodyUnreadable => "Request body could not be read",
            Problem::MalformedJson => "Request body is not valid JSON",
            Problem::InvalidSignature => "Request signature invalid",
            Problem::MissingKey => "Idempotency key missing",
            Problem::InvalidKey => "Idempotency key invalid",
            Problem::InFlight => "A request with this key is in flight",
            Problem::FingerprintMismatch => "Idempotency key reused with a different request",
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::CommitFailed => "The request could not be committed",
            Problem::StoreFull => "Idempotency store full",
            Problem::ShuttingDown => "Shutting down",
            Problem::HandlerFailed => "The request handler failed",
            Problem::CorruptRecord => "Stored response unreadable",
            Problem::StoreMisconfigured => "Idempotency store misconfigured",
            Problem::TransactionHeld => "The handler kept its transaction after answering",
            Problem::CommitOutcomeUnknown => "The outcome of the commit is unknown",
        }
    }

    fn retry_after(self) -> Option<u32> {
        match self {
            Problem::InFlight => Some(IN_FLIGHT_RETRY_AFTER),
            Problem::StoreUnavailable
            | Problem::CommitFailed
            | Problem::StoreFull
            | Problem::CommitOutcomeUnknown
            | Problem::ShuttingDown => Some(STORE_RETRY_AFTER),
            _ => None,
        }
    }

    /// The JSON document of this problem.
    pub(crate) fn body(self, detail: &str) -> Bytes {
        let document = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
        });
        Bytes::from(document.to_string())
    }

    /// The full response in the request's protocol.
    pub(crate) fn response<B>(self, protocol: Protocol, detail: &str) -> Response<ResponseBody<B>> {
        match protocol {
            Protocol::Http => self.http_response(detail),
            Protocol::Grpc => self.grpc_response(detail),
        }
    }

    /// A trailers-only gRPC response: HTTP 200 and the status in the
    /// headers, as `tonic::Status::into_http` makes it.
    fn grpc_response<B>(self, detail: &str) -> Response<ResponseBody<B>> {
        let mut response = Response::new(ResponseBody::buffered(Bytes::new(), None));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from(self.grpc_code()),
        );
        if let Ok(message) = HeaderValue::from_str(&percent_encode(detail)) {
            headers.insert(HeaderName::from_static("grpc-message"), message);
        }
        if let Some(seconds) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
            headers.insert(
                HeaderName::from_static("grpc-retry-pushback-ms"),
                HeaderValue::from(u64::from(seconds) * 1000),
            );
        }
        response
    }

    /// The full response, with `Retry-After` where a retry may succeed.
    fn http_response<B>(self, detail: &str) -> Response<ResponseBody<B>> {
        let mut response = Response::new(ResponseBody::buffered(self.body(detail), None));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Percent-encodes a `grpc-message` as the gRPC spec asks: every byte
/// outside printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_problems_are_trailers_only_responses() {
        let response = Problem::FingerprintMismatch.response::<()>(Protocol::Grpc, "key `k` reused: 100%");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "9");
        assert_eq!(response.headers()["grpc-message"], "key `k` reused: 100%25");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
    }

    #[test]
    fn only_application_grpc_content_types_are_grpc() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("application/grpc", Protocol::Grpc),
            ("application/grpc+proto", Protocol::Grpc),
            ("application/grpc;charset=utf-8", Protocol::Grpc),
            ("application/grpc-web", Protocol::Http),
            ("application/json", Protocol::Http),
        ] {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(Protocol::of(&headers), expected, "{value}");
        }
    }

    #[test]
    fn problems_are_rfc9457_documents() {
        let body = Problem::InFlight.body("key k is in flight");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["type"], "urn:tower-idempotency:in-flight");
        assert_eq!(value["status"], 409);
        assert_eq!(value["detail"], "key k is in flight");
        let response = Problem::InFlight.response::<()>(Protocol::Http, "x");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }
}
