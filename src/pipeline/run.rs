//! Running the handler under its claim, then committing or releasing it.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Request, Response};
use tower_service::Service;

use super::response::{classify, stored_response};
use super::store_step::{store_step, store_step_once};
use super::Identity;
use crate::body::{BoxError, BytesBody, ResponseBody};
use crate::layer::Config;
use crate::policy::Mode;
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

/// How a run under a claim ended, for [`finish::ran`](super::finish::ran)
/// to log, count and answer.
pub(super) enum Ran<B, E> {
    /// The record was completed with the handler's response.
    Recorded(Response<ResponseBody<B>>),
    /// The claim was taken over before completion: nothing was recorded.
    FencedOut(Response<ResponseBody<B>>),
    /// Another request completed the key first, past the advisory lock: this
    /// run's writes rolled back, and the key's record, read afresh, answers.
    CompletedElsewhere(Result<Lookup, StoreError>),
    /// Transaction mode: the commit failed, so the handler's writes did not
    /// land.
    CommitFailed(StoreError),
    /// Lease mode: the handler's effects happened, but its record could not
    /// be completed; the record is left to its lease.
    LeftToLease(Response<ResponseBody<B>>, StoreError),
    /// A streaming response passes through without a record; the claim's
    /// end may have failed.
    Streamed(Response<ResponseBody<B>>, Result<(), StoreError>),
    /// The claim was released, for this reason; the release may have
    /// failed to finish in time.
    Released(Release<B, E>, Result<(), StoreError>),
}

/// Why a claim was released, with what answers the request.
pub(super) enum Release<B, E> {
    /// The response is not one that commits (by the route's policy).
    NotCommitted(Response<ResponseBody<B>>),
    /// The response could not be judged (a gRPC status past the limit).
    NotJudged(Response<ResponseBody<B>>),
    /// The handler returned an error.
    HandlerError(E),
    /// The response body failed while it was read.
    BodyFailed(BoxError),
    /// The handler panicked.
    Panicked,
    /// The graceful shutdown's deadline cut the handler off.
    CutOff,
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
) -> Ran<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: BytesBody + Send + 'static,
{
    let protocol = identity.protocol;
    claim.lend_transaction(request.extensions_mut());
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
        let released = release(claim).await;
        shutdown.note_cancelled();
        return Ran::Released(Release::CutOff, released);
    };
    let handled = match handled {
        Ok(Ok(Ok(handled))) => handled,
        Ok(Err(error)) => return Ran::Released(Release::HandlerError(error), release(claim).await),
        Ok(Ok(Err(error))) => return Ran::Released(Release::BodyFailed(error), release(claim).await),
        Err(_panic) => return Ran::Released(Release::Panicked, release(claim).await),
    };
    match handled {
        Handled::Released(response) => {
            let response = response.map(ResponseBody::inner);
            Ran::Released(Release::NotCommitted(response), release(claim).await)
        }
        Handled::ReleasedBuffered { parts, body, trailers } => {
            let response = Response::from_parts(parts, ResponseBody::buffered(body, trailers));
            Ran::Released(Release::NotCommitted(response), release(claim).await)
        }
        Handled::ReleasedStream(response) => Ran::Released(Release::NotJudged(response), release(claim).await),
        Handled::Buffered { parts, body, trailers } => {
            let stored = stored_response(config, protocol, &parts, Some(body.clone()), trailers.as_ref());
            let answer = Response::from_parts(parts, ResponseBody::buffered(body, trailers));
            commit(config, store, identity, claim, &stored, answer).await
        }
        Handled::Unretained { parts, body } => {
            let stored = stored_response(config, protocol, &parts, None, None);
            let answer = Response::from_parts(parts, body);
            commit(config, store, identity, claim, &stored, answer).await
        }
        Handled::Streaming(response) => {
            let ended = store_step_once("release", Some(config.store_timeout), claim.end_unrecorded()).await;
            Ran::Streamed(response.map(ResponseBody::inner), ended)
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

/// Completes the record. In transaction mode a failed commit means the
/// handler's writes did not land; in lease mode the handler's effects
/// happened whatever the record says, so its response is still sent.
async fn commit<B, E>(
    config: &Config,
    store: &Store,
    identity: &Identity,
    claim: Claim,
    stored: &StoredResponse,
    answer: Response<ResponseBody<B>>,
) -> Ran<B, E> {
    let completion = store_step_once("complete", Some(config.store_timeout), claim.complete(stored)).await;
    match (completion, config.mode) {
        (Ok(Completion::Recorded), _) => Ran::Recorded(answer),
        (Ok(Completion::FencedOut), _) => Ran::FencedOut(answer),
        (Ok(Completion::CompletedElsewhere), _) => {
            let found = store_step(store, "lookup", config.store_timeout, || store.lookup(&identity.record)).await;
            Ran::CompletedElsewhere(found)
        }
        (Err(error), Mode::Transaction) => Ran::CommitFailed(error),
        (Err(error), Mode::Lease { .. }) => Ran::LeftToLease(answer, error),
    }
}

/// Releases the claim. The release bounds its own wait (the route's store
/// timeout) and goes on in the background past it.
async fn release(claim: Claim) -> Result<(), StoreError> {
    store_step_once("release", None, claim.release()).await
}
