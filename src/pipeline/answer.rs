//! Answers given without running the handler: replays and refusals.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};

use super::Identity;
use crate::body::ResponseBody;
use crate::metrics::{self, Outcome};
use crate::problem::{Problem, Protocol};
use crate::record::StoredResponse;
use crate::service::REPLAYED_HEADER;
use crate::store::Completed;

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
            identity.key.key
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
        &format!("a request with the key `{}` is being processed", identity.key.key),
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
