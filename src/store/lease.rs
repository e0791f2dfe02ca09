//! A lease-mode claim, whatever the driver: a committed row carrying a
//! fencing token, renewed, completed and deleted through the driver's
//! [`LeaseRows`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::key::RecordKey;
use crate::policy::Mode;
use crate::record::StoredResponse;
use crate::shutdown::{self, Tracker};
use crate::store::{ClaimRequest, Completion, HeldClaim, ReleaseBound, StoreError, StoreFuture};

/// The three statements on a lease claim's row that a driver runs.
pub(crate) trait LeaseRows: Clone + fmt::Debug + Send + Sync + 'static {
    /// Extends the lease of the row `token` holds; `false` when it no
    /// longer does.
    fn renew<'a>(&'a self, key: &'a RecordKey, token: uuid::Uuid, lease: Duration) -> StoreFuture<'a, bool>;

    /// Completes the row `token` holds with `response`.
    fn complete_lease<'a>(
        &'a self,
        request: &'a ClaimRequest,
        token: uuid::Uuid,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion>;

    /// Deletes the row `token` holds, if it still does.
    fn release_lease<'a>(&'a self, key: &'a RecordKey, token: uuid::Uuid) -> StoreFuture<'a, ()>;
}

/// A lease-mode claim on the store `S`.
#[derive(Debug)]
pub(crate) struct LeaseClaim<S> {
    pub(crate) store: S,
    pub(crate) token: uuid::Uuid,
}

impl<S: LeaseRows> HeldClaim for LeaseClaim<S> {
    fn renew<'a>(&'a self, request: &'a ClaimRequest, lease: Duration) -> StoreFuture<'a, bool> {
        self.store.renew(&request.key, self.token, lease)
    }

    fn complete<'a>(
        self: Box<Self>,
        request: &'a ClaimRequest,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion> {
        Box::pin(async move { self.store.complete_lease(request, self.token, response).await })
    }

    fn end_unrecorded<'a>(self: Box<Self>, request: &'a ClaimRequest) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.store.release_lease(&request.key, self.token).await })
    }

    fn release<'a>(self: Box<Self>, request: &'a ClaimRequest, bound: &'a ReleaseBound) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut release = Box::pin(release_lease(self.store, request.key.clone(), self.token));
            match tokio::time::timeout(bound.timeout, &mut release).await {
                Ok(released) => released,
                Err(_) => {
                    bound.finish_in_background(request, release);
                    Err(StoreError::Timeout(bound.timeout))
                }
            }
        })
    }

    fn abandon(self: Box<Self>, request: &ClaimRequest, bound: &ReleaseBound) {
        let release = release_lease(self.store, request.key.clone(), self.token);
        bound.finish_in_background(request, release);
    }
}

/// Deletes a lease claim by its token: an owned future, for the background.
async fn release_lease<S: LeaseRows>(store: S, key: RecordKey, token: uuid::Uuid) -> Result<(), StoreError> {
    store.release_lease(&key, token).await
}

/// Deletes, in the background within `bound`, the lease claim a failed
/// claim may have committed before its answer was lost (a timeout, a dead
/// connection). Only a lease claim is a committed row that could outlive
/// its request; a transaction's claim ends with its connection.
pub(crate) fn release_unknown_claim<S: LeaseRows>(
    store: &S,
    request: &ClaimRequest,
    error: &StoreError,
    bound: Duration,
    tracker: &Arc<Tracker>,
) {
    let outcome_unknown = matches!(error, StoreError::Timeout(_)) || error.is_connection_lost();
    if !matches!(request.mode, Mode::Lease { .. }) || !outcome_unknown {
        return;
    }
    let (store, key, token) = (store.clone(), request.key.clone(), request.claim_token);
    // Tracked, so that a graceful shutdown waits for it.
    shutdown::spawn(Some(tracker), async move {
        match tokio::time::timeout(bound, store.release_lease(&key, token)).await {
            Ok(Ok(())) => {
                tracing::debug!(source = %key.source, key = %key.key, "released a claim whose outcome was unknown")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, source = %key.source, key = %key.key, "could not release a claim whose outcome was unknown; it stays until its lease ends")
            }
            Err(_) => {
                tracing::warn!(source = %key.source, key = %key.key, "releasing a claim whose outcome was unknown timed out; it stays until its lease ends")
            }
        }
    });
}
