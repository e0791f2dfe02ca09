//! [`IdempotencyService`]: the request path, top to bottom.
//!
//! buffer the body → identify (source, event type, key, fingerprint) →
//! fast-path read (for a likely duplicate) → local in-flight check → claim
//! (whose own read answers any other duplicate) → handler → commit or
//! release → answer (first response, replay, or a problem).

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{BoxError, ResponseBody};
use crate::inflight::{Entry, HolderGuard, LocalInFlight};
use crate::key::{self, JsonBody, KeyError, RecordKey, Role};
use crate::layer::Config;
use crate::metrics::{self, Outcome};
use crate::policy::{InFlight, MissingKey, Mode, ResponseDecision};
use crate::problem::{Problem, Protocol};
use crate::record::{allowed_headers, storable_headers, StoredResponse};
use crate::shutdown::Tracker;
use crate::store::{Claim, ClaimOutcome, ClaimRequest, Completed, Completion, Lookup, Store, StoreError};

/// The request body the inner service receives: the buffered body of a
/// protected request, or the untouched body of one that passes through.
pub type RequestBody<B> = Either<Full<Bytes>, B>;

/// The header that marks a replayed response.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Wraps a service so that each key's handler runs once and duplicates get
/// the stored response. Made by [`IdempotencyLayer`](crate::IdempotencyLayer).
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    config: Arc<Config>,
    in_flight: Arc<LocalInFlight>,
    /// The route's bounded `source` label for metrics.
    metrics_label: Arc<str>,
    shutdown: Arc<Tracker>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(
        inner: S,
        store: Store,
        config: Arc<Config>,
        in_flight: Arc<LocalInFlight>,
        shutdown: Arc<Tracker>,
    ) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                store,
                metrics_label: Arc::from(config.metrics_label()),
                config,
                in_flight,
                shutdown,
            }),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("store", &self.shared.store)
            .finish_non_exhaustive()
    }
}

type BoxAnswerFuture<B, E> = Pin<Box<dyn Future<Output = Answer<B, E>> + Send>>;

/// The future of [`IdempotencyService`].
pub struct ResponseFuture<B, E> {
    inner: BoxAnswerFuture<B, E>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Use the service that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            inner: Box::pin(handle(self.shared.clone(), inner, request)),
        }
    }
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The identity of a protected request.
struct Identity {
    key: RecordKey,
    fingerprint: [u8; 32],
    protocol: Protocol,
    /// The route's metrics label (never the per-request source).
    metrics_label: Arc<str>,
}

async fn handle<S, ReqBody, ResBody>(
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

async fn pass_through<S, B, ResBody>(mut inner: S, request: Request<B>) -> Answer<ResBody, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    inner
        .call(request)
        .await
        .map(|response| response.map(ResponseBody::inner))
}

/// Buffers the request body up to the limit: `413` past it, `400` when the
/// body cannot be read.
async fn read_body<B>(parts: &Parts, body: B, limit: usize) -> Result<Bytes, (Problem, String)>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        (
            Problem::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(error) => Err((
            Problem::BodyUnreadable,
            format!("the request body could not be read: {error}"),
        )),
    }
}

/// Reads the source, event type and key, checks them, and fingerprints the
/// request. `Ok(None)`: no key, and the route passes such requests through.
fn identify(
    config: &Config,
    parts: &Parts,
    body: &Bytes,
    protocol: Protocol,
    metrics_label: &Arc<str>,
) -> Result<Option<Identity>, KeyError> {
    let mut json = JsonBody::new(body);
    if config.require_json || config.fingerprint.reads_json() || config.key.reads_json() {
        json.value()?;
    }
    let source = config.source.resolve(parts)?;
    key::validate("source", &source, config.max_key_bytes, false)?;
    let event_type = match &config.event_type {
        Some(extractor) => extractor
            .extract(Role::EventType, parts, body, &mut json)?
            .unwrap_or_default(),
        None => String::new(),
    };
    key::validate("event type", &event_type, config.max_key_bytes, true)?;
    let key = match config.key.extract(Role::Key, parts, body, &mut json)? {
        Some(key) => key,
        None => match config.missing_key {
            MissingKey::Reject => return Err(KeyError::Missing),
            MissingKey::BodyHash => key::body_sha256_hex(body),
            MissingKey::PassThrough => return Ok(None),
        },
    };
    key::validate("key", &key, config.max_key_bytes, false)?;
    let fingerprint = config.fingerprint.digest(parts, body, &mut json)?;
    Ok(Some(Identity {
        key: RecordKey {
            source,
            event_type,
            key,
        },
        fingerprint,
        protocol,
        metrics_label: metrics_label.clone(),
    }))
}

/// How the search for a claim ended.
enum Acquired<B> {
    Claim(Claim, Option<HolderGuard>),
    /// Answered without running the handler: a replay or a refusal.
    Answer(Response<ResponseBody<B>>),
    StoreFailed(StoreError),
}

async fn protected<S, ReqBody, ResBody>(
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

/// Fast-path read, local in-flight check, claim; waits and retries under the
/// wait policy until its deadline.
///
/// The fast path runs for a likely duplicate (cached, or seen completed
/// lately here): one plain read answers it without any lock. Any other
/// request goes straight to the claim, whose read, taken after a try-lock
/// that never waits, answers a duplicate of a completed key just as well;
/// a first delivery so saves the separate read's round trip.
async fn acquire<B>(shared: &Shared, identity: &Identity) -> Acquired<B> {
    let config = &shared.config;
    let deadline = match config.in_flight {
        InFlight::Wait(bound) => Some(Instant::now() + bound),
        InFlight::Conflict => None,
    };
    let mut holder: Option<HolderGuard> = None;
    let mut backoff = Duration::from_millis(5);
    let mut waiting = Waiting::new(identity);
    let mut read_first = shared.store.likely_completed(&identity.key);
    // One claim token for the request, so that a retried claim knows its
    // own; made at the first claim, since a duplicate never needs one.
    let mut request: Option<ClaimRequest> = None;
    loop {
        if read_first {
            match store_step(&shared.store, "lookup", config.store_timeout, || {
                shared.store.lookup(&identity.key)
            })
            .await
            {
                Err(error) => return Acquired::StoreFailed(error),
                Ok(Lookup::Completed(completed)) => {
                    return Acquired::Answer(replay_or_mismatch(completed, identity, waiting.finish()))
                }
                Ok(Lookup::InProgress { fingerprint }) if fingerprint != identity.fingerprint => {
                    return Acquired::Answer(mismatch(identity));
                }
                Ok(Lookup::InProgress { .. } | Lookup::Absent) => {}
            }
        }
        if holder.is_none() {
            match shared.in_flight.enter(&identity.key) {
                Entry::Holder(guard) => holder = Some(guard),
                Entry::Waiter(mut finished) => {
                    if !read_first {
                        // Read the record before answering 409 or waiting:
                        // the local holder may only be checking a key that
                        // is already completed (a duplicate gets its replay,
                        // not 409), and a lease-mode claim is a visible row
                        // (another payload is refused with 422 at once).
                        read_first = true;
                        continue;
                    }
                    let Some(deadline) = deadline else {
                        return Acquired::Answer(in_flight(identity));
                    };
                    waiting.start();
                    // The holder's guard drops when its record is final.
                    if tokio::time::timeout_at(deadline, finished.changed()).await.is_err() {
                        waiting.finish();
                        return Acquired::Answer(in_flight(identity));
                    }
                    tracing::debug!("a local duplicate finished; looking again");
                    // It most likely completed the key.
                    read_first = true;
                    continue;
                }
            }
        }
        if shared.shutdown.is_draining() {
            if !read_first {
                // A plain read still answers a duplicate of a completed key.
                read_first = true;
                continue;
            }
            tracing::info!("refused: shutting down, no new claims");
            return Acquired::Answer(shutting_down(identity.protocol, "the server is shutting down"));
        }
        let request = request.get_or_insert_with(|| {
            ClaimRequest::new(
                identity.key.clone(),
                identity.fingerprint,
                config.mode,
                config.retention,
            )
        });
        match store_step(&shared.store, "claim", config.store_timeout, || {
            shared.store.claim(request.clone())
        })
        .await
        {
            Err(error) => {
                shared
                    .store
                    .release_unknown_claim(request, &error, config.store_timeout, &shared.shutdown);
                return Acquired::StoreFailed(error);
            }
            Ok(ClaimOutcome::Claimed(claim)) => {
                waiting.finish();
                return Acquired::Claim(claim, holder);
            }
            Ok(ClaimOutcome::Completed(completed)) => {
                return Acquired::Answer(replay_or_mismatch(completed, identity, waiting.finish()))
            }
            Ok(ClaimOutcome::InFlight { fingerprint }) => {
                if fingerprint.is_some_and(|fingerprint| fingerprint != identity.fingerprint) {
                    return Acquired::Answer(mismatch(identity));
                }
                let Some(deadline) = deadline else {
                    return Acquired::Answer(in_flight(identity));
                };
                // Held on another instance: wait without a connection.
                let now = Instant::now();
                if now >= deadline {
                    waiting.finish();
                    return Acquired::Answer(in_flight(identity));
                }
                waiting.start();
                tokio::time::sleep_until((now + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
                // The next claim's own read says whether the first finished.
                read_first = false;
            }
        }
    }
}

/// Time a duplicate spent waiting for the first request with its key.
struct Waiting<'a> {
    identity: &'a Identity,
    since: Option<Instant>,
}

impl<'a> Waiting<'a> {
    fn new(identity: &'a Identity) -> Self {
        Self { identity, since: None }
    }

    fn start(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    /// Records the wait, if there was one; says whether there was.
    fn finish(&mut self) -> bool {
        let Some(since) = self.since.take() else {
            return false;
        };
        metrics::wait_duration(&self.identity.metrics_label, since.elapsed());
        true
    }
}

/// Runs one store step under the route's timeout; a step that failed on a
/// dead connection is tried once more on a fresh one.
async fn store_step<T, F, Fut>(
    store: &Store,
    operation: &'static str,
    timeout: Duration,
    mut step: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let result = store_step_once_or_twice(store, timeout, &mut step).await;
    metrics::store_duration(operation, started.elapsed());
    result
}

async fn store_step_once_or_twice<T, F, Fut>(store: &Store, timeout: Duration, step: &mut F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let attempt = tokio::time::timeout(timeout, step())
        .await
        .map_err(|_| StoreError::Timeout(timeout))?;
    match attempt {
        Err(error) if error.is_connection_lost() => {
            tracing::debug!(%error, "store step failed on a dead connection; retrying on a fresh one");
            // One dead connection usually means a restarted server: the idle
            // ones are dead too, and the retry must not pick one of them.
            store.forget_idle_connections();
            tokio::time::timeout(timeout, step())
                .await
                .map_err(|_| StoreError::Timeout(timeout))?
        }
        other => other,
    }
}

fn replay_or_mismatch<B>(completed: Completed, identity: &Identity, waited: bool) -> Response<ResponseBody<B>> {
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
            identity.key.key
        ),
    )
}

/// `503` with `Retry-After`: the layer takes no new claims.
fn shutting_down<B>(protocol: Protocol, detail: &str) -> Response<ResponseBody<B>> {
    Problem::ShuttingDown.response(protocol, detail)
}

fn in_flight<B>(identity: &Identity) -> Response<ResponseBody<B>> {
    tracing::debug!("a request with this key is in flight");
    metrics::count(&identity.metrics_label, Outcome::Conflict);
    Problem::InFlight.response(
        identity.protocol,
        &format!("a request with the key `{}` is being processed", identity.key.key),
    )
}

/// The stored response, marked as a replay.
fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
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

fn header_map(pairs: Vec<(HeaderName, HeaderValue)>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        map.append(name, value);
    }
    map
}

/// What the handler produced.
enum Handled<B> {
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
async fn run_claimed<S, ReqBody, ResBody>(
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
async fn with_renewal<F: Future>(config: &Config, claim: &Claim, handler: F) -> F::Output {
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
            match tokio::time::timeout(config.store_timeout, claim.renew(lease)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tracing::warn!("the lease was taken over while the handler ran; its result will not be recorded")
                }
                Ok(Err(error)) => tracing::warn!(%error, "could not renew the lease"),
                Err(_) => tracing::warn!("renewing the lease timed out"),
            }
        }
    };
    tokio::select! {
        output = handler => output,
        never = renew => never,
    }
}

/// Decides commit or release and, to commit, buffers the body up to the
/// storage limit.
async fn classify<B>(config: &Config, protocol: Protocol, response: Response<B>) -> Result<Handled<B>, BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let decided = response.extensions().get::<ResponseDecision>().copied();
    if protocol == Protocol::Grpc {
        return classify_grpc(config, decided, response).await;
    }
    let commits = decided.map_or_else(
        || config.commit_when.commits(response.status()),
        |d| d == ResponseDecision::Commit,
    );
    if !commits {
        return Ok(Handled::Released(response));
    }
    if is_streaming(config, response.headers()) {
        return Ok(Handled::Streaming(response));
    }
    let (parts, body) = response.into_parts();
    let label = config.metrics_label();
    Ok(
        match buffer(body, config.max_stored_response_bytes, buffer_deadline(config)).await? {
            Buffered::Whole { body, trailers } => Handled::Buffered { parts, body, trailers },
            Buffered::TooLarge(body) => {
                tracing::info!("the response body is over the storage limit; the record keeps its status and headers");
                metrics::unretained(label, "too_large");
                Handled::Unretained { parts, body }
            }
            Buffered::TooSlow(body) => {
                tracing::warn!(
                    timeout = ?config.response_buffer_timeout,
                    "the response body was not read in time; it passes through and the record keeps its status and headers"
                );
                metrics::unretained(label, "too_slow");
                Handled::Unretained { parts, body }
            }
        },
    )
}

/// A gRPC response succeeds with HTTP 200 and `grpc-status: 0`, in the
/// headers of a trailers-only response or else in the trailers, so the body
/// is read before deciding.
async fn classify_grpc<B>(
    config: &Config,
    decided: Option<ResponseDecision>,
    response: Response<B>,
) -> Result<Handled<B>, BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if response.status() != http::StatusCode::OK || decided == Some(ResponseDecision::Release) {
        return Ok(Handled::Released(response));
    }
    let (parts, body) = response.into_parts();
    match buffer(body, config.max_stored_response_bytes, buffer_deadline(config)).await? {
        Buffered::Whole { body, trailers } => {
            let status = grpc_status(&parts.headers).or_else(|| trailers.as_ref().and_then(grpc_status));
            let commits = decided == Some(ResponseDecision::Commit) || status == Some(0);
            Ok(if commits {
                Handled::Buffered { parts, body, trailers }
            } else {
                Handled::ReleasedBuffered { parts, body, trailers }
            })
        }
        Buffered::TooLarge(body) => {
            // Its status is in trailers not yet read: it cannot be judged
            // without buffering it whole, so it is not protected.
            tracing::warn!("a gRPC response over the storage limit passes through; its claim is released");
            metrics::unretained(config.metrics_label(), "too_large");
            Ok(Handled::ReleasedStream(Response::from_parts(parts, body)))
        }
        Buffered::TooSlow(body) => {
            tracing::warn!(
                timeout = ?config.response_buffer_timeout,
                "a gRPC response was not read in time; it passes through and its claim is released"
            );
            metrics::unretained(config.metrics_label(), "too_slow");
            Ok(Handled::ReleasedStream(Response::from_parts(parts, body)))
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A response body read up to a bound.
enum Buffered<B> {
    Whole {
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// What was read, then the rest still streaming.
    TooLarge(ResponseBody<B>),
    /// What was read by the deadline, then the rest still streaming.
    TooSlow(ResponseBody<B>),
}

/// When reading a response to record it must stop.
fn buffer_deadline(config: &Config) -> Instant {
    Instant::now() + config.response_buffer_timeout
}

/// Reads a body up to `limit` bytes and until `deadline`.
async fn buffer<B>(body: B, limit: usize, deadline: Instant) -> Result<Buffered<B>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    // A body of one frame (the usual case) is kept as it came, uncopied;
    // frames are joined only once a second one arrives.
    let mut single = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    let mut trailers: Option<HeaderMap> = None;
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let Some(next) = next_frame(&mut body, &mut timer, deadline).await else {
            let read = joined.map_or(single, BytesMut::freeze);
            return Ok(Buffered::TooSlow(ResponseBody::prefixed(read, body)));
        };
        let Some(frame) = next else { break };
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                match &mut joined {
                    Some(joined) => joined.extend_from_slice(&data),
                    None if single.is_empty() => single = data,
                    None => {
                        let mut both = BytesMut::with_capacity(single.len() + data.len());
                        both.extend_from_slice(&single);
                        both.extend_from_slice(&data);
                        joined = Some(both);
                    }
                }
                let read = joined.as_ref().map_or(single.len(), BytesMut::len);
                if read > limit {
                    let read = joined.map_or(single, BytesMut::freeze);
                    return Ok(Buffered::TooLarge(ResponseBody::prefixed(read, body)));
                }
            }
            Err(frame) => {
                if let Ok(frame_trailers) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(frame_trailers);
                }
            }
        }
    }
    Ok(Buffered::Whole {
        body: joined.map_or(single, BytesMut::freeze),
        trailers,
    })
}

/// The body's next frame, or `None` once `deadline` has passed. The timer
/// is set only once a frame is not ready at once: a body already in memory
/// (the usual case) is read without one.
async fn next_frame<B>(
    body: &mut Pin<Box<B>>,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    deadline: Instant,
) -> Option<Option<Result<http_body::Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if let Some(next) = body.frame().now_or_never() {
        return Some(next.map(|frame| frame.map_err(Into::into)));
    }
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    tokio::select! {
        next = body.frame() => Some(next.map(|frame| frame.map_err(Into::into))),
        () = timer.as_mut() => None,
    }
}

/// Whether the response's media type is one the route streams.
fn is_streaming(config: &Config, headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    config
        .streaming_content_types
        .iter()
        .any(|streaming| streaming.eq_ignore_ascii_case(media_type))
}

/// What a record keeps of a response. An HTTP response keeps its
/// allow-listed headers; a gRPC response keeps all its metadata (headers and
/// trailers), which is part of what a generated client reads, less what is
/// never stored.
fn stored_response(
    config: &Config,
    protocol: Protocol,
    parts: &http::response::Parts,
    body: Option<Bytes>,
    trailers: Option<&HeaderMap>,
) -> StoredResponse {
    let headers = match protocol {
        Protocol::Http => allowed_headers(&parts.headers, &config.replay_headers),
        Protocol::Grpc => storable_headers(&parts.headers),
    };
    StoredResponse {
        status: parts.status,
        headers,
        body,
        trailers: trailers.map(storable_headers),
    }
}

/// Completes the record, then sends the handler's response. In transaction
/// mode a failed commit is `503`: the handler's writes did not land; and
/// where another claimant's record came first, that record is the answer.
/// In lease mode the handler's effects happened whatever the record says, so
/// its response is sent and the failure logged.
async fn commit<B, E>(
    config: &Config,
    store: &Store,
    identity: &Identity,
    claim: Claim,
    stored: &StoredResponse,
    answer: Response<ResponseBody<B>>,
) -> Answer<B, E> {
    let (source, protocol) = (config.metrics_label(), identity.protocol);
    let started = Instant::now();
    let completion = tokio::time::timeout(config.store_timeout, claim.complete(stored))
        .await
        .unwrap_or(Err(StoreError::Timeout(config.store_timeout)));
    metrics::store_duration("complete", started.elapsed());
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
fn commit_failed<B>(protocol: Protocol, error: &StoreError) -> Response<ResponseBody<B>> {
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
async fn end_unrecorded(config: &Config, claim: Claim) {
    tracing::info!("a streaming response passes through without a record");
    metrics::count(config.metrics_label(), Outcome::Streamed);
    let ended = tokio::time::timeout(config.store_timeout, claim.end_unrecorded())
        .await
        .unwrap_or(Err(StoreError::Timeout(config.store_timeout)));
    if let Err(error) = ended {
        tracing::error!(%error, "could not end the claim of a streaming response; its writes may not have committed");
    }
}

/// The answer of a run whose record lost to another's: that record, read
/// afresh, answers as it would a duplicate (a replay, or 422 for another
/// payload). Should it be gone or unreadable, nothing of this run was kept,
/// so the client is asked to retry.
async fn answer_from_the_first_record<B>(
    config: &Config,
    store: &Store,
    identity: &Identity,
) -> Response<ResponseBody<B>> {
    let found = store_step(store, "lookup", config.store_timeout, || store.lookup(&identity.key)).await;
    let other_payload = || {
        Problem::FingerprintMismatch.response(
            identity.protocol,
            &format!("the key `{}` was used with a different request", identity.key.key),
        )
    };
    match found {
        Ok(Lookup::Completed(completed)) if completed.fingerprint == identity.fingerprint => replay(completed.response),
        Ok(Lookup::Completed(_)) => other_payload(),
        Ok(Lookup::InProgress { fingerprint }) if fingerprint != identity.fingerprint => other_payload(),
        Ok(Lookup::InProgress { .. }) => Problem::InFlight.response(
            identity.protocol,
            &format!("a request with the key `{}` is being processed", identity.key.key),
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

async fn release(config: &Config, claim: Claim, why: &str) {
    tracing::info!(why, "claim released");
    metrics::count(config.metrics_label(), Outcome::Released);
    let started = Instant::now();
    let released = claim.release().await;
    metrics::store_duration("release", started.elapsed());
    if let Err(error) = released {
        tracing::warn!(%error, "could not release the claim in time; it is released in the background, or ends with its lease or connection");
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
