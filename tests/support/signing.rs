//! Requests signed as each provider signs them: an implementation of the
//! schemes of its own, so that a test does not check the layer's verifiers
//! against themselves. Timestamps come from the real clock, by which the
//! layer judges them.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The problem type of a request whose signature does not verify.
pub const INVALID_SIGNATURE: &str = "urn:tower-idempotency:invalid-signature";
/// A Standard Webhooks secret in its published form, `whsec_` and base64.
pub const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How far ahead of a test's `unix_now()` a signed timestamp lies to be
/// refused as from the future all the while the test runs: past the
/// layer's 300 s tolerance with a minute to spare, since the clock the
/// layer reads moves on after the test has read its own.
pub const TOO_FAR_AHEAD: u64 = 360;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// The MAC `M` (an `Hmac<_>`) of the concatenated `message` under `key`.
pub fn mac<M: Mac + KeyInit>(key: &[u8], message: &[&[u8]]) -> Vec<u8> {
    let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    for part in message {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

pub fn hmac_sha256(key: &[u8], message: &[&[u8]]) -> Vec<u8> {
    mac::<Hmac<Sha256>>(key, message)
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `Stripe-Signature` header value: `t=<timestamp>,v1=<hex>`.
pub fn stripe_signature(secret: &str, timestamp: u64, body: &str) -> String {
    let timestamp = timestamp.to_string();
    let signature = hmac_sha256(secret.as_bytes(), &[timestamp.as_bytes(), b".", body.as_bytes()]);
    format!("t={timestamp},v1={}", hex::encode(signature))
}

/// An `X-Hub-Signature-256` header value: `sha256=<hex>`.
pub fn github_signature(secret: &str, body: &str) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), &[body.as_bytes()]))
    )
}

/// A `webhook-signature` header value, `v1,<base64>`, under a base64
/// secret with or without its `whsec_` prefix.
pub fn standard_signature(secret: &str, id: &str, timestamp: u64, body: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a base64 secret");
    let timestamp = timestamp.to_string();
    let message: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body.as_bytes()];
    format!("v1,{}", base64(&hmac_sha256(&key, &message)))
}

/// A `webhook-signature` entry `v1a,<base64 Ed25519 signature>`, signed
/// with the signing key of `seed`.
pub fn standard_v1a_signature(seed: [u8; 32], id: &str, timestamp: u64, body: &str) -> String {
    use ed25519_dalek::Signer as _;
    let signed = format!("{id}.{timestamp}.{body}");
    let signature = ed25519_dalek::SigningKey::from_bytes(&seed).sign(signed.as_bytes());
    format!("v1a,{}", base64(&signature.to_bytes()))
}

/// The `whpk_` public key of the signing key of `seed`.
pub fn standard_public_key(seed: [u8; 32]) -> String {
    let public_key = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    format!("whpk_{}", base64(public_key.as_bytes()))
}

/// The Standard Webhooks headers of a delivery.
pub fn standard_headers(id: &str, timestamp: u64, signature: String) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ]
}

/// GitHub's headers of a `push` delivery.
pub fn github_headers(delivery: &str, signature: String) -> Vec<(&'static str, String)> {
    vec![
        ("X-GitHub-Delivery", delivery.to_owned()),
        ("X-GitHub-Event", "push".to_owned()),
        ("X-Hub-Signature-256", signature),
    ]
}
