//! The request path, top to bottom: admit (body limit, signature, key) →
//! acquire (fast paths, local in-flight table, claim) → run (the handler
//! under the claim, then commit or release) → the answer.

mod acquire;
mod admit;
mod answer;
mod response;
mod run;
mod store_step;

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower_service::Service;
use tracing::Instrument;

use self::acquire::{acquire, Acquired};
use self::admit::{identify, read_body};
use self::answer::{replay, replay_or_mismatch, shutting_down};
use self::run::run_claimed;
use crate::body::{BoxError, ResponseBody};
use crate::key::{KeyError, RecordKey};
use crate::layer::Config;
use crate::metrics::{self, Outcome};
use crate::problem::{Problem, Protocol};
use crate::record::StoredResponse;
use crate::service::RequestBody;
use crate::service::Shared;
use crate::store::StoreError;

pub(crate) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The identity of a protected request.
pub(crate) struct Identity {
    key: RecordKey,
    fingerprint: [u8; 32],
    protocol: Protocol,
    /// The route's metrics label (never the per-request source).
    metrics_label: Arc<str>,
}

pub(crate) async fn handle<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqBody>,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let protocol = config.protocol_of(request.headers());
    let is_protected = match Protocol::of(request.headers()) {
        // Streaming RPCs must never be buffered: only listed unary methods.
        Protocol::Grpc => config.grpc_methods.iter().any(|method| method == request.uri().path()),
        Protocol::Http => config.protects(request.method()),
    };
    // A route with a verifier checks every request before any other
    // decision, so that what a request claims to be (its method, a
    // gRPC-looking content type) can never route a forgery around the check.
    if !is_protected && config.signature.is_none() {
        return pass_through(inner, request.map(Either::Right)).await;
    }
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts, body, config.max_request_bytes).await {
        Ok(body) => body,
        Err((problem, detail)) => {
            metrics::count(config.metrics_label(), Outcome::Rejected);
            return Ok(problem.response(protocol, &detail));
        }
    };
    if let Some(verifier) = &config.signature {
        if let Err(error) = verifier.verify(&parts, &body, std::time::SystemTime::now()) {
            tracing::info!(%error, "signature refused before the claim");
            metrics::count(config.metrics_label(), Outcome::SignatureRejected);
            return Ok(Problem::InvalidSignature.response(protocol, &error.to_string()));
        }
    }
    if !is_protected {
        let request = Request::from_parts(parts, Either::Left(Full::new(body)));
        return pass_through(inner, request).await;
    }
    let identity = match identify(config, &parts, &body, protocol, &shared.metrics_label) {
        Ok(Some(identity)) => identity,
        Ok(None) => {
            tracing::info!("request without a key passed through unprotected");
            metrics::count(config.metrics_label(), Outcome::MissingKey);
            let request = Request::from_parts(parts, Either::Left(Full::new(body)));
            return pass_through(inner, request).await;
        }
        Err(error) => {
            let problem = match error {
                KeyError::MalformedJson(_) => Problem::MalformedJson,
                KeyError::Missing => Problem::MissingKey,
                _ => Problem::InvalidKey,
            };
            tracing::debug!(%error, "request refused before the claim");
            let outcome = if problem == Problem::MissingKey {
                Outcome::MissingKey
            } else {
                Outcome::Rejected
            };
            metrics::count(config.metrics_label(), outcome);
            return Ok(problem.response(protocol, &error.to_string()));
        }
    };
    let span = tracing::info_span!(
        "idempotency",
        source = %identity.key.source,
        event_type = %identity.key.event_type,
        key = %identity.key.key,
        outcome = tracing::field::Empty,
    );
    // A duplicate answered from the record cache runs nothing that a
    // disconnect could cut off, so it needs no task of its own.
    if let Some(completed) = shared.store.cached(&identity.key) {
        return Ok(span.in_scope(|| replay_or_mismatch(completed, &identity, false)));
    }
    let request = Request::from_parts(parts, Either::Left(Full::new(body)));
    // Boxed once here: the state machine is several KiB, and moving it into
    // the task by value would copy it on every request.
    let protected = Box::pin(protected(shared.clone(), inner, request, identity).instrument(span));
    // Tracked from here, so that a graceful shutdown waits for it.
    let protected = shared.shutdown.track(protected);
    if !shared.config.detach {
        return protected.await;
    }
    // Detached: the handler and its commit run to the end even if this
    // future is dropped (a client disconnect, a timeout layer).
    match tokio::spawn(protected).await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::error!(%error, "the idempotency task did not finish");
            Ok(Problem::HandlerFailed.response(protocol, "the request was cancelled before it finished"))
        }
    }
}

pub(crate) async fn pass_through<S, B, ResBody>(mut inner: S, request: Request<B>) -> Answer<ResBody, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    inner
        .call(request)
        .await
        .map(|response| response.map(ResponseBody::inner))
}

pub(crate) async fn protected<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<RequestBody<ReqBody>>,
    identity: Identity,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    match acquire(&shared, &identity).await {
        Acquired::Claim(claim, holder) => {
            let claim = claim.released_within(shared.config.store_timeout, &shared.shutdown);
            let answer = run_claimed(
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
            answer
        }
        Acquired::Answer(response) => Ok(response),
        Acquired::StoreFailed(error) if shared.config.fail_open && error.is_unavailable() => {
            tracing::warn!(%error, "store unavailable; running the handler unprotected (fail-open)");
            metrics::count(&identity.metrics_label, Outcome::StoreError);
            match shared.shutdown.until_cancelled(pass_through(inner, request)).await {
                Some(answer) => answer,
                None => Ok(shutting_down(
                    identity.protocol,
                    "the request was cut off by the shutdown",
                )),
            }
        }
        Acquired::StoreFailed(error) => {
            metrics::count(&identity.metrics_label, Outcome::StoreError);
            let problem = match error {
                StoreError::Full => Problem::StoreFull,
                StoreError::Corrupt(_) => Problem::CorruptRecord,
                _ if error.is_misconfiguration() => Problem::StoreMisconfigured,
                _ => Problem::StoreUnavailable,
            };
            match problem {
                Problem::StoreUnavailable | Problem::StoreFull => {
                    tracing::error!(%error, "store unavailable; request refused")
                }
                Problem::CorruptRecord => tracing::error!(
                    %error,
                    "a stored record is corrupt; inspect it with `idempotency-admin show` and delete it with `idempotency-admin release` to let the next delivery run"
                ),
                _ => tracing::error!(
                    %error,
                    "the store is misconfigured; every request with a key fails until it is fixed: run PostgresStore::migrate() (or apply the published schema) and grant the role DML on the records table"
                ),
            }
            let detail = match problem {
                Problem::StoreMisconfigured => format!(
                    "{error}; the records table must exist (PostgresStore::migrate()) and the role must hold DML on it"
                ),
                _ => error.to_string(),
            };
            Ok(problem.response(identity.protocol, &detail))
        }
    }
}

/// The pure steps of the request path, for the micro-benchmarks in
/// `benches/` (through `crate::bench`).
#[cfg(feature = "bench-internals")]
pub(crate) mod bench {
    use super::*;

    /// What `identify` reads from a request: its key, if it has one.
    pub(crate) fn identify(config: &Config, parts: &Parts, body: &Bytes) -> Result<Option<String>, KeyError> {
        let protocol = config.protocol_of(&parts.headers);
        let label = Arc::from(config.metrics_label());
        Ok(super::identify(config, parts, body, protocol, &label)?.map(|identity| identity.key.key))
    }

    /// The replay of a stored response.
    pub(crate) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
        super::replay(stored)
    }
}
