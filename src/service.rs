//! [`IdempotencyService`]: the tower service a layer wraps around a route;
//! each call runs the request path in [`crate::pipeline`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower_service::Service;

use crate::body::{BoxError, ResponseBody};
use crate::inflight::LocalInFlight;
use crate::layer::Config;
use crate::pipeline::{self, Answer};
use crate::shutdown::Tracker;
use crate::store::Store;

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

pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) config: Arc<Config>,
    pub(crate) in_flight: Arc<LocalInFlight>,
    /// The route's bounded `source` label for metrics.
    pub(crate) metrics_label: Arc<str>,
    pub(crate) shutdown: Arc<Tracker>,
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
            inner: Box::pin(pipeline::handle(self.shared.clone(), inner, request)),
        }
    }
}
