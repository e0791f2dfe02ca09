//! Judging the handler's response (commit or release) and reading its
//! body, bounded in size and time, to record it.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::run::Handled;
use crate::body::{BoxError, ResponseBody};
use crate::layer::Config;
use crate::metrics::{self};
use crate::policy::ResponseDecision;
use crate::problem::Protocol;
use crate::record::{allowed_headers, storable_headers, StoredResponse};

/// Decides commit or release and, to commit, buffers the body up to the
/// storage limit.
pub(super) async fn classify<B>(
    config: &Config,
    protocol: Protocol,
    response: Response<B>,
) -> Result<Handled<B>, BoxError>
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
pub(super) async fn classify_grpc<B>(
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

pub(super) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A response body read up to a bound.
pub(super) enum Buffered<B> {
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
pub(super) fn buffer_deadline(config: &Config) -> Instant {
    Instant::now() + config.response_buffer_timeout
}

/// Reads a body up to `limit` bytes and until `deadline`.
pub(super) async fn buffer<B>(body: B, limit: usize, deadline: Instant) -> Result<Buffered<B>, BoxError>
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
pub(super) async fn next_frame<B>(
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
pub(super) fn is_streaming(config: &Config, headers: &HeaderMap) -> bool {
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
pub(super) fn stored_response(
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
