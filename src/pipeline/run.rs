//! Running the handler under its claim, then committing or releasing it.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::answer::{replay, shutting_down};
use super::response::{classify, stored_response};
use super::store_step::{store_step, store_step_once};
use super::{Answer, Identity};
use crate::body::{BoxError, ResponseBody};
use crate::layer::Config;
use crate::metrics::{self, Outcome};
use crate::policy::Mode;
use crate::problem::{Problem, Protocol};
use crate::record::StoredResponse;
use crate::service::RequestBody;
use crate::shutdown::Tracker;
use crate::store::{Claim, Completion, Lookup, Store, StoreError};

/// What the handler produced.
pub(super) enum Handled<B> {
    /// Commit with the body fully buffered.
    Buffered {
        parts: http::response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Commit without keeping the body: larger than the limit, or a stream.
    Unretained {
        parts: http::response::Parts,
        body: ResponseBody<B>,
    },
    /// Release the claim and send this response.
    Released(Response<B>),
    /// Release the claim and send this already-read response.
    ReleasedBuffered {
        parts: http::response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Release the claim and send this partly read response.
    ReleasedStream(Response<ResponseBody<B>>),
    /// A streaming response: it passes through without a record.
    Streaming(Response<B>),
}

/// Runs the handler under the claim, then commits or releases.
pub(super) async fn run_claimed<S, ReqBody, ResBody>(
    config: &Config,
    store: &Store,
    shutdown: &Tracker,
    identity: &Identity,
    mut inner: S,
    mut request: Request<RequestBody<ReqBody>>,
    claim: Claim,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let protocol = identity.protocol;
    if let Some(transaction) = claim.transaction() {
        request.extensions_mut().insert(transaction);
    }
    request.extensions_mut().insert(claim.key().clone());
    // The lease is renewed until the response is judged and read, not only
    // while the handler computes its head: a slow body must not outlive it.
    let handled = with_renewal(
        config,
        &claim,
        AssertUnwindSafe(async {
            let response = inner.call(request).await?;
            Ok(classify(config, protocol, response).await)
        })
        .catch_unwind(),
    );
    // Past the shutdown deadline the handler is dropped (and with it its
    // hold on the transaction) before the claim is released.
    let Some(handled) = shutdown.until_cancelled(handled).await else {
        release(config, claim, "the handler was cut off by the shutdown").await;
        shutdown.note_cancelled();
        return Ok(shutting_down(protocol, "the request was cut off by the shutdown"));
    };
    let handled = match handled {
        Ok(Ok(Ok(handled))) => handled,
        Ok(Err(error)) => {
            release(config, claim, "the handler returned an error").await;
            return Err(error);
        }
        Ok(Ok(Err(error))) => {
            release(config, claim, "the response body failed").await;
            return Ok(
                Problem::HandlerFailed.response(protocol, &format!("the response body could not be read: {error}"))
            );
        }
        Err(_panic) => {
            release(config, claim, "the handler panicked").await;
            return Ok(Problem::HandlerFailed.response(protocol, "the handler panicked"));
        }
    };
    match handled {
        Handled::Released(response) => {
            release(config, claim, "the response does not commit").await;
            Ok(response.map(ResponseBody::inner))
        }
        Handled::ReleasedBuffered { parts, body, trailers } => {
            release(config, claim, "the response does not commit").await;
            Ok(Response::from_parts(parts, ResponseBody::buffered(body, trailers)))
        }
        Handled::ReleasedStream(response) => {
            release(config, claim, "the response could not be judged").await;
            Ok(response)
        }
        Handled::Buffered { parts, body, trailers } => {
            let stored = stored_response(config, protocol, &parts, Some(body.clone()), trailers.as_ref());
            let answer = Response::from_parts(parts, ResponseBody::buffered(body, trailers));
            commit(config, store, identity, claim, &stored, answer).await
        }
        Handled::Unretained { parts, body } => {
            let stored = stored_response(config, protocol, &parts, None, None);
            commit(
                config,
                store,
                identity,
                claim,
                &stored,
                Response::from_parts(parts, body),
            )
            .await
        }
        Handled::Streaming(response) => {
            end_unrecorded(config, claim).await;
            Ok(response.map(ResponseBody::inner))
        }
    }
}

/// Polls the handler, renewing the lease alongside it in lease mode.
pub(super) async fn with_renewal<F: Future>(config: &Config, claim: &Claim, handler: F) -> F::Output {
    let Mode::Lease { lease, renew_every } = config.mode else {
        return handler.await;
    };
    if renew_every.is_zero() {
        // No renewal asked for (a zero interval would spin).
        return handler.await;
    }
    let renew = async {
        loop {
            tokio::time::sleep(renew_every).await;
            match store_step_once("renew", Some(config.store_timeout), claim.renew(lease)).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the lease was taken over while the handler ran; its result will not be recorded")
                }
                Err(error) => tracing::warn!(%error, "could not renew the lease"),
            }
        }
    };
    tokio::select! {
        output = handler => output,
        never = renew => never,
    }
}

/// Completes the record, then sends the handler's response. In transaction
/// mode a failed commit is `503`: the handler's writes did not land; and
/// where another claimant's record came first, that record is the answer.
/// In lease mode the handler's effects happened whatever the record says, so
/// its response is sent and the failure logged.
pub(super) async fn commit<B, E>(
    config: &Config,
    store: &Store,
    identity: &Identity,
    claim: Claim,
    stored: &StoredResponse,
    answer: Response<ResponseBody<B>>,
) -> Answer<B, E> {
    let (source, protocol) = (config.metrics_label(), identity.protocol);
    let completion = store_step_once("complete", Some(config.store_timeout), claim.complete(stored)).await;
    match (completion, config.mode) {
        (Ok(Completion::Recorded), _) => {
            tracing::info!(status = stored.status.as_u16(), "handled and recorded");
            metrics::count(source, Outcome::First);
            Ok(answer)
        }
        (Ok(Completion::FencedOut), _) => {
            tracing::warn!("the claim was taken over before completion; the response was not recorded");
            metrics::count(source, Outcome::FencedOut);
            Ok(answer)
        }
        (Ok(Completion::CompletedElsewhere), _) => {
            tracing::warn!(
                "another request completed this key first, past the advisory lock; this run's writes were rolled back and the key's record answers"
            );
            metrics::count(source, Outcome::CompletedElsewhere);
            Ok(answer_from_the_first_record(config, store, identity).await)
        }
        (Err(error), Mode::Transaction) => {
            metrics::count(source, Outcome::CommitFailed);
            Ok(commit_failed(protocol, &error))
        }
        (Err(error), Mode::Lease { .. }) => {
            tracing::error!(%error, "the record could not be completed; it is left to its lease");
            metrics::count(source, Outcome::StoreError);
            Ok(answer)
        }
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

/// Ends a claim whose response streams: nothing is recorded, and the
/// request counts as unprotected (its transaction's writes commit).
pub(super) async fn end_unrecorded(config: &Config, claim: Claim) {
    tracing::info!("a streaming response passes through without a record");
    metrics::count(config.metrics_label(), Outcome::Streamed);
    let ended = store_step_once("release", Some(config.store_timeout), claim.end_unrecorded()).await;
    if let Err(error) = ended {
        tracing::error!(%error, "could not end the claim of a streaming response; its writes may not have committed");
    }
}

/// The answer of a run whose record lost to another's: that record, read
/// afresh, answers as it would a duplicate (a replay, or 422 for another
/// payload). Should it be gone or unreadable, nothing of this run was kept,
/// so the client is asked to retry.
pub(super) async fn answer_from_the_first_record<B>(
    config: &Config,
    store: &Store,
    identity: &Identity,
) -> Response<ResponseBody<B>> {
    let found = store_step(store, "lookup", config.store_timeout, || store.lookup(&identity.record)).await;
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

pub(super) async fn release(config: &Config, claim: Claim, why: &str) {
    tracing::info!(why, "claim released");
    metrics::count(config.metrics_label(), Outcome::Released);
    // The release bounds its own wait (the route's store timeout) and goes
    // on in the background past it.
    let released = store_step_once("release", None, claim.release()).await;
    if let Err(error) = released {
        tracing::warn!(%error, "could not release the claim in time; it is released in the background, or ends with its lease or connection");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;
    use http_body_util::{BodyExt, Empty};

    use super::*;

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
