//! Judging the handler's response (commit or release) and reading its
//! body, bounded in size and time, to record it.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::run::Handled;
use crate::body::{BoxError, BytesBody, ResponseBody};
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
    B: BytesBody + Send + 'static,
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
    B: BytesBody + Send + 'static,
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
    B: BytesBody,
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
    B: BytesBody,
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use http::StatusCode;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};

    use http_body::Body;

    use super::*;

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

    /// A body of these frames, all ready at once.
    fn body(frames: Frames) -> impl Body<Data = Bytes, Error = Infallible> + Send + 'static {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(text: &'static str) -> Result<Frame<Bytes>, Infallible> {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    fn trailers(status: &'static str) -> Result<Frame<Bytes>, Infallible> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", status.parse().expect("a header value"));
        Ok(Frame::trailers(trailers))
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    async fn text<B: Body<Data = Bytes>>(body: B) -> String
    where
        B::Error: std::fmt::Debug,
    {
        let bytes = body.collect().await.expect("the body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    #[tokio::test]
    async fn a_single_frame_is_kept_as_it_came() {
        let frame = Bytes::from_static(b"whole");
        let pointer = frame.as_ptr();
        let Ok(Buffered::Whole { body, trailers }) = buffer(Full::new(frame), 100, far()).await else {
            panic!("a small body is buffered whole");
        };
        assert_eq!(body.as_ptr(), pointer, "not copied");
        assert!(trailers.is_none());
    }

    #[tokio::test]
    async fn frames_are_joined_and_trailers_kept() {
        let Ok(Buffered::Whole { body, trailers }) = buffer(
            self::body(vec![data("a"), data("b"), data("c"), trailers("0")]),
            100,
            far(),
        )
        .await
        else {
            panic!("a small body is buffered whole");
        };
        assert_eq!(body, Bytes::from_static(b"abc"));
        assert_eq!(grpc_status(&trailers.expect("trailers")), Some(0));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_on_whole_and_in_order() {
        let frames = self::body(vec![data("12345"), data("67890"), data("abc")]);
        let Ok(Buffered::TooLarge(rest)) = buffer(frames, 7, far()).await else {
            panic!("a body over the limit is not buffered");
        };
        assert_eq!(text(rest).await, "1234567890abc");
    }

    #[tokio::test]
    async fn a_body_slower_than_the_deadline_streams_on_with_what_was_read() {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
        sender.send(data("first ")).expect("the body is open");
        let slow = StreamBody::new(tokio_stream_from(receiver));
        let deadline = Instant::now() + Duration::from_millis(20);
        let Ok(Buffered::TooSlow(rest)) = buffer(slow, 100, deadline).await else {
            panic!("a body that stalls past the deadline is not buffered");
        };
        sender.send(data("then the rest")).expect("the body is open");
        drop(sender);
        assert_eq!(text(rest).await, "first then the rest");
    }

    /// An mpsc receiver as a stream, without another dependency.
    fn tokio_stream_from<T>(
        mut receiver: tokio::sync::mpsc::UnboundedReceiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }

    fn grpc_response(frames: Frames) -> Response<impl Body<Data = Bytes, Error = Infallible> + Send + 'static> {
        Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/grpc")
            .body(body(frames))
            .expect("a response")
    }

    #[tokio::test]
    async fn a_grpc_response_commits_on_status_0_in_its_trailers() {
        let config = Config::default();
        let handled = classify_grpc(&config, None, grpc_response(vec![data("msg"), trailers("0")])).await;
        assert!(matches!(handled, Ok(Handled::Buffered { .. })));
    }

    #[tokio::test]
    async fn a_grpc_error_status_releases() {
        let config = Config::default();
        let handled = classify_grpc(&config, None, grpc_response(vec![trailers("14")])).await;
        assert!(matches!(handled, Ok(Handled::ReleasedBuffered { .. })));
    }

    #[tokio::test]
    async fn a_trailers_only_grpc_response_is_judged_by_its_headers() {
        let config = Config::default();
        let mut response = grpc_response(vec![]);
        response
            .headers_mut()
            .insert("grpc-status", "0".parse().expect("a header value"));
        assert!(matches!(
            classify_grpc(&config, None, response).await,
            Ok(Handled::Buffered { .. })
        ));
    }

    #[tokio::test]
    async fn a_grpc_response_the_handler_releases_is_released_unread() {
        let config = Config::default();
        let response = grpc_response(vec![data("msg"), trailers("0")]);
        let handled = classify_grpc(&config, Some(ResponseDecision::Release), response).await;
        assert!(matches!(handled, Ok(Handled::Released(_))));
    }

    #[test]
    fn streaming_media_types_match_without_parameters_or_case() {
        let config = Config::default();
        let headers = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, value.parse().expect("a header value"));
            headers
        };
        assert!(is_streaming(&config, &headers("Text/Event-Stream; charset=utf-8")));
        assert!(!is_streaming(&config, &headers("text/event-streamx")));
        assert!(!is_streaming(&config, &headers("application/json")));
        assert!(!is_streaming(&config, &HeaderMap::new()));
    }
}
