//! Signature headers of every provider scheme, arbitrary bytes in each:
//! verifying never panics, and no HMAC scheme ever accepts a signature the
//! fuzzer made up (it cannot know the secrets).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use http::{HeaderName, HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use tower_idempotency::signature::{
    FlutterwaveSignature, GitHubSignature, PaystackSignature, ShopifySignature, SlackSignature,
    StandardWebhooksSignature, StripeSignature, TwilioSignature, VerifySignature,
};

const HEADERS: [&str; 13] = [
    "stripe-signature",
    "x-hub-signature-256",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "x-slack-signature",
    "x-slack-request-timestamp",
    "x-shopify-hmac-sha256",
    "x-paystack-signature",
    "x-twilio-signature",
];

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    headers: Vec<(u8, &'a [u8])>,
    flutterwave: Option<&'a [u8]>,
    body: &'a [u8],
    path: &'a str,
    /// Seconds since the epoch, near the fuzzer's made-up timestamps.
    now: u32,
}

/// (verifier, whether a made-up request can never pass it)
fn verifiers() -> &'static [(Box<dyn VerifySignature>, bool)] {
    static VERIFIERS: OnceLock<Vec<(Box<dyn VerifySignature>, bool)>> = OnceLock::new();
    VERIFIERS.get_or_init(|| {
        vec![
            (Box::new(StripeSignature::new("whsec_fuzz").expect("stripe")), true),
            (Box::new(GitHubSignature::new("fuzz").expect("github")), true),
            (
                Box::new(StandardWebhooksSignature::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("standard")),
                true,
            ),
            (Box::new(SlackSignature::new("fuzz").expect("slack")), true),
            (Box::new(ShopifySignature::new("fuzz").expect("shopify")), true),
            (Box::new(PaystackSignature::new("sk_fuzz").expect("paystack")), true),
            (
                Box::new(TwilioSignature::new("fuzz", "https://example.test").expect("twilio")),
                true,
            ),
            // Flutterwave's verif-hash is the secret itself, compared: a
            // fuzzer guided by comparisons may find it.
            (
                Box::new(FlutterwaveSignature::new("fuzz-hash").expect("flutterwave")),
                false,
            ),
        ]
    })
}

fuzz_target!(|input: Input<'_>| {
    let mut request = Request::post(input.path).body(());
    if request.is_err() {
        request = Request::post("/").body(());
    }
    let Ok(request) = request else { return };
    let (mut parts, ()) = request.into_parts();
    for (index, value) in &input.headers {
        let name = HeaderName::from_static(HEADERS[usize::from(*index) % HEADERS.len()]);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            parts.headers.append(name, value);
        }
    }
    if let Some(value) = input.flutterwave.and_then(|value| HeaderValue::from_bytes(value).ok()) {
        parts.headers.append("verif-hash", value.clone());
        parts.headers.append("flutterwave-signature", value);
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(input.now));
    for (verifier, unforgeable) in verifiers() {
        let verdict = verifier.verify(&parts, input.body, now);
        if *unforgeable {
            assert!(verdict.is_err(), "{verifier:?} accepted a made-up request: {input:?}");
        }
    }
});
