//! The request path, top to bottom: admit (body limit, signature, key) →
//! acquire (fast paths, local in-flight table, claim) → run (the handler
//! under the claim, then commit or release) → finish (the answer, with its
//! log line and count). Each stage returns a value; only `finish` logs,
//! counts and renders.

mod acquire;
mod admit;
mod finish;
mod response;
mod run;
mod store_step;

use std::sync::Arc;

use http::{Request, Response};
use tower_service::Service;
use tracing::Instrument;

use self::acquire::{acquire, Acquired, Unclaimed};
use self::admit::{admit, Admission};
use self::run::run_claimed;
use crate::body::{BytesBody, ResponseBody};
use crate::key::RecordKey;
use crate::metrics;
use crate::problem::Protocol;
use crate::service::RequestBody;
use crate::service::Shared;

pub(crate) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The identity of a protected request.
pub(crate) struct Identity {
    record: RecordKey,
    /// The body's record, claimed with `record` on a route with the
    /// body-hash guard.
    body_record: Option<RecordKey>,
    fingerprint: [u8; 32],
    protocol: Protocol,
    /// The route's metrics label (never the per-request source).
    metrics_label: Arc<str>,
}

/// The request path: admit → (a cached replay) → acquire → run → answer.
pub(crate) async fn handle<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqBody>,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: BytesBody + Send + 'static,
    ResBody: BytesBody + Send + 'static,
{
    let protocol = shared.config.protocol_of(request.headers());
    let (request, identity) = match admit(&shared.config, &shared.metrics_label, protocol, request).await {
        Admission::Protected(request, identity) => (request, identity),
        Admission::PassThrough(request) => return pass_through(inner, request).await,
        Admission::WithoutKey(request) => {
            finish::note_without_key(&shared.metrics_label);
            return pass_through(inner, request).await;
        }
        Admission::Refused(refusal) => return Ok(finish::refused(refusal, protocol, &shared.metrics_label)),
    };
    let span = tracing::info_span!(
        "idempotency",
        source = %identity.record.source,
        event_type = %identity.record.event_type,
        key = %identity.record.key,
        outcome = tracing::field::Empty,
    );
    // A duplicate answered from the record cache runs nothing that a
    // disconnect could cut off, so it needs no task of its own.
    if let Some(completed) = shared.store.cached(&identity.record) {
        return Ok(span.in_scope(|| finish::replay_or_mismatch(completed, &identity, false)));
    }
    // Boxed once here: the state machine is several KiB, and moving it into
    // the task by value would copy it on every request. Tracked from here,
    // so that a graceful shutdown waits for it.
    let protected = Box::pin(protected(shared.clone(), inner, request, identity).instrument(span));
    let protected = shared.shutdown.track(protected);
    if !shared.config.detach_on_disconnect {
        return protected.await;
    }
    // Detached: the handler and its commit run to the end even if this
    // future is dropped (a client disconnect, a timeout layer).
    match tokio::spawn(protected).await {
        Ok(answer) => answer,
        Err(error) => Ok(finish::task_failed(protocol, &error)),
    }
}

/// Runs a request the layer does not protect.
pub(crate) async fn pass_through<S, B, ResBody>(mut inner: S, request: Request<B>) -> Answer<ResBody, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    inner
        .call(request)
        .await
        .map(|response| response.map(ResponseBody::inner))
}

/// A protected request once admitted: acquire its key, then run the handler
/// under the claim, or answer without running it.
pub(crate) async fn protected<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<RequestBody<ReqBody>>,
    identity: Identity,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: BytesBody + Send + 'static,
{
    match acquire(&shared, &identity).await {
        Acquired::Claim(claim, holder) => {
            let in_flight = metrics::Occupancy::in_flight(&identity.metrics_label);
            let claim = claim.released_within(shared.config.store_timeout, &shared.shutdown);
            let ran = run_claimed(
                &shared.config,
                &shared.store,
                &shared.shutdown,
                &identity,
                inner,
                request,
                claim,
            )
            .await;
            // Local waiters wake only once the record is final.
            drop(holder);
            drop(in_flight);
            finish::ran(&identity, ran)
        }
        Acquired::Unclaimed(Unclaimed::StoreFailed(error)) if shared.config.fail_open && error.is_unavailable() => {
            finish::note_fail_open(&identity, &error);
            match shared.shutdown.until_cancelled(pass_through(inner, request)).await {
                Some(answer) => answer,
                None => Ok(finish::shutting_down(
                    identity.protocol,
                    "the request was cut off by the shutdown",
                )),
            }
        }
        Acquired::Unclaimed(unclaimed) => Ok(finish::unclaimed(&identity, unclaimed)),
    }
}

/// The pure steps of the request path, for the micro-benchmarks in
/// `benches/` (through `crate::bench`).
#[cfg(feature = "bench-internals")]
pub(crate) mod bench {
    use bytes::Bytes;
    use http::request::Parts;

    use super::*;
    use crate::key::KeyError;
    use crate::layer::Config;
    use crate::record::StoredResponse;

    /// What `identify` reads from a request: its key, if it has one.
    pub(crate) fn identify(config: &Config, parts: &Parts, body: &Bytes) -> Result<Option<String>, KeyError> {
        let protocol = config.protocol_of(&parts.headers);
        let label = Arc::from(config.metrics_label());
        Ok(admit::identify(config, parts, body, protocol, &label)?.map(|identity| identity.record.key))
    }

    /// The replay of a stored response.
    pub(crate) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
        finish::replay(stored)
    }
}
