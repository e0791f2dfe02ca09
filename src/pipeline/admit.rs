//! Admission: whether a request is protected, its body read within its
//! limit, its signature checked, and its identity (source, event type, key,
//! fingerprint). Every refusal here comes before any claim.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::Request;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};

use super::Identity;
use crate::body::BytesBody;
use crate::key::{self, JsonBody, KeyError, RecordKey, Role};
use crate::layer::Config;
use crate::metrics::Outcome;
use crate::policy::MissingKey;
use crate::problem::{Problem, Protocol};
use crate::service::RequestBody;

/// What admission decided.
pub(super) enum Admission<B> {
    /// A protected request, with its identity.
    Protected(Request<RequestBody<B>>, Identity),
    /// A request the route does not protect (its method, a gRPC method not
    /// listed), verified first where the route has a verifier.
    PassThrough(Request<RequestBody<B>>),
    /// A protected request without a key, on a route whose policy is
    /// `MissingKey::PassThrough`.
    WithoutKey(Request<RequestBody<B>>),
    /// Refused before any claim.
    Refused(Refusal),
}

/// A request refused at admission.
pub(super) struct Refusal {
    pub(super) problem: Problem,
    pub(super) detail: String,
    pub(super) outcome: Outcome,
}

impl Refusal {
    fn new(problem: Problem, detail: String) -> Self {
        let outcome = match problem {
            Problem::InvalidSignature => Outcome::SignatureRejected,
            Problem::MissingKey => Outcome::MissingKey,
            _ => Outcome::Rejected,
        };
        Self {
            problem,
            detail,
            outcome,
        }
    }
}

/// Admits a request: the protection decision, the body within its limit,
/// the signature, and the identity, in that order.
///
/// A route with a verifier checks every request before any other decision,
/// so that what a request claims to be (its method, a gRPC-looking content
/// type) can never route a forgery around the check; only a verified
/// request passes through unprotected.
pub(super) async fn admit<B>(
    config: &Config,
    metrics_label: &Arc<str>,
    protocol: Protocol,
    request: Request<B>,
) -> Admission<B>
where
    B: BytesBody,
{
    let protected = config.protects_request(&request);
    if !protected && config.signature.is_none() {
        return Admission::PassThrough(request.map(Either::Right));
    }
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts, body, config.max_request_bytes).await {
        Ok(body) => body,
        Err((problem, detail)) => return Admission::Refused(Refusal::new(problem, detail)),
    };
    if let Some(verifier) = &config.signature {
        if let Err(error) = verifier.verify(&parts, &body, SystemTime::now()) {
            return Admission::Refused(Refusal::new(Problem::InvalidSignature, error.to_string()));
        }
    }
    if !protected {
        return Admission::PassThrough(Request::from_parts(parts, Either::Left(Full::new(body))));
    }
    let identity = identify(config, &parts, &body, protocol, metrics_label);
    let request = Request::from_parts(parts, Either::Left(Full::new(body)));
    match identity {
        Ok(Some(identity)) => Admission::Protected(request, identity),
        Ok(None) => Admission::WithoutKey(request),
        Err(error) => {
            let problem = match error {
                KeyError::MalformedJson(_) => Problem::MalformedJson,
                KeyError::Missing => Problem::MissingKey,
                _ => Problem::InvalidKey,
            };
            Admission::Refused(Refusal::new(problem, error.to_string()))
        }
    }
}

/// Buffers the request body up to the limit: `413` past it, `400` when the
/// body cannot be read.
pub(super) async fn read_body<B>(parts: &Parts, body: B, limit: usize) -> Result<Bytes, (Problem, String)>
where
    B: BytesBody,
{
    let too_large = || {
        (
            Problem::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(error) => Err((
            Problem::BodyUnreadable,
            format!("the request body could not be read: {error}"),
        )),
    }
}

/// Reads the source, event type and key, checks them, and fingerprints the
/// request. `Ok(None)`: no key, and the route passes such requests through.
pub(super) fn identify(
    config: &Config,
    parts: &Parts,
    body: &Bytes,
    protocol: Protocol,
    metrics_label: &Arc<str>,
) -> Result<Option<Identity>, KeyError> {
    let mut json = JsonBody::new(body);
    if config.json_body || config.fingerprint.reads_json() || config.key.reads_json() {
        json.value()?;
    }
    let source = config.source.resolve(parts)?;
    key::validate("source", &source, config.max_key_bytes, false)?;
    let event_type = match &config.event_type {
        Some(extractor) => extractor
            .extract(Role::EventType, parts, body, &mut json)?
            .unwrap_or_default(),
        None => String::new(),
    };
    key::validate("event type", &event_type, config.max_key_bytes, true)?;
    let key = match config.key.extract(Role::Key, parts, body, &mut json)? {
        Some(key) => key,
        None => match config.missing_key {
            MissingKey::Reject => return Err(KeyError::Missing),
            MissingKey::BodyHash => key::body_sha256_hex(body),
            MissingKey::PassThrough => return Ok(None),
        },
    };
    key::validate("key", &key, config.max_key_bytes, false)?;
    let fingerprint = config.fingerprint.digest(parts, body, &mut json)?;
    let body_record = config.body_hash_guard.then(|| RecordKey::of_body(&source, body));
    Ok(Some(Identity {
        record: RecordKey {
            source,
            event_type,
            key,
        },
        body_record,
        fingerprint,
        protocol,
        metrics_label: metrics_label.clone(),
    }))
}
