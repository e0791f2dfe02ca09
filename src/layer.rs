//! [`IdempotencyLayer`]: the per-route configuration, copied into each
//! [`IdempotencyService`] it wraps.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, CONTENT_TYPE};
use http::request::Parts;
use http::{Method, StatusCode};
use tower_layer::Layer;

use crate::fingerprint::Fingerprint;
use crate::inflight::LocalInFlight;
use crate::key::{Extractor, Source};
use crate::policy::{CommitWhen, InFlight, MissingKey, Mode};
use crate::problem::Protocol;
use crate::service::IdempotencyService;
use crate::shutdown::{ShutdownHandle, Tracker};
use crate::signature::VerifySignature;
use crate::store::Store;

/// Default request body limit: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Default limit on a stored response body: 1 MiB.
pub const DEFAULT_MAX_STORED_RESPONSE_BYTES: usize = 1024 * 1024;
/// Default key length limit: 255 bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 255;
/// Default retention of a completed record: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Default bound on each store step: 5 seconds.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on reading a response body to record it: 30 seconds.
pub const DEFAULT_RESPONSE_BUFFER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest duration a layer accepts for any of its settings (retention,
/// leases, waits, timeouts): 100 years. Longer ones would overflow clocks
/// and timestamps at request time, so the layer refuses them when built.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A [`Layer`] that makes the services it wraps idempotent.
///
/// Configure one per route (or group of routes sharing a source) with the
/// builder methods; every method takes and returns the layer by value.
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::post, Router};
/// use tower_idempotency::{Extractor, IdempotencyLayer, InFlight, MemoryStore};
///
/// let store = MemoryStore::new(10_000);
/// let stripe = IdempotencyLayer::new(store)
///     .source("stripe")
///     .key(Extractor::json("/id").unwrap())
///     .event_type(Extractor::json("/type").unwrap())
///     .in_flight(InFlight::Wait(Duration::from_secs(10)));
/// let app: Router = Router::new()
///     .route("/webhooks/stripe", post(|| async { "ok" }))
///     .route_layer(stripe);
/// # let _ = app;
/// ```
#[derive(Clone, Debug)]
pub struct IdempotencyLayer {
    store: Store,
    config: Arc<Config>,
    in_flight: Arc<LocalInFlight>,
    shutdown: Arc<Tracker>,
}

/// Everything a route configures.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) source: Source,
    pub(crate) key: Extractor,
    pub(crate) event_type: Option<Extractor>,
    pub(crate) missing_key: MissingKey,
    pub(crate) in_flight: InFlight,
    pub(crate) commit_when: CommitWhen,
    pub(crate) max_request_bytes: usize,
    pub(crate) max_key_bytes: usize,
    pub(crate) max_stored_response_bytes: usize,
    pub(crate) replay_headers: Vec<HeaderName>,
    pub(crate) retention: Duration,
    pub(crate) mode: Mode,
    pub(crate) detach_on_disconnect: bool,
    pub(crate) fail_open: bool,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) json_body: bool,
    pub(crate) body_hash_guard: bool,
    pub(crate) methods: Option<Vec<Method>>,
    pub(crate) store_timeout: Duration,
    pub(crate) grpc_methods: Vec<String>,
    pub(crate) signature: Option<Arc<dyn VerifySignature>>,
    pub(crate) metrics_label: Option<String>,
    /// Response content types that pass through without a record.
    pub(crate) streaming_content_types: Vec<String>,
    pub(crate) response_buffer_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: Source::Fixed("default".to_owned()),
            key: Extractor::header("idempotency-key"),
            event_type: None,
            missing_key: MissingKey::Reject,
            in_flight: InFlight::Conflict,
            commit_when: CommitWhen::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_stored_response_bytes: DEFAULT_MAX_STORED_RESPONSE_BYTES,
            replay_headers: vec![CONTENT_TYPE],
            retention: DEFAULT_RETENTION,
            mode: Mode::Transaction,
            detach_on_disconnect: true,
            fail_open: false,
            fingerprint: Fingerprint::default(),
            json_body: false,
            body_hash_guard: false,
            methods: None,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            grpc_methods: Vec::new(),
            signature: None,
            metrics_label: None,
            streaming_content_types: vec!["text/event-stream".to_owned()],
            response_buffer_timeout: DEFAULT_RESPONSE_BUFFER_TIMEOUT,
        }
    }
}

impl Config {
    /// The protocol a request's errors are answered in: gRPC only where the
    /// route serves gRPC methods, so that a forged request on an HTTP route
    /// cannot choose the shape of its refusal by its content type.
    pub(crate) fn protocol_of(&self, headers: &http::HeaderMap) -> Protocol {
        match Protocol::of(headers) {
            Protocol::Grpc if !self.grpc_methods.is_empty() => Protocol::Grpc,
            _ => Protocol::Http,
        }
    }

    /// The `source` label of this route's metrics: a bounded set of values,
    /// never a per-request source such as a tenant id.
    pub(crate) fn metrics_label(&self) -> &str {
        match (&self.metrics_label, &self.source) {
            (Some(label), _) => label,
            (None, Source::Fixed(name)) => name,
            (None, Source::PerRequest(_)) => "per-request",
        }
    }

    /// Whether the route protects this request: a gRPC request only for a
    /// listed unary method (streaming RPCs must never be buffered), any
    /// other by its method.
    pub(crate) fn protects_request<B>(&self, request: &http::Request<B>) -> bool {
        match Protocol::of(request.headers()) {
            Protocol::Grpc => self.grpc_methods.iter().any(|method| method == request.uri().path()),
            Protocol::Http => self.protects(request.method()),
        }
    }

    /// Whether requests with this method are protected. By default every
    /// method but the safe ones (GET, HEAD, OPTIONS, TRACE) is.
    pub(crate) fn protects(&self, method: &Method) -> bool {
        match &self.methods {
            Some(methods) => methods.contains(method),
            None => !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE),
        }
    }
}

impl IdempotencyLayer {
    /// A layer on `store` with the defaults: source `default`, key from the
    /// `Idempotency-Key` header (required), transaction mode, `409` for
    /// in-flight duplicates, 2xx commits, 1 MiB request and stored-response
    /// limits, 255-byte keys, 30 days' retention, handlers detached from
    /// client disconnects, failing closed when the store is down.
    pub fn new(store: impl Into<Store>) -> Self {
        Self {
            store: store.into(),
            config: Arc::new(Config::default()),
            in_flight: Arc::default(),
            shutdown: Arc::default(),
        }
    }

    /// The handle that shuts this layer's requests down gracefully: it waits
    /// for handlers (detached ones included) and background releases up to
    /// a deadline, then cuts off what is left and releases its claims. See
    /// [`ShutdownHandle`] for a server that uses it.
    ///
    /// Layers made from this one by the builder methods share the handle.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new(10_000));
    /// let shutdown = layer.shutdown_handle();
    /// // ... serve with `layer`; on SIGTERM:
    /// let report = shutdown.shutdown(Duration::from_secs(10)).await;
    /// assert_eq!(report.cancelled, 0);
    /// # }
    /// ```
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(self.shutdown.clone())
    }

    /// The route's configuration, for the micro-benchmarks.
    #[cfg(feature = "bench-internals")]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The source (scope) of every record this layer writes: one id under
    /// two sources is two events.
    pub fn source(self, source: impl Into<String>) -> Self {
        let source = source.into();
        self.with(|config| config.source = Source::Fixed(source))
    }

    /// Derives the source from each request, for example from an
    /// authenticated tenant set by an earlier layer, so that tenants can
    /// never replay each other's responses. `None` refuses the request with
    /// `400`.
    pub fn source_fn<F>(self, derive: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|config| config.source = Source::PerRequest(Arc::new(derive)))
    }

    /// Where the key comes from (default: the `Idempotency-Key` header).
    pub fn key(self, extractor: Extractor) -> Self {
        self.with(|config| config.key = extractor)
    }

    /// Where the event type comes from (default: none, the empty string). A
    /// JSON event type must be a string; absent or `null` is empty.
    pub fn event_type(self, extractor: Extractor) -> Self {
        self.with(|config| config.event_type = Some(extractor))
    }

    /// What a request without a key gets (default: [`MissingKey::Reject`]).
    pub fn missing_key(self, policy: MissingKey) -> Self {
        self.with(|config| config.missing_key = policy)
    }

    /// What a duplicate gets while the first is in flight (default:
    /// [`InFlight::Conflict`]).
    pub fn in_flight(self, policy: InFlight) -> Self {
        self.with(|config| config.in_flight = policy)
    }

    /// Which statuses commit the record (default: any 2xx); every other
    /// status releases the claim. A handler can override the decision for
    /// one response with [`ResponseDecision`](crate::ResponseDecision).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// // Stripe-style: record client errors too, release only server errors.
    /// let layer = IdempotencyLayer::new(MemoryStore::new(100))
    ///     .commit_when(|status| !status.is_server_error());
    /// # let _ = layer;
    /// ```
    pub fn commit_when<F>(self, predicate: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.with(|config| config.commit_when = CommitWhen::new(predicate))
    }

    /// The largest request body accepted; larger ones get `413` before
    /// anything else (default 1 MiB).
    pub fn max_request_bytes(self, bytes: usize) -> Self {
        self.with(|config| config.max_request_bytes = bytes)
    }

    /// The longest part of a record's key accepted, in bytes (default
    /// 255): the key itself, and likewise the event type and the source,
    /// the other two parts of a [`RecordKey`](crate::RecordKey). A longer
    /// one is `400` (gRPC `INVALID_ARGUMENT`) before anything runs.
    pub fn max_key_bytes(self, bytes: usize) -> Self {
        self.with(|config| config.max_key_bytes = bytes)
    }

    /// The largest response body a record keeps (default 1 MiB). Larger
    /// responses are still sent in full; their record keeps the status and
    /// headers, and a replay has an empty body.
    pub fn max_stored_response_bytes(self, bytes: usize) -> Self {
        self.with(|config| config.max_stored_response_bytes = bytes)
    }

    /// Adds a response header to those stored and replayed (`content-type`
    /// always is). `set-cookie`, `authorization` and hop-by-hop headers are
    /// never stored, even when listed.
    pub fn replay_header(self, name: HeaderName) -> Self {
        self.with(|config| {
            if !config.replay_headers.contains(&name) {
                config.replay_headers.push(name);
            }
        })
    }

    /// How long a completed record is kept and replayed (default 30 days).
    /// A lease-mode claim lives by its lease, renewed while the handler
    /// runs, however long that is.
    pub fn retention(self, retention: Duration) -> Self {
        self.with(|config| config.retention = retention)
    }

    /// Transaction or lease mode (default: [`Mode::Transaction`]).
    pub fn mode(self, mode: Mode) -> Self {
        self.with(|config| config.mode = mode)
    }

    /// Whether a handler keeps running when the client disconnects or a
    /// timeout drops the response future (default `true`): it then runs to
    /// completion in a task of its own and the record reflects its outcome.
    /// With `false`, a dropped future releases the claim.
    pub fn detach_on_disconnect(self, detach: bool) -> Self {
        self.with(|config| config.detach_on_disconnect = detach)
    }

    /// Whether to run the handler unprotected when the store is unavailable
    /// (default `false`: answer `503` and run nothing).
    pub fn fail_open(self, fail_open: bool) -> Self {
        self.with(|config| config.fail_open = fail_open)
    }

    /// How requests are fingerprinted (default: method, path with query
    /// string, and the raw body).
    pub fn fingerprint(self, fingerprint: Fingerprint) -> Self {
        self.with(|config| config.fingerprint = fingerprint)
    }

    /// Whether the body must be JSON (an empty body counts as no document);
    /// a malformed body gets `400` before the key is read (default `false`;
    /// routes whose key or event type comes from JSON check it anyway).
    pub fn json_body(self, required: bool) -> Self {
        self.with(|config| config.json_body = required)
    }

    /// Whether the body's SHA-256 is claimed as a second record together
    /// with the key (default `false`; transaction mode only): a body already
    /// handled is answered as a duplicate, whatever key it comes with.
    ///
    /// For senders whose delivery id is a header their signature does not
    /// cover (GitHub's `X-GitHub-Delivery`, Shopify's
    /// `X-Shopify-Webhook-Id`, Twilio's idempotency token): whoever captures
    /// one signed delivery can resend its body under a fresh id, which the
    /// signature still accepts. With the guard, that resend finds the body's
    /// record and gets the stored response; the handler does not run. Both
    /// records commit with the handler's writes, or neither does.
    ///
    /// Turn it on only where the sender's bodies are unique per event (they
    /// carry the event's own id or timestamp): two distinct events with
    /// byte-identical bodies would count as one. The body's record is kept
    /// as long as the key's (the route's retention).
    ///
    /// ```
    /// use tower_idempotency::signature::GitHubSignature;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
    ///
    /// let github = Preset::github().verify_signature(GitHubSignature::new("secret")?);
    /// let layer = IdempotencyLayer::new(MemoryStore::new(1_000))
    ///     .preset(github)
    ///     .body_hash_guard(true);
    /// # let _ = layer;
    /// # Ok::<(), tower_idempotency::signature::InvalidSignatureConfig>(())
    /// ```
    pub fn body_hash_guard(self, enabled: bool) -> Self {
        self.with(|config| config.body_hash_guard = enabled)
    }

    /// Protects only requests with these methods (default: all but GET,
    /// HEAD, OPTIONS and TRACE); others pass through untouched.
    pub fn methods<I: IntoIterator<Item = Method>>(self, methods: I) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|config| config.methods = Some(methods))
    }

    /// The longest a store step (a read, a claim, a completion) may take
    /// before the request fails with `503` (default 5 s). Releasing a claim
    /// holds its response back for at most as long: a rollback that takes
    /// longer closes its connection, and a lease release that cannot get a
    /// connection in time goes on in the background (until the lease would
    /// have run out anyway) while the response goes out.
    pub fn store_timeout(self, timeout: Duration) -> Self {
        self.with(|config| config.store_timeout = timeout)
    }

    /// The `source` label of this route's metrics (default: the route's
    /// [`source`](Self::source), or `per-request` with
    /// [`source_fn`](Self::source_fn)). Labels must come from a small, fixed
    /// set: a per-request source such as a tenant id never becomes one.
    pub fn metrics_label(self, label: impl Into<String>) -> Self {
        let label = label.into();
        self.with(|config| config.metrics_label = Some(label))
    }

    /// Adds a response content type that streams (default: only
    /// `text/event-stream`). A response of such a type passes through
    /// unprotected, without a record: nothing is replayed, the next
    /// delivery runs the handler again, and in transaction mode the
    /// handler's writes commit as if the layer were not there. Matched
    /// case-insensitively on the media type, parameters ignored.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new(100)).streaming_content_type("application/x-ndjson");
    /// # let _ = layer;
    /// ```
    pub fn streaming_content_type(self, media_type: impl Into<String>) -> Self {
        let media_type = media_type.into().trim().to_ascii_lowercase();
        self.with(|config| {
            if !config.streaming_content_types.contains(&media_type) {
                config.streaming_content_types.push(media_type);
            }
        })
    }

    /// The longest the layer reads a committing response's body to record it
    /// (default 30 s), with a lease renewed meanwhile. Past it the response
    /// passes through as it streams and its record keeps the status and
    /// headers without the body, as for a body over
    /// [`max_stored_response_bytes`](Self::max_stored_response_bytes); a
    /// gRPC response, whose status is still unread, releases its claim.
    pub fn response_buffer_timeout(self, timeout: Duration) -> Self {
        self.with(|config| config.response_buffer_timeout = timeout)
    }
}

impl IdempotencyLayer {
    /// Protects these gRPC methods (`/package.Service/Method`), which must be
    /// unary; every other gRPC request, streaming ones included, passes
    /// through untouched (default: none).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new(100))
    ///     .grpc_unary_methods(["/payments.v1.Payments/CreatePayment"]);
    /// # let _ = layer;
    /// ```
    pub fn grpc_unary_methods<I, M>(self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        let methods: Vec<String> = methods.into_iter().map(Into::into).collect();
        self.with(|config| config.grpc_methods = methods)
    }

    /// Verifies each request's signature on its raw body before the key is
    /// read or claimed; a refused request gets `401` and leaves no record.
    pub fn verify_signature(self, verifier: impl VerifySignature) -> Self {
        let verifier: Arc<dyn VerifySignature> = Arc::new(verifier);
        self.with(|config| config.signature = Some(verifier))
    }
}

impl IdempotencyLayer {
    /// Checks that the configuration can work: every duration at most
    /// [`MAX_DURATION`], a non-zero store timeout and response buffering
    /// bound, and a lease renewal interval (when not zero) shorter than the
    /// lease. [`Layer::layer`] runs the same check, so a configuration that
    /// cannot work is refused when the router is built, never at request
    /// time; call this first to report the error instead of panicking.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Mode};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new(100)).mode(Mode::Lease {
    ///     lease: Duration::from_secs(10),
    ///     renew_every: Duration::from_secs(10),
    /// });
    /// assert!(layer.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.config.validate()
    }
}

impl Config {
    fn validate(&self) -> Result<(), InvalidConfig> {
        let mut durations = vec![
            ("retention", self.retention),
            ("store_timeout", self.store_timeout),
            ("response_buffer_timeout", self.response_buffer_timeout),
        ];
        if let InFlight::Wait(bound) = self.in_flight {
            durations.push(("in_flight wait", bound));
        }
        if let Mode::Lease { lease, renew_every } = self.mode {
            if self.body_hash_guard {
                return Err(InvalidConfig::BodyHashGuardNeedsTransactionMode);
            }
            durations.push(("lease", lease));
            durations.push(("lease renewal interval", renew_every));
            if !renew_every.is_zero() && renew_every >= lease {
                return Err(InvalidConfig::RenewalNotShorterThanLease { lease, renew_every });
            }
        }
        if let Some((setting, value)) = durations.into_iter().find(|(_, value)| *value > MAX_DURATION) {
            return Err(InvalidConfig::DurationTooLong { setting, value });
        }
        for (setting, value) in [
            ("store_timeout", self.store_timeout),
            ("response_buffer_timeout", self.response_buffer_timeout),
        ] {
            if value.is_zero() {
                return Err(InvalidConfig::ZeroTimeout { setting });
            }
        }
        Ok(())
    }
}

/// A layer configuration that cannot work, refused when the layer is built
/// (see [`IdempotencyLayer::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidConfig {
    /// A duration past [`MAX_DURATION`], which would overflow clocks or
    /// timestamps.
    #[error("the {setting} of {value:?} is longer than the most the layer accepts ({MAX_DURATION:?})")]
    DurationTooLong {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: Duration,
    },
    /// A timeout of zero, which would fail every request.
    #[error("the {setting} must be longer than zero")]
    ZeroTimeout {
        /// The setting.
        setting: &'static str,
    },
    /// A lease renewed no sooner than it runs out, so another instance could
    /// take it over while the handler runs.
    #[error(
        "the lease renewal interval ({renew_every:?}) must be shorter than the lease ({lease:?}); zero never renews"
    )]
    RenewalNotShorterThanLease {
        /// The lease.
        lease: Duration,
        /// The renewal interval.
        renew_every: Duration,
    },
    /// A body-hash guard on a lease-mode route: its two records are one
    /// claim only inside one transaction.
    #[error("the body-hash guard needs transaction mode: its two records commit together, or neither does")]
    BodyHashGuardNeedsTransactionMode,
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    /// # Panics
    ///
    /// When the configuration cannot work (see
    /// [`IdempotencyLayer::validate`]): at the time the router is built,
    /// never while serving requests.
    fn layer(&self, inner: S) -> Self::Service {
        if let Err(error) = self.config.validate() {
            panic!("invalid IdempotencyLayer configuration: {error}");
        }
        IdempotencyService::new(
            inner,
            self.store.clone(),
            self.config.clone(),
            self.in_flight.clone(),
            self.shutdown.clone(),
        )
    }
}
