//! Admission: the body read within its limit, and the request's identity
//! (source, event type, key, fingerprint).

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::Identity;
use crate::body::BoxError;
use crate::key::{self, JsonBody, KeyError, RecordKey, Role};
use crate::layer::Config;
use crate::policy::MissingKey;
use crate::problem::{Problem, Protocol};

/// Buffers the request body up to the limit: `413` past it, `400` when the
/// body cannot be read.
pub(super) async fn read_body<B>(parts: &Parts, body: B, limit: usize) -> Result<Bytes, (Problem, String)>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
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
    if config.require_json || config.fingerprint.reads_json() || config.key.reads_json() {
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
    Ok(Some(Identity {
        key: RecordKey {
            source,
            event_type,
            key,
        },
        fingerprint,
        protocol,
        metrics_label: metrics_label.clone(),
    }))
}
