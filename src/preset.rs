//! [`Preset`]: a provider's documented key, event type and signature scheme
//! as one value for [`IdempotencyLayer::preset`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::key::Extractor;
use crate::layer::IdempotencyLayer;
use crate::policy::InFlight;
use crate::signature::VerifySignature;

/// How long a webhook preset's duplicate waits for an in-flight first
/// delivery: providers time out around 10 to 30 seconds, and answering the
/// duplicate with the first's response beats a 409 they would retry.
const WEBHOOK_WAIT: Duration = Duration::from_secs(10);

/// A provider's conventions for [`IdempotencyLayer::preset`]: the source,
/// where the key (the event or delivery id) and the event type come from,
/// what an in-flight duplicate gets, and, once given its secret with
/// [`Preset::verify_signature`], the provider's signature check.
///
/// | preset | source | key | event type | signature |
/// | --- | --- | --- | --- | --- |
/// | [`stripe`](Preset::stripe) | `stripe` | JSON `/id` | JSON `/type` | [`StripeSignature`](crate::signature::StripeSignature) |
/// | [`github`](Preset::github) | `github` | `X-GitHub-Delivery` | `X-GitHub-Event` | [`GitHubSignature`](crate::signature::GitHubSignature) |
/// | [`shopify`](Preset::shopify) | `shopify` | `X-Shopify-Webhook-Id` | `X-Shopify-Topic` | [`ShopifySignature`](crate::signature::ShopifySignature) |
/// | [`standard_webhooks`](Preset::standard_webhooks) | `standard-webhooks` | `webhook-id` | JSON `/type` | [`StandardWebhooksSignature`](crate::signature::StandardWebhooksSignature) |
/// | [`svix`](Preset::svix) | `svix` | `svix-id` | JSON `/type` | [`StandardWebhooksSignature::svix`](crate::signature::StandardWebhooksSignature::svix) |
/// | [`slack`](Preset::slack) | `slack` | JSON `/event_id`, else the body's SHA-256 | JSON `/event/type`, else `/type` | [`SlackSignature`](crate::signature::SlackSignature) |
/// | [`twilio`](Preset::twilio) | `twilio` | `I-Twilio-Idempotency-Token`, else the body's SHA-256 | none | [`TwilioSignature`](crate::signature::TwilioSignature) |
/// | [`paystack`](Preset::paystack) | `paystack` | JSON `/data/id`, else `/data/reference` | JSON `/event` | [`PaystackSignature`](crate::signature::PaystackSignature) |
/// | [`flutterwave`](Preset::flutterwave) | `flutterwave` | JSON `/data/id` | JSON `/type`, else `/event` | [`FlutterwaveSignature`](crate::signature::FlutterwaveSignature) |
/// | [`idempotency_key`](Preset::idempotency_key) | unchanged | `Idempotency-Key` | none | none |
///
/// Webhook presets wait up to 10 s for an in-flight first delivery
/// ([`InFlight::Wait`]); the `Idempotency-Key` preset answers `409` at once
/// ([`InFlight::Conflict`]), as the IETF draft says.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
/// use tower_idempotency::signature::StripeSignature;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let secret = "whsec_..."; // the endpoint's signing secret
/// let stripe = IdempotencyLayer::new(MemoryStore::new(10_000))
///     .preset(Preset::stripe().verify_signature(StripeSignature::new(secret)?));
/// # let _ = stripe;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Preset {
    name: &'static str,
    source: Option<&'static str>,
    key: Extractor,
    event_type: Option<Extractor>,
    in_flight: InFlight,
    json_body: bool,
    signature: Option<Arc<dyn VerifySignature>>,
}

impl fmt::Debug for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preset")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("key", &self.key)
            .field("event_type", &self.event_type)
            .field("in_flight", &self.in_flight)
            .field("json_body", &self.json_body)
            .field("signature", &self.signature)
            .finish()
    }
}

/// A JSON Pointer fixed in this file; each one is tested to parse.
fn json(pointer: &'static str) -> Extractor {
    Extractor::json(pointer).unwrap_or_else(|_| unreachable!("the preset pointer `{pointer}` is valid"))
}

impl Preset {
    fn webhook(name: &'static str, key: Extractor, event_type: Option<Extractor>, json_body: bool) -> Self {
        Self {
            name,
            source: Some(name),
            key,
            event_type,
            in_flight: InFlight::Wait(WEBHOOK_WAIT),
            json_body,
            signature: None,
        }
    }

    /// Stripe: the event id (`evt_...`) at JSON `/id`, the event type at
    /// `/type`; the body must be JSON.
    /// <https://docs.stripe.com/webhooks>
    pub fn stripe() -> Self {
        Self::webhook("stripe", json("/id"), Some(json("/type")), true)
    }

    /// GitHub: the delivery GUID in `X-GitHub-Delivery` (a redelivery reuses
    /// it), the event in `X-GitHub-Event`.
    /// <https://docs.github.com/en/webhooks/webhook-events-and-payloads#delivery-headers>
    pub fn github() -> Self {
        Self::webhook(
            "github",
            Extractor::header("X-GitHub-Delivery"),
            Some(Extractor::header("X-GitHub-Event")),
            false,
        )
    }

    /// Shopify: the delivery id in `X-Shopify-Webhook-Id`, the topic in
    /// `X-Shopify-Topic` (or their `Shopify-*` forms on Events deliveries).
    /// <https://shopify.dev/docs/apps/build/webhooks/verify-deliveries>
    pub fn shopify() -> Self {
        Self::webhook(
            "shopify",
            Extractor::header("X-Shopify-Webhook-Id").or(Extractor::header("Shopify-Webhook-Id")),
            Some(Extractor::header("X-Shopify-Topic").or(Extractor::header("Shopify-Topic"))),
            false,
        )
    }

    /// Standard Webhooks: the message id in `webhook-id`, the event type at
    /// JSON `/type`; the body must be JSON.
    /// <https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>
    pub fn standard_webhooks() -> Self {
        Self::webhook(
            "standard-webhooks",
            Extractor::header("webhook-id"),
            Some(json("/type")),
            true,
        )
    }

    /// Svix (Standard Webhooks under `svix-*` names): the message id in
    /// `svix-id`, the event type at JSON `/type`; the body must be JSON.
    /// <https://docs.svix.com/receiving/verifying-payloads/how-manual>
    pub fn svix() -> Self {
        Self::webhook("svix", Extractor::header("svix-id"), Some(json("/type")), true)
    }

    /// Slack Events API: the `event_id` at JSON `/event_id` (retries carry
    /// the same), the inner event's type at `/event/type`, else the
    /// envelope's `/type`. Requests without an `event_id`, such as the
    /// `url_verification` handshake, are keyed by the body's SHA-256. Slash
    /// commands and interactivity are form-encoded: protect those with a
    /// key of your own and [`SlackSignature`](crate::signature::SlackSignature).
    /// <https://docs.slack.dev/apis/events-api/>
    pub fn slack() -> Self {
        Self::webhook(
            "slack",
            json("/event_id").or(Extractor::body_sha256()),
            Some(json("/event/type").or(json("/type"))),
            true,
        )
    }

    /// Twilio: `I-Twilio-Idempotency-Token`, else the body's SHA-256 (the
    /// token is not sent by every product). Twilio bodies are form-encoded:
    /// there is no event type. Its signature needs the public base URL, see
    /// [`TwilioSignature`](crate::signature::TwilioSignature).
    /// <https://www.twilio.com/docs/usage/api-security-reference-guide/webhook>
    pub fn twilio() -> Self {
        Self::webhook(
            "twilio",
            Extractor::header("I-Twilio-Idempotency-Token").or(Extractor::body_sha256()),
            None,
            false,
        )
    }

    /// Paystack, which sends no event id: the transaction's `/data/id`
    /// (else `/data/reference`) together with the event at JSON `/event`,
    /// so `charge.success` and `refund.processed` of one transaction stay
    /// two events; the body must be JSON.
    /// <https://paystack.com/docs/payments/webhooks/>
    pub fn paystack() -> Self {
        Self::webhook(
            "paystack",
            json("/data/id").or(json("/data/reference")),
            Some(json("/event")),
            true,
        )
    }

    /// Flutterwave, which documents no delivery id that is stable across
    /// retries: the charge's or transfer's `/data/id` together with the
    /// event type at JSON `/type` (current payloads) or `/event` (v3); the
    /// body must be JSON.
    /// <https://developer.flutterwave.com/docs/webhooks>
    pub fn flutterwave() -> Self {
        Self::webhook(
            "flutterwave",
            json("/data/id"),
            Some(json("/type").or(json("/event"))),
            true,
        )
    }

    /// An API keyed by the `Idempotency-Key` header of the IETF draft
    /// (taken raw, byte-exact), required: a request without one gets `400`.
    /// An in-flight duplicate gets `409` at once. The source is left as it
    /// is: set your own.
    /// <https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/>
    pub fn idempotency_key() -> Self {
        Self {
            name: "idempotency-key",
            source: None,
            key: Extractor::header("Idempotency-Key"),
            event_type: None,
            in_flight: InFlight::Conflict,
            json_body: false,
            signature: None,
        }
    }

    /// Verifies each request's signature with `verifier` (normally the
    /// provider's scheme, holding its secrets) before the key is read or
    /// claimed; a missing, malformed, stale or wrong signature gets `401`
    /// and leaves no record.
    pub fn verify_signature(mut self, verifier: impl VerifySignature) -> Self {
        self.signature = Some(Arc::new(verifier));
        self
    }

    /// The preset's name (`"stripe"`, `"github"`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl IdempotencyLayer {
    /// Applies a provider [`Preset`]: its source (except for
    /// [`Preset::idempotency_key`]), key, event type, in-flight policy,
    /// whether the body must be JSON, and its signature check when one was
    /// given. Apply it first; later builder calls override it.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Preset};
    ///
    /// let store = MemoryStore::new(10_000);
    /// let github = IdempotencyLayer::new(store.clone()).preset(Preset::github());
    /// let payments = IdempotencyLayer::new(store).preset(Preset::idempotency_key()).source("payments");
    /// # let _ = (github, payments);
    /// ```
    pub fn preset(self, preset: Preset) -> Self {
        let mut layer = self;
        if let Some(source) = preset.source {
            layer = layer.source(source);
        }
        layer = layer
            .key(preset.key)
            .in_flight(preset.in_flight)
            .json_body(preset.json_body);
        if let Some(event_type) = preset.event_type {
            layer = layer.event_type(event_type);
        }
        if let Some(signature) = preset.signature {
            layer = layer.verify_signature(SharedVerifier(signature));
        }
        layer
    }
}

/// A verifier already behind an `Arc`, passed on without another box.
#[derive(Debug)]
struct SharedVerifier(Arc<dyn VerifySignature>);

impl VerifySignature for SharedVerifier {
    fn verify(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        now: std::time::SystemTime,
    ) -> Result<(), crate::signature::SignatureError> {
        self.0.verify(parts, body, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_builds() {
        let presets = [
            Preset::stripe(),
            Preset::github(),
            Preset::shopify(),
            Preset::standard_webhooks(),
            Preset::svix(),
            Preset::slack(),
            Preset::twilio(),
            Preset::paystack(),
            Preset::flutterwave(),
            Preset::idempotency_key(),
        ];
        let names: Vec<_> = presets.iter().map(Preset::name).collect();
        assert_eq!(
            names,
            [
                "stripe",
                "github",
                "shopify",
                "standard-webhooks",
                "svix",
                "slack",
                "twilio",
                "paystack",
                "flutterwave",
                "idempotency-key"
            ]
        );
        for preset in &presets {
            let webhook = preset.name != "idempotency-key";
            assert_eq!(preset.source.is_some(), webhook, "{}", preset.name);
            assert_eq!(
                preset.in_flight,
                if webhook {
                    InFlight::Wait(WEBHOOK_WAIT)
                } else {
                    InFlight::Conflict
                }
            );
        }
    }
}
