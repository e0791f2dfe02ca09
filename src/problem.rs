//! The layer's own error responses: RFC 9457 `application/problem+json`.
//!
//! Each kind of error has a stable `type` URI; clients may match on it.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
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
    /// 500: the handler panicked or was cancelled.
    HandlerFailed,
    /// 500: a stored record could not be decoded.
    CorruptRecord,
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
            Problem::InFlight => StatusCode::CONFLICT,
            Problem::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::StoreUnavailable | Problem::CommitFailed | Problem::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Problem::HandlerFailed | Problem::CorruptRecord => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `type` URI of this kind.
    pub(crate) fn type_uri(self) -> &'static str {
        match self {
            Problem::PayloadTooLarge => "urn:tower-idempotency:payload-too-large",
            Problem::BodyUnreadable => "urn:tower-idempotency:body-unreadable",
            Problem::MalformedJson => "urn:tower-idempotency:malformed-json",
            Problem::MissingKey => "urn:tower-idempotency:missing-key",
            Problem::InvalidKey => "urn:tower-idempotency:invalid-key",
            Problem::InFlight => "urn:tower-idempotency:in-flight",
            Problem::FingerprintMismatch => "urn:tower-idempotency:fingerprint-mismatch",
            Problem::StoreUnavailable => "urn:tower-idempotency:store-unavailable",
            Problem::CommitFailed => "urn:tower-idempotency:commit-failed",
            Problem::StoreFull => "urn:tower-idempotency:store-full",
            Problem::HandlerFailed => "urn:tower-idempotency:handler-failed",
            Problem::CorruptRecord => "urn:tower-idempotency:corrupt-record",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Problem::PayloadTooLarge => "Request body too large",
            Problem::BodyUnreadable => "Request body could not be read",
            Problem::MalformedJson => "Request body is not valid JSON",
            Problem::MissingKey => "Idempotency key missing",
            Problem::InvalidKey => "Idempotency key invalid",
            Problem::InFlight => "A request with this key is in progress",
            Problem::FingerprintMismatch => "Idempotency key reused with a different request",
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::CommitFailed => "The request could not be committed",
            Problem::StoreFull => "Idempotency store full",
            Problem::HandlerFailed => "The request handler failed",
            Problem::CorruptRecord => "Stored response unreadable",
        }
    }

    fn retry_after(self) -> Option<u32> {
        match self {
            Problem::InFlight => Some(IN_FLIGHT_RETRY_AFTER),
            Problem::StoreUnavailable | Problem::CommitFailed | Problem::StoreFull => Some(STORE_RETRY_AFTER),
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

    /// The full response, with `Retry-After` where a retry may succeed.
    pub(crate) fn response<B>(self, detail: &str) -> Response<ResponseBody<B>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_rfc9457_documents() {
        let body = Problem::InFlight.body("key k is in flight");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["type"], "urn:tower-idempotency:in-flight");
        assert_eq!(value["status"], 409);
        assert_eq!(value["detail"], "key k is in flight");
        let response = Problem::InFlight.response::<()>("x");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }
}
