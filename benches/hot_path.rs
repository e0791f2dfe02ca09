//! Micro-benchmarks of the pure steps on the request path: key extraction,
//! fingerprinting, and the stored response's encoding and decoding (with
//! the replay it feeds).
//!
//! ```text
//! cargo bench --features bench-internals --bench hot_path
//! ```

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use tower_idempotency::{bench, Extractor, Fingerprint, IdempotencyLayer, MemoryStore};

/// A Stripe-like event of about `size` bytes: id and type first, then an
/// object padded with metadata as real payloads are.
fn stripe_event(size: usize) -> Bytes {
    let mut metadata = String::new();
    let mut n = 0;
    while metadata.len() + 200 < size {
        if n > 0 {
            metadata.push(',');
        }
        metadata.push_str(&format!(r#""field_{n}":"value number {n} of the event's metadata""#));
        n += 1;
    }
    Bytes::from(format!(
        r#"{{"id":"evt_1OqN2aLkdIwHu7ix0abcdefg","object":"event","type":"payment_intent.succeeded","created":1700000000,"data":{{"object":{{"id":"pi_3OqN2a","amount":2000,"currency":"usd","metadata":{{{metadata}}}}}}}}}"#
    ))
}

fn parts(headers: &[(&str, &str)]) -> Parts {
    let mut request = Request::post("/webhooks/stripe?attempt=1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).expect("request").into_parts().0
}

fn key_extraction(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let json_id = Extractor::json("/id").expect("pointer");
    let header = Extractor::header("X-GitHub-Delivery");
    let github = parts(&[("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")]);
    let plain = parts(&[]);
    for size in [256, 4096] {
        let body = stripe_event(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("json /id, {size} B event"), |b| {
            b.iter(|| bench::extract_key(&json_id, &plain, black_box(&body)))
        });
    }
    group.throughput(Throughput::Elements(1));
    let empty = Bytes::new();
    group.bench_function("header X-GitHub-Delivery", |b| {
        b.iter(|| bench::extract_key(&header, black_box(&github), &empty))
    });
    group.finish();

    // The whole identification of the example's Stripe route: JSON body,
    // key and event type, their checks, and the raw fingerprint.
    let mut group = c.benchmark_group("identify");
    let stripe = IdempotencyLayer::new(MemoryStore::new(16))
        .source("stripe")
        .key(Extractor::json("/id").expect("pointer"))
        .event_type(Extractor::json("/type").expect("pointer"))
        .json_body(true);
    for size in [256, 4096] {
        let body = stripe_event(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("stripe route, {size} B event"), |b| {
            b.iter(|| bench::identify(&stripe, &plain, black_box(&body)))
        });
    }
    group.finish();
}

fn fingerprinting(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    let plain = parts(&[]);
    let raw = Fingerprint::raw_body();
    let canonical = Fingerprint::canonical_json();
    for size in [256, 4096, 65536] {
        let body = stripe_event(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("raw body, {size} B"), |b| {
            b.iter(|| bench::fingerprint(&raw, &plain, black_box(&body)))
        });
    }
    let body = stripe_event(4096);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("canonical JSON, 4096 B", |b| {
        b.iter(|| bench::fingerprint(&canonical, &plain, black_box(&body)))
    });
    group.finish();
}

fn stored_responses(c: &mut Criterion) {
    let mut group = c.benchmark_group("stored response");
    let headers = vec![
        (
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("application/json"),
        ),
        (
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("req_8a7b6c5d4e3f"),
        ),
        (HeaderName::from_static("x-ledger"), HeaderValue::from_static("entry-1")),
    ];
    group.bench_function("encode 3 headers", |b| {
        b.iter(|| bench::encode_response_headers(black_box(&headers), None))
    });
    let encoded = bench::encode_response_headers(&headers, None);
    for size in [48, 4096] {
        let body = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("decode and replay, {size} B body"), |b| {
            b.iter(|| bench::replay_from_columns(StatusCode::OK, black_box(&encoded), black_box(&body)))
        });
    }
    group.finish();
}

criterion_group!(benches, key_extraction, fingerprinting, stored_responses);
criterion_main!(benches);
