//! Answers given without running the handler: replays and refusals.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};

use super::admit::Refusal;
use super::Identity;
use crate::body::ResponseBody;
use crate::metrics::{self, Outcome};
use crate::problem::{Problem, Protocol};
use crate::record::StoredResponse;
use crate::service::REPLAYED_HEADER;
use crate::store::Completed;
use crate::store::StoreError;

pub(super) fn replay_or_mismatch<B>(
    completed: Completed,
    identity: &Identity,
    waited: bool,
) -> Response<ResponseBody<B>> {
    if completed.fingerprint != identity.fingerprint {
        return mismatch(identity);
    }
    tracing::debug!(waited, "answered with the stored response");
    let outcome = if waited { Outcome::Waited } else { Outcome::Replayed };
    metrics::count(&identity.metrics_label, outcome);
    replay(completed.response)
}

pub(super) fn mismatch<B>(identity: &Identity) -> Response<ResponseBody<B>> {
    tracing::info!("key reused with a different request");
    metrics::count(&identity.metrics_label, Outcome::Mismatch);
    Problem::FingerprintMismatch.response(
        identity.protocol,
        &format!(
            "the key `{}` was already used with a different request",
            identity.record.key
        ),
    )
}

/// `503` with `Retry-After`: the layer takes no new claims.
pub(super) fn shutting_down<B>(protocol: Protocol, detail: &str) -> Response<ResponseBody<B>> {
    Problem::ShuttingDown.response(protocol, detail)
}

pub(super) fn in_flight<B>(identity: &Identity) -> Response<ResponseBody<B>> {
    tracing::debug!("a request with this key is in flight");
    metrics::count(&identity.metrics_label, Outcome::Conflict);
    Problem::InFlight.response(
        identity.protocol,
        &format!("a request with the key `{}` is being processed", identity.record.key),
    )
}

/// The stored response, marked as a replay.
pub(super) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let body = stored.body.unwrap_or_default();
    let trailers = stored.trailers.map(header_map);
    let mut response = Response::new(ResponseBody::buffered(body, trailers));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

pub(super) fn header_map(pairs: Vec<(HeaderName, HeaderValue)>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        map.append(name, value);
    }
    map
}

/// The answer to a request refused at admission, logged and counted.
pub(super) fn refused<B>(refusal: Refusal, protocol: Protocol, metrics_label: &str) -> Response<ResponseBody<B>> {
    match refusal.problem {
        Problem::InvalidSignature => tracing::info!(detail = %refusal.detail, "signature refused before the claim"),
        _ => tracing::debug!(detail = %refusal.detail, "request refused before the claim"),
    }
    metrics::count(metrics_label, refusal.outcome);
    refusal.problem.response(protocol, &refusal.detail)
}

/// The answer to a store that failed before the handler ran, by what the
/// failure says of the store: down (503, retry), full, or set up wrong
/// (500: a retry cannot help until an operator acts).
pub(super) fn store_failed<B>(identity: &Identity, error: &StoreError) -> Response<ResponseBody<B>> {
    metrics::count(&identity.metrics_label, Outcome::StoreError);
    let problem = match error {
        StoreError::Full => Problem::StoreFull,
        StoreError::Corrupt(_) => Problem::CorruptRecord,
        _ if error.is_misconfiguration() => Problem::StoreMisconfigured,
        _ => Problem::StoreUnavailable,
    };
    match problem {
        Problem::StoreUnavailable | Problem::StoreFull => tracing::error!(%error, "store unavailable; request refused"),
        Problem::CorruptRecord => tracing::error!(
            %error,
            "a stored record is corrupt; inspect it with `idempotency-admin show` and delete it with `idempotency-admin delete` to let the next delivery run"
        ),
        _ => tracing::error!(
            %error,
            "the store is misconfigured; every request with a key fails until it is fixed: run PostgresStore::migrate() (or apply the published schema) and grant the role DML on the records table"
        ),
    }
    let detail = match problem {
        Problem::StoreMisconfigured => {
            format!("{error}; the records table must exist (PostgresStore::migrate()) and the role must hold DML on it")
        }
        _ => error.to_string(),
    };
    problem.response(identity.protocol, &detail)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Empty};

    use super::*;
    use crate::key::RecordKey;

    fn identity() -> Identity {
        Identity {
            record: RecordKey {
                source: "s".to_owned(),
                event_type: String::new(),
                key: "k".to_owned(),
            },
            fingerprint: [0; 32],
            protocol: Protocol::Http,
            metrics_label: Arc::from("s"),
        }
    }

    async fn kind_of(error: StoreError) -> (StatusCode, String) {
        let response: Response<ResponseBody<Empty<Bytes>>> = store_failed(&identity(), &error);
        let status = response.status();
        let body = response.into_body().collect().await.expect("the body").to_bytes();
        let document: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
        (status, document["type"].as_str().unwrap_or_default().to_owned())
    }

    #[tokio::test]
    async fn store_failures_map_to_transient_or_permanent_problems() {
        let cases = [
            (
                StoreError::Timeout(Duration::from_secs(5)),
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
            ),
            (StoreError::Full, StatusCode::SERVICE_UNAVAILABLE, "store-full"),
            (
                StoreError::Corrupt("bad".to_owned()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt-record",
            ),
            (
                StoreError::TableMissing("t".to_owned()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "store-misconfigured",
            ),
        ];
        for (error, status, kind) in cases {
            let what = error.to_string();
            assert_eq!(
                kind_of(error).await,
                (status, format!("urn:tower-idempotency:{kind}")),
                "{what}"
            );
        }
    }
}
