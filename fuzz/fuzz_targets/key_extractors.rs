//! Key extraction from untrusted requests, through the public layer: a key
//! header and an event-type header of arbitrary bytes, a JSON Pointer (or
//! dotted JSONPath) of arbitrary text over an arbitrary body, each missing-key
//! policy. Never a panic and never a 5xx; a refused request never reaches the
//! handler; a key that reaches it is 1 to 255 bytes without control
//! characters, and a header key reaches it byte-exact; the same request
//! sent again is a replay.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tower::{service_fn, Layer, ServiceExt};
use tower_idempotency::{Extractor, Fingerprint, IdempotencyLayer, MemoryStore, MissingKey, RecordKey};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    key_header: Option<&'a [u8]>,
    key_header_twice: bool,
    event_header: Option<&'a [u8]>,
    key_path: &'a str,
    event_from_json: bool,
    body: &'a [u8],
    missing_key: u8,
    canonical_json: bool,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|input: Input<'_>| {
    let json_key = Extractor::json(input.key_path).ok();
    let mut layer = IdempotencyLayer::new(MemoryStore::new(16))
        .source("fuzz")
        .max_request_bytes(4096)
        .missing_key(match input.missing_key % 3 {
            0 => MissingKey::Reject,
            1 => MissingKey::BodyHash,
            _ => MissingKey::PassThrough,
        })
        .key(match json_key.clone() {
            Some(json) => Extractor::header("x-key").or(json),
            None => Extractor::header("x-key"),
        })
        .event_type(if input.event_from_json {
            Extractor::json("/type").expect("a valid pointer")
        } else {
            Extractor::header("x-event")
        });
    if input.canonical_json {
        layer = layer.fingerprint(Fingerprint::canonical_json());
    }
    let seen: Arc<Mutex<Option<RecordKey>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        service_fn(move |request: Request<_>| {
            let seen = seen.clone();
            async move {
                *seen.lock().expect("seen") = request.extensions().get::<RecordKey>().cloned();
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let service = layer.layer(handler);

    let request = || {
        let mut request = Request::post("/events").body(Full::new(Bytes::copy_from_slice(input.body)))?;
        for (name, value) in [("x-key", input.key_header), ("x-event", input.event_header)] {
            if let Some(value) = value.and_then(|value| HeaderValue::from_bytes(value).ok()) {
                request.headers_mut().append(name, value.clone());
                if name == "x-key" && input.key_header_twice {
                    request.headers_mut().append(name, value);
                }
            }
        }
        Ok::<_, http::Error>(request)
    };
    let Ok(first) = request() else { return };
    let header_key = first.headers().get("x-key").map(|value| value.as_bytes().to_vec());

    let (status, replayed) = runtime().block_on(async {
        let response = service.clone().oneshot(first).await.expect("infallible");
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let _ = response.into_body().collect().await.expect("a readable body");
        (status, replayed)
    });
    assert!(
        matches!(
            status,
            StatusCode::OK | StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE
        ),
        "unexpected {status} for {input:?}"
    );
    assert!(!replayed, "a first request is never a replay");
    let ran = seen.lock().expect("seen").take();
    if status != StatusCode::OK {
        assert!(ran.is_none(), "a refused request reached the handler: {input:?}");
        return;
    }
    let Some(record) = ran else {
        // Passed through unprotected: only without a key, under PassThrough.
        assert_eq!(input.missing_key % 3, 2, "{input:?}");
        return;
    };
    let key = record.key();
    assert!(!key.is_empty() && key.len() <= 255, "{key:?}");
    assert!(!key.chars().any(char::is_control), "{key:?}");
    assert!(record.event_type().len() <= 255 && !record.event_type().chars().any(char::is_control));
    if let Some(header_key) = header_key {
        assert_eq!(
            key.as_bytes(),
            header_key.as_slice(),
            "a header key reaches the handler byte-exact"
        );
    }

    // The same request again is answered from the record.
    let Ok(again) = request() else { return };
    let (status, replayed) = runtime().block_on(async {
        let response = service.oneshot(again).await.expect("infallible");
        (
            response.status(),
            response.headers().contains_key("idempotent-replayed"),
        )
    });
    assert_eq!((status, replayed), (StatusCode::OK, true), "{input:?}");
    assert!(seen.lock().expect("seen").is_none(), "the handler ran twice: {input:?}");
});
