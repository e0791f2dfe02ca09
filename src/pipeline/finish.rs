//! The end of the request path: every answer the layer gives of its own,
//! and every log line and count of how a request ended, from the value the
//! stage that ended it returned.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};

use super::acquire::Unclaimed;
use super::admit::Refusal;
use super::run::{Ran, Release};
use super::{Answer, Identity};
use crate::body::ResponseBody;
use crate::metrics::{self, Outcome};
use crate::problem::{Problem, Protocol};
use crate::record::StoredResponse;
use crate::service::REPLAYED_HEADER;
use crate::store::{Completed, Lookup, StoreError};

/// The answer to a request whose handler does not run.
pub(super) fn unclaimed<B>(identity: &Identity, unclaimed: Unclaimed) -> Response<ResponseBody<B>> {
    match unclaimed {
        Unclaimed::Completed { completed, waited } => replay_or_mismatch(completed, identity, waited),
        Unclaimed::OtherPayload => mismatch(identity),
        Unclaimed::InFlight => in_flight(identity),
        Unclaimed::ShuttingDown => {
            tracing::info!("refused: shutting down, no new claims");
            shutting_down(identity.protocol, "the server is shutting down")
        }
        Unclaimed::StoreFailed(error) => store_failed(identity, &error),
    }
}

/// The answer to a run under a claim, by how it ended.
pub(super) fn ran<B, E>(identity: &Identity, ran: Ran<B, E>) -> Answer<B, E> {
    let label = &identity.metrics_label;
    match ran {
        Ran::Recorded(response) => {
            tracing::info!(status = response.status().as_u16(), "handled and recorded");
            metrics::count(label, Outcome::First);
            Ok(response)
        }
        Ran::FencedOut(response) => {
            tracing::warn!("the claim was taken over before completion; the response was not recorded");
            metrics::count(label, Outcome::FencedOut);
            Ok(response)
        }
        Ran::CompletedElsewhere(found) => {
            tracing::warn!(
                "another request completed this key first, past the advisory lock; this run's writes were rolled back and the key's record answers"
            );
            metrics::count(label, Outcome::CompletedElsewhere);
            Ok(the_first_record(identity, found))
        }
        Ran::CommitFailed(error) => {
            metrics::count(label, Outcome::CommitFailed);
            Ok(commit_failed(identity.protocol, &error))
        }
        Ran::LeftToLease(response, error) => {
            tracing::error!(%error, "the record could not be completed; it is left to its lease");
            metrics::count(label, Outcome::StoreError);
            Ok(response)
        }
        Ran::Streamed(response, ended) => {
            tracing::info!("a streaming response passes through without a record");
            metrics::count(label, Outcome::Streamed);
            if let Err(error) = ended {
                tracing::error!(%error, "could not end the claim of a streaming response; its writes may not have committed");
            }
            Ok(response)
        }
        Ran::Released(why, released) => {
            metrics::count(label, Outcome::Released);
            if let Err(error) = released {
                tracing::warn!(%error, "could not release the claim in time; it is released in the background, or ends with its lease or connection");
            }
            released_answer(identity.protocol, why)
        }
    }
}

/// The answer to a run whose claim was released.
fn released_answer<B, E>(protocol: Protocol, why: Release<B, E>) -> Answer<B, E> {
    let released = |why: &str| tracing::info!(why, "claim released");
    match why {
        Release::NotCommitted(response) => {
            released("the response does not commit");
            Ok(response)
        }
        Release::NotJudged(response) => {
            released("the response could not be judged");
            Ok(response)
        }
        Release::HandlerError(error) => {
            released("the handler returned an error");
            Err(error)
        }
        Release::BodyFailed(error) => {
            released("the response body failed");
            Ok(Problem::HandlerFailed.response(protocol, &format!("the response body could not be read: {error}")))
        }
        Release::Panicked => {
            released("the handler panicked");
            Ok(Problem::HandlerFailed.response(protocol, "the handler panicked"))
        }
        Release::CutOff => {
            released("the handler was cut off by the shutdown");
            Ok(shutting_down(protocol, "the request was cut off by the shutdown"))
        }
    }
}

/// The answer of a run whose record lost to another's: that record, read
/// afresh, answers as it would a duplicate (a replay, or 422 for another
/// payload). Should it be gone or unreadable, nothing of this run was kept,
/// so the client is asked to retry.
fn the_first_record<B>(identity: &Identity, found: Result<Lookup, StoreError>) -> Response<ResponseBody<B>> {
    let other_payload = || {
        Problem::FingerprintMismatch.response(
            identity.protocol,
            &format!("the key `{}` was used with a different request", identity.record.key),
        )
    };
    match found {
        Ok(Lookup::Completed(completed)) if completed.fingerprint == identity.fingerprint => replay(completed.response),
        Ok(Lookup::Completed(_)) => other_payload(),
        Ok(Lookup::InFlight { fingerprint }) if fingerprint != identity.fingerprint => other_payload(),
        Ok(Lookup::InFlight { .. }) => Problem::InFlight.response(
            identity.protocol,
            &format!("a request with the key `{}` is being processed", identity.record.key),
        ),
        Ok(Lookup::Absent) => Problem::CommitFailed.response(
            identity.protocol,
            "another request with this key came first, and its record is gone; retry",
        ),
        Err(error) => Problem::CommitFailed.response(
            identity.protocol,
            &format!("another request with this key came first, and its record could not be read: {error}"),
        ),
    }
}

/// The answer to a transaction that did not commit, by what is known of
/// its outcome.
pub(super) fn commit_failed<B>(protocol: Protocol, error: &StoreError) -> Response<ResponseBody<B>> {
    if matches!(error, StoreError::TransactionInUse) {
        tracing::error!(
            %error,
            "a handler kept its Tx after answering, a bug in the handler: drop every Tx before returning; its writes roll back when it lets go"
        );
        return Problem::TransactionHeld.response(
            protocol,
            "the handler still held the request's transaction after answering; its writes were not committed",
        );
    }
    if error.is_misconfiguration() {
        tracing::error!(%error, "the commit failed on a misconfigured store; the handler's writes were rolled back");
        return Problem::StoreMisconfigured.response(protocol, &format!("the request could not be committed: {error}"));
    }
    if error.commit_outcome_unknown() {
        tracing::error!(
            %error,
            "the commit was sent but not answered: it may have committed; a retry replays the record if it did"
        );
        return Problem::CommitOutcomeUnknown.response(
            protocol,
            &format!(
                "the commit was sent but its outcome is unknown (it may have committed; retry to find out): {error}"
            ),
        );
    }
    tracing::error!(%error, "the transaction did not commit; the handler's writes were rolled back");
    Problem::CommitFailed.response(
        protocol,
        &format!("the request was rolled back and can be retried: {error}"),
    )
}

/// A request without a key goes through unprotected.
pub(super) fn note_without_key(metrics_label: &str) {
    tracing::info!("request without a key passed through unprotected");
    metrics::count(metrics_label, Outcome::MissingKey);
}

/// The store is down and the route fails open: the handler runs unprotected.
pub(super) fn note_fail_open(identity: &Identity, error: &StoreError) {
    tracing::warn!(%error, "store unavailable; running the handler unprotected (fail-open)");
    metrics::count(&identity.metrics_label, Outcome::StoreError);
}

/// The detached task running a protected request did not finish (it
/// panicked outside the handler, or the runtime is shutting down).
pub(super) fn task_failed<B>(protocol: Protocol, error: &tokio::task::JoinError) -> Response<ResponseBody<B>> {
    tracing::error!(%error, "the idempotency task did not finish");
    Problem::HandlerFailed.response(protocol, "the request was cancelled before it finished")
}

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

fn mismatch<B>(identity: &Identity) -> Response<ResponseBody<B>> {
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

fn in_flight<B>(identity: &Identity) -> Response<ResponseBody<B>> {
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
            body_record: None,
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

    /// The status, `type` and `Retry-After` of a problem response.
    async fn problem(response: Response<ResponseBody<Empty<Bytes>>>) -> (StatusCode, String, bool) {
        let status = response.status();
        let retry_after = response.headers().contains_key("retry-after");
        let body = response.into_body().collect().await.expect("the body").to_bytes();
        let document: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
        (
            status,
            document["type"].as_str().unwrap_or_default().to_owned(),
            retry_after,
        )
    }

    #[tokio::test]
    async fn a_handler_holding_its_transaction_is_a_permanent_500() {
        let (status, kind, retry_after) = problem(commit_failed(Protocol::Http, &StoreError::TransactionInUse)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(kind, "urn:tower-idempotency:transaction-held");
        assert!(!retry_after);
    }

    #[tokio::test]
    async fn a_commit_that_timed_out_is_of_unknown_outcome() {
        let timeout = StoreError::Timeout(Duration::from_secs(5));
        let (status, kind, retry_after) = problem(commit_failed(Protocol::Http, &timeout)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(kind, "urn:tower-idempotency:commit-outcome-unknown");
        assert!(retry_after);
    }

    #[tokio::test]
    async fn a_commit_on_a_missing_table_is_a_misconfigured_store() {
        let missing = StoreError::TableMissing("idempotency_records".to_owned());
        let (status, kind, retry_after) = problem(commit_failed(Protocol::Http, &missing)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(kind, "urn:tower-idempotency:store-misconfigured");
        assert!(!retry_after);
    }

    #[tokio::test]
    async fn a_commit_that_never_left_is_rolled_back_and_retryable() {
        let (status, kind, retry_after) = problem(commit_failed(Protocol::Http, &StoreError::ConnectionGone)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(kind, "urn:tower-idempotency:commit-failed");
        assert!(retry_after);
    }
}
