//! Where a request's key and event type come from, and how they are checked.
//!
//! A record is identified by (source, event type, key). The key and the
//! event type are read by an [`Extractor`]: a header, a JSON Pointer into the
//! body, the SHA-256 of the body, or an ordered list of these where the first
//! that yields a value wins.
//!
//! ```
//! use tower_idempotency::Extractor;
//!
//! // GitHub: the delivery GUID header.
//! let github = Extractor::header("X-GitHub-Delivery");
//! // Stripe: the event id in the body.
//! let stripe = Extractor::json("/id").unwrap();
//! // A sender without a documented id: an `id` field, else the body hash.
//! let fallback = Extractor::json("$.id").unwrap().or(Extractor::body_sha256());
//! # let _ = (github, stripe, fallback);
//! ```

mod json;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::fingerprint::write_canonical;

pub use json::InvalidJsonPath;
pub(crate) use json::{JsonBody, JsonPointer};

/// Reads a value (a key or an event type) from a request.
///
/// Built with [`Extractor::header`], [`Extractor::json`] and
/// [`Extractor::body_sha256`]; [`Extractor::or`] chains fallbacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extractor {
    parts: Vec<ExtractorPart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ExtractorPart {
    Header(HeaderName),
    Json(JsonPointer),
    /// A string or integer at the pointer; any other value, or a body that
    /// is not JSON, yields nothing instead of an error.
    JsonIfId(JsonPointer),
    BodySha256,
    FieldsSha256(Vec<KeyField>),
}

/// A part of a request that [`Extractor::fields_sha256`] covers: a JSON
/// Pointer into the body, or a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyField(FieldSource);

#[derive(Clone, Debug, PartialEq, Eq)]
enum FieldSource {
    Json(JsonPointer),
    Header(HeaderName),
}

impl KeyField {
    /// The value at an RFC 6901 JSON Pointer (or the dotted JSONPath subset,
    /// as [`Extractor::json`] accepts) in the JSON body.
    pub fn json(path: &str) -> Result<Self, InvalidJsonPath> {
        Ok(Self(FieldSource::Json(JsonPointer::parse(path)?)))
    }

    /// The value of a request header (case-insensitive name).
    ///
    /// # Panics
    ///
    /// Panics if `name` is not a valid header name, as
    /// [`Extractor::header`] does.
    pub fn header(name: &str) -> Self {
        let name =
            HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|_| panic!("`{name}` is not a valid header name"));
        Self(FieldSource::Header(name))
    }

    /// Appends this field's value, as canonical JSON (`null` when absent),
    /// to `out`.
    fn write(&self, parts: &Parts, json: &mut JsonBody<'_>, out: &mut Vec<u8>) -> Result<(), KeyError> {
        match &self.0 {
            FieldSource::Json(pointer) => {
                let value = json.value()?.and_then(|document| pointer.find(document));
                write_canonical(value.unwrap_or(&Value::Null), out);
            }
            FieldSource::Header(name) => {
                let value = header_value(Role::Key, parts, name)?.map_or(Value::Null, Value::String);
                write_canonical(&value, out);
            }
        }
        Ok(())
    }
}

/// The fields [`Extractor::common_event_id`] tries, in order: names that
/// say "event" first, then the plain `id` most senders use for the event,
/// then delivery ids, then the id or reference of the event's object.
const COMMON_EVENT_IDS: [&str; 13] = [
    "/event_id",        // Slack, Square, Paddle Billing, Typeform
    "/eventId",         // camelCase senders
    "/id",              // Stripe, PayPal, CloudEvents, Intercom
    "/webhook_id",      // Flutterwave (current payloads)
    "/webhookId",       // camelCase senders
    "/notification_id", // Paddle Billing
    "/notificationId",  // camelCase senders
    "/event/id",        // Coinbase Commerce
    "/data/id",         // Paystack, Flutterwave v3
    "/data/reference",  // Paystack
    "/reference",       // payment gateways' top-level reference
    "/tx_ref",          // Flutterwave v3 top-level reference
    "/uuid",            // senders keyed by a bare UUID
];

impl Extractor {
    /// The value of a request header (case-insensitive name). The value is
    /// kept byte-exact; it must be UTF-8, and a header sent more than once
    /// is refused.
    ///
    /// # Panics
    ///
    /// Panics if `name` is not a valid header name; names are fixed at
    /// configuration time, so a typo shows up at start-up.
    pub fn header(name: &str) -> Self {
        let name =
            HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|_| panic!("`{name}` is not a valid header name"));
        Self::single(ExtractorPart::Header(name))
    }

    /// The value at an RFC 6901 JSON Pointer (`/data/object/id`) in a JSON
    /// body; the dotted JSONPath subset (`$.data.object.id`) is accepted too.
    /// A string is used as it is and an integer in its decimal text form.
    pub fn json(path: &str) -> Result<Self, InvalidJsonPath> {
        Ok(Self::single(ExtractorPart::Json(JsonPointer::parse(path)?)))
    }

    /// The lowercase hex SHA-256 of the raw request body.
    pub fn body_sha256() -> Self {
        Self::single(ExtractorPart::BodySha256)
    }

    /// For senders that send no id at all (as webhook gateways offer): the
    /// lowercase hex SHA-256 of the listed fields' values, in their order.
    /// Two deliveries with the same values are the same event, whatever
    /// else their bodies hold. It always yields a key.
    ///
    /// The hash covers the canonical JSON array of the values: a JSON field
    /// as its value with object keys sorted, a header as a JSON string, and
    /// an absent field or header as `null`; so `["ord_1",4200,null]` for
    /// the example below when the header is absent. A body that is not JSON
    /// is `400` when a JSON field is listed.
    ///
    /// ```
    /// use tower_idempotency::{Extractor, IdempotencyLayer, KeyField, MemoryStore};
    ///
    /// // One event per order, amount and shop, however often it is sent.
    /// let key = Extractor::fields_sha256([
    ///     KeyField::json("/order/id").unwrap(),
    ///     KeyField::json("/order/amount").unwrap(),
    ///     KeyField::header("X-Shop-Domain"),
    /// ]);
    /// let layer = IdempotencyLayer::new(MemoryStore::new(1_000)).source("gateway").key(key);
    /// # let _ = layer;
    /// ```
    pub fn fields_sha256<I>(fields: I) -> Self
    where
        I: IntoIterator<Item = KeyField>,
    {
        Self::single(ExtractorPart::FieldsSha256(fields.into_iter().collect()))
    }

    /// For senders that document no event id: the first of the id fields
    /// common in real payloads that holds a string or an integer, else the
    /// body's SHA-256, so it always yields a key. A field of another JSON
    /// type is skipped, and a body that is not JSON is hashed, never
    /// refused. The fields, in order (JSON Pointers): `/event_id`,
    /// `/eventId`, `/id`, `/webhook_id`, `/webhookId`, `/notification_id`,
    /// `/notificationId`, `/event/id`, `/data/id`, `/data/reference`,
    /// `/reference`, `/tx_ref`, `/uuid`.
    ///
    /// Check it against the sender's payloads before relying on it: some
    /// top-level `id`s name the changed object rather than the event (two
    /// updates of one order would then count as one event), and a delivery
    /// id that changes on every retry deduplicates nothing. Pair it with an
    /// event type where the sender has one.
    ///
    /// ```
    /// use tower_idempotency::{Extractor, IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new(1_000))
    ///     .source("acme")
    ///     .key(Extractor::common_event_id());
    /// # let _ = layer;
    /// ```
    pub fn common_event_id() -> Self {
        let mut parts: Vec<ExtractorPart> = COMMON_EVENT_IDS
            .iter()
            .map(|pointer| ExtractorPart::JsonIfId(JsonPointer::from_pointer(pointer)))
            .collect();
        parts.push(ExtractorPart::BodySha256);
        Self { parts }
    }

    /// Tries `self` first and `fallback` when `self` yields nothing.
    #[must_use]
    pub fn or(mut self, fallback: Extractor) -> Self {
        self.parts.extend(fallback.parts);
        self
    }

    fn single(part: ExtractorPart) -> Self {
        Self { parts: vec![part] }
    }

    /// Whether any part reads the body as JSON.
    pub(crate) fn reads_json(&self) -> bool {
        self.parts.iter().any(|part| match part {
            ExtractorPart::Json(_) => true,
            ExtractorPart::FieldsSha256(fields) => fields.iter().any(|field| matches!(field.0, FieldSource::Json(_))),
            _ => false,
        })
    }

    /// The first value a part yields; `None` when no part does.
    pub(crate) fn extract(
        &self,
        role: Role,
        parts: &Parts,
        body: &Bytes,
        json: &mut JsonBody<'_>,
    ) -> Result<Option<String>, KeyError> {
        for part in &self.parts {
            let value = match part {
                ExtractorPart::Header(name) => header_value(role, parts, name)?,
                ExtractorPart::Json(pointer) => json_value(role, json, pointer)?,
                ExtractorPart::JsonIfId(pointer) => json_value(role, json, pointer).ok().flatten(),
                ExtractorPart::BodySha256 => Some(body_sha256_hex(body)),
                ExtractorPart::FieldsSha256(fields) => Some(fields_sha256_hex(fields, parts, json)?),
            };
            if value.is_some() {
                return Ok(value);
            }
        }
        Ok(None)
    }
}

/// What an extracted value is for; the two differ in which JSON types they
/// accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Key,
    EventType,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Key => "key",
            Role::EventType => "event type",
        }
    }

    fn expected_json(self) -> &'static str {
        match self {
            Role::Key => "a string or an integer",
            Role::EventType => "a string",
        }
    }
}

fn header_value(role: Role, parts: &Parts, name: &HeaderName) -> Result<Option<String>, KeyError> {
    let mut values = parts.headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::RepeatedHeader {
            what: role.name(),
            header: name.clone(),
        });
    }
    match std::str::from_utf8(value.as_bytes()) {
        Ok(text) => Ok(Some(text.to_owned())),
        Err(_) => Err(KeyError::NotUtf8 { what: role.name() }),
    }
}

fn json_value(role: Role, json: &mut JsonBody<'_>, pointer: &JsonPointer) -> Result<Option<String>, KeyError> {
    let Some(document) = json.value()? else {
        return Ok(None);
    };
    let wrong_type = |found: &'static str| KeyError::WrongJsonType {
        what: role.name(),
        expected: role.expected_json(),
        pointer: pointer.as_str().to_owned(),
        found,
    };
    match (role, pointer.find(document)) {
        (_, None) | (Role::EventType, Some(Value::Null)) => Ok(None),
        (_, Some(Value::String(text))) => Ok(Some(text.clone())),
        (Role::Key, Some(Value::Number(number))) => {
            if let Some(n) = number.as_i64() {
                Ok(Some(n.to_string()))
            } else if let Some(n) = number.as_u64() {
                Ok(Some(n.to_string()))
            } else {
                Err(wrong_type("a non-integer number"))
            }
        }
        (_, Some(other)) => Err(wrong_type(json_type_name(other))),
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The SHA-256 of the canonical JSON array of the fields' values.
fn fields_sha256_hex(fields: &[KeyField], parts: &Parts, json: &mut JsonBody<'_>) -> Result<String, KeyError> {
    let mut array = vec![b'['];
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            array.push(b',');
        }
        field.write(parts, json, &mut array)?;
    }
    array.push(b']');
    Ok(body_sha256_hex(&array))
}

pub(crate) fn body_sha256_hex(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0x0f)] as char);
    }
    out
}

/// Checks a key, event type or source: at most `max_bytes`, no control
/// characters, and (for keys and sources) not empty.
pub(crate) fn validate(what: &'static str, value: &str, max_bytes: usize, allow_empty: bool) -> Result<(), KeyError> {
    if value.is_empty() && !allow_empty {
        return Err(KeyError::Empty { what });
    }
    if value.len() > max_bytes {
        return Err(KeyError::TooLong { what, max_bytes });
    }
    if value.chars().any(char::is_control) {
        return Err(KeyError::ControlCharacter { what });
    }
    Ok(())
}

/// Why a request's key, event type or source was refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The body is not valid JSON on a route that reads it as JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// A JSON field holds a type that cannot be a key or event type.
    #[error("the {what} at `{pointer}` is {found}; it must be {expected}")]
    WrongJsonType {
        /// Key or event type.
        what: &'static str,
        /// The JSON types accepted.
        expected: &'static str,
        /// The JSON Pointer that was read.
        pointer: String,
        /// The JSON type that was found.
        found: &'static str,
    },
    /// A header that must appear once appeared several times.
    #[error("the {what} header `{header}` was sent more than once")]
    RepeatedHeader {
        /// Key or event type.
        what: &'static str,
        /// The repeated header.
        header: HeaderName,
    },
    /// A header value is not UTF-8.
    #[error("the {what} is not valid UTF-8")]
    NotUtf8 {
        /// Key or event type.
        what: &'static str,
    },
    /// The value is empty.
    #[error("the {what} is empty")]
    Empty {
        /// Key, event type or source.
        what: &'static str,
    },
    /// The value is longer than allowed.
    #[error("the {what} is longer than {max_bytes} bytes")]
    TooLong {
        /// Key, event type or source.
        what: &'static str,
        /// The configured maximum.
        max_bytes: usize,
    },
    /// The value holds a control character.
    #[error("the {what} holds a control character")]
    ControlCharacter {
        /// Key, event type or source.
        what: &'static str,
    },
    /// The key is required and the request carries none.
    #[error("the request carries no idempotency key")]
    Missing,
    /// The per-request source function found no source.
    #[error("no source could be derived for this request")]
    NoSource,
}

/// The identity of a record: (source, event type, key), byte-exact.
///
/// The layer puts it in the request's extensions before calling a protected
/// handler, so the handler can log or store the event id it was called for.
///
/// ```
/// use axum::Extension;
/// use tower_idempotency::RecordKey;
///
/// async fn handler(Extension(record): Extension<RecordKey>) -> String {
///     format!("processing {} event {}", record.source(), record.key())
/// }
/// # let _ = handler;
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub(crate) source: String,
    pub(crate) event_type: String,
    pub(crate) key: String,
}

/// The event type of the body-hash guard's records: it starts with a
/// control character, which [`validate`] refuses in any event type read
/// from a request, so no request can name such a record.
pub(crate) const BODY_RECORD_EVENT_TYPE: &str = "\u{1}body-sha256";

impl RecordKey {
    /// A key `name` under source `s` and no event type, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str) -> Self {
        Self {
            source: "s".into(),
            event_type: String::new(),
            key: name.into(),
        }
    }

    /// The record of a body under `source`, which the body-hash guard
    /// claims beside the key's: its event type is [`BODY_RECORD_EVENT_TYPE`],
    /// which no request's event type can be, and its key the body's
    /// lowercase hex SHA-256.
    pub(crate) fn of_body(source: &str, body: &[u8]) -> Self {
        Self {
            source: source.to_owned(),
            event_type: BODY_RECORD_EVENT_TYPE.to_owned(),
            key: body_sha256_hex(body),
        }
    }

    /// The source (scope) of the route.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The event type; empty when the route reads none.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The key (the event id or the client's `Idempotency-Key`), byte-exact.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A 64-bit advisory lock id for this key inside `namespace` (the table).
    /// A collision only serialises two unrelated keys; the primary key keeps
    /// records apart.
    pub(crate) fn lock_id(&self, namespace: &str) -> i64 {
        let mut hasher = Sha256::new();
        for part in [namespace, &self.source, &self.event_type, &self.key] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(first)
    }
}

/// Derives a request's source from its head.
pub(crate) type DeriveSource = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// The source (scope) of a route: fixed, or derived from each request.
#[derive(Clone)]
pub(crate) enum Source {
    Fixed(String),
    PerRequest(DeriveSource),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Fixed(name) => f.debug_tuple("Fixed").field(name).finish(),
            Source::PerRequest(_) => f.write_str("PerRequest(..)"),
        }
    }
}

impl Source {
    pub(crate) fn resolve(&self, parts: &Parts) -> Result<String, KeyError> {
        match self {
            Source::Fixed(name) => Ok(name.clone()),
            Source::PerRequest(derive) => derive(parts).ok_or(KeyError::NoSource),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &[u8])]) -> Parts {
        let mut builder = Request::builder().method("POST").uri("/x");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn extract(
        extractor: &Extractor,
        role: Role,
        headers: &[(&str, &[u8])],
        body: &'static str,
    ) -> Result<Option<String>, KeyError> {
        let body = Bytes::from_static(body.as_bytes());
        let mut json = JsonBody::new(&body);
        extractor.extract(role, &parts(headers), &body, &mut json)
    }

    fn order_fields() -> Extractor {
        Extractor::fields_sha256([
            KeyField::json("/order/id").unwrap(),
            KeyField::json("$.order.amount").unwrap(),
            KeyField::header("x-shop"),
        ])
    }

    fn order_key(headers: &[(&str, &[u8])], body: &'static str) -> String {
        extract(&order_fields(), Role::Key, headers, body).unwrap().unwrap()
    }

    #[test]
    fn a_fields_key_is_the_sha256_of_their_canonical_json_array() {
        let key = order_key(&[("x-shop", b"acme")], r#"{"order": {"id": "ord_1", "amount": 4200}}"#);
        assert_eq!(key, body_sha256_hex(br#"["ord_1",4200,"acme"]"#));
    }

    #[test]
    fn a_fields_key_counts_an_absent_field_or_header_as_null() {
        let key = order_key(&[], r#"{"order": {"id": "ord_1"}}"#);
        assert_eq!(key, body_sha256_hex(br#"["ord_1",null,null]"#));
    }

    #[test]
    fn a_fields_key_ignores_other_fields_key_order_and_whitespace() {
        let first = order_key(&[], r#"{"order": {"id": "ord_1", "amount": 4200}, "sent_at": 1}"#);
        let again = order_key(&[], r#"{ "sent_at": 2, "order": {"amount": 4200, "id": "ord_1"} }"#);
        assert_eq!(first, again);
    }

    #[test]
    fn a_fields_key_changes_with_any_listed_value() {
        let body = r#"{"order": {"id": "ord_1", "amount": 4200}}"#;
        let base = order_key(&[("x-shop", b"acme")], body);
        assert_ne!(base, order_key(&[("x-shop", b"other")], body));
        assert_ne!(
            base,
            order_key(&[("x-shop", b"acme")], r#"{"order": {"id": "ord_1", "amount": 4201}}"#)
        );
        assert_ne!(
            order_key(&[("x-shop", b"null")], body),
            order_key(&[], body),
            "a header holding `null` is not an absent header"
        );
    }

    #[test]
    fn a_fields_key_refuses_a_body_that_is_not_json_and_a_repeated_header() {
        let malformed = extract(&order_fields(), Role::Key, &[], "{not json");
        assert!(matches!(malformed, Err(KeyError::MalformedJson(_))), "{malformed:?}");
        let repeated = extract(&order_fields(), Role::Key, &[("x-shop", b"a"), ("x-shop", b"b")], "{}");
        assert!(matches!(repeated, Err(KeyError::RepeatedHeader { .. })), "{repeated:?}");
        assert!(order_fields().reads_json());
        assert!(!Extractor::fields_sha256([KeyField::header("x-shop")]).reads_json());
    }

    #[test]
    fn header_values_are_kept_byte_exact() {
        let got = extract(
            &Extractor::header("idempotency-key"),
            Role::Key,
            &[("Idempotency-Key", b"\"AbC\"")],
            "",
        );
        assert_eq!(got.unwrap().as_deref(), Some("\"AbC\""));
    }

    #[test]
    fn repeated_key_headers_are_refused() {
        let got = extract(&Extractor::header("k"), Role::Key, &[("k", b"a"), ("k", b"b")], "");
        assert!(matches!(got, Err(KeyError::RepeatedHeader { .. })));
    }

    #[test]
    fn non_utf8_header_values_are_refused() {
        let got = extract(&Extractor::header("k"), Role::Key, &[("k", b"\xff\xfe")], "");
        assert!(matches!(got, Err(KeyError::NotUtf8 { .. })));
    }

    #[test]
    fn integer_json_ids_use_their_decimal_form() {
        let id = Extractor::json("/id").unwrap();
        assert_eq!(
            extract(&id, Role::Key, &[], r#"{"id": 42}"#).unwrap().as_deref(),
            Some("42")
        );
        assert_eq!(
            extract(&id, Role::Key, &[], r#"{"id": 18446744073709551615}"#)
                .unwrap()
                .as_deref(),
            Some("18446744073709551615")
        );
    }

    #[test]
    fn other_json_id_types_are_refused() {
        let id = Extractor::json("/id").unwrap();
        for body in [
            r#"{"id": 1.5}"#,
            r#"{"id": true}"#,
            r#"{"id": null}"#,
            r#"{"id": []}"#,
            r#"{"id": {}}"#,
        ] {
            assert!(
                matches!(extract(&id, Role::Key, &[], body), Err(KeyError::WrongJsonType { .. })),
                "{body}"
            );
        }
    }

    #[test]
    fn a_null_event_type_is_absent_and_a_number_is_refused() {
        let kind = Extractor::json("/type").unwrap();
        assert_eq!(extract(&kind, Role::EventType, &[], r#"{"type": null}"#).unwrap(), None);
        assert!(extract(&kind, Role::EventType, &[], r#"{"type": 3}"#).is_err());
    }

    #[test]
    fn the_first_extractor_that_yields_wins() {
        let chain = Extractor::json("/id").unwrap().or(Extractor::body_sha256());
        assert_eq!(
            extract(&chain, Role::Key, &[], r#"{"id": "evt_1"}"#)
                .unwrap()
                .as_deref(),
            Some("evt_1")
        );
        let hashed = extract(&chain, Role::Key, &[], r#"{"other": 1}"#).unwrap().unwrap();
        assert_eq!(hashed, body_sha256_hex(br#"{"other": 1}"#));
    }

    #[test]
    fn common_event_ids_are_tried_in_order() {
        let common = Extractor::common_event_id();
        let key = |body: &'static str| extract(&common, Role::Key, &[], body).unwrap();
        assert_eq!(key(r#"{"id": "obj_1", "event_id": "Ev1"}"#).as_deref(), Some("Ev1"));
        assert_eq!(key(r#"{"eventId": 7, "id": "x"}"#).as_deref(), Some("7"));
        assert_eq!(key(r#"{"id": "evt_1", "webhook_id": "w"}"#).as_deref(), Some("evt_1"));
        assert_eq!(
            key(r#"{"webhook_id": "wbk_1", "data": {"id": 2}}"#).as_deref(),
            Some("wbk_1")
        );
        assert_eq!(
            key(r#"{"event": {"id": "ev"}, "data": {"id": 2}}"#).as_deref(),
            Some("ev")
        );
        assert_eq!(
            key(r#"{"event": "charge.success", "data": {"id": 302961, "reference": "r"}}"#).as_deref(),
            Some("302961")
        );
        assert_eq!(
            key(r#"{"data": {"reference": "qTPrJoy9Bx"}}"#).as_deref(),
            Some("qTPrJoy9Bx")
        );
        assert_eq!(key(r#"{"reference": "ref-1", "uuid": "u"}"#).as_deref(), Some("ref-1"));
        assert_eq!(key(r#"{"uuid": "u-1"}"#).as_deref(), Some("u-1"));
    }

    #[test]
    fn common_event_ids_skip_unusable_values_and_fall_back_to_the_body_hash() {
        let common = Extractor::common_event_id();
        let key = |body: &'static str| extract(&common, Role::Key, &[], body).unwrap().unwrap();
        // A wrong-typed field is skipped, not refused.
        assert_eq!(key(r#"{"event_id": {"n": 1}, "id": 1.5, "data": {"id": "d"}}"#), "d");
        for body in [r#"{"other": 1}"#, "[1, 2]", "not json at all", "a=1&b=2", ""] {
            assert_eq!(key(body), body_sha256_hex(body.as_bytes()), "{body:?}");
        }
        assert!(
            !common.reads_json(),
            "a body that is not JSON must not be refused up front"
        );
    }

    #[test]
    fn validation_refuses_empty_long_and_control_values() {
        assert!(validate("key", "", 255, false).is_err());
        assert!(validate("key", &"k".repeat(256), 255, false).is_err());
        assert!(validate("key", &"k".repeat(255), 255, false).is_ok());
        assert!(validate("key", "a\tb", 255, false).is_err());
        assert!(validate("key", "a\u{85}b", 255, false).is_err());
        assert!(validate("event type", "", 255, true).is_ok());
    }

    #[test]
    fn lock_ids_separate_the_parts_of_a_key() {
        let a = RecordKey {
            source: "ab".into(),
            event_type: String::new(),
            key: "c".into(),
        };
        let b = RecordKey {
            source: "a".into(),
            event_type: String::new(),
            key: "bc".into(),
        };
        assert_ne!(a.lock_id("t"), b.lock_id("t"));
        assert_ne!(a.lock_id("t"), a.lock_id("u"));
    }
}
