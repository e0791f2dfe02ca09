//! The store's statements (the same texts as the tokio-postgres store's, in
//! `store/postgres/sql.rs`) run through sqlx, in one of two ways:
//!
//! - prepared: the values bound, the statement cached per connection by
//!   sqlx (one round trip once it is prepared);
//! - inline: the values written into the text as typed literals and the
//!   whole sent as one simple query. sqlx waits for each prepared
//!   statement's answer before it sends the next, so this is how several
//!   statements travel in one round trip, as the tokio-postgres store
//!   pipelines them; it also uses no named statement, which a pooler in
//!   transaction mode needs.
//!
//! A simple query's rows come in the text format; every column the store
//! reads decodes from either format.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::sqlx::error::BoxDynError;
use ::sqlx::postgres::types::Oid;
use ::sqlx::postgres::{PgArguments, PgRow, PgTypeInfo, PgValueFormat, PgValueRef};
use ::sqlx::query::Query;
use ::sqlx::{Decode, Postgres, Row, Type};

use crate::store::postgres::lookup_from_columns;
use crate::store::{Lookup, StoreError};

/// One value of a statement's parameters (`$1`, `$2`, ...), in the order
/// they are numbered.
#[derive(Clone, Copy, Debug)]
pub(super) enum Value<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
    OptionalBytes(Option<&'a [u8]>),
    SmallInt(i16),
    BigInt(i64),
    Float(f64),
    Uuid(uuid::Uuid),
}

/// `sql` with its values bound, for a prepared statement.
pub(super) fn bind<'q>(
    mut query: Query<'q, Postgres, PgArguments>,
    values: &[Value<'q>],
) -> Query<'q, Postgres, PgArguments> {
    for value in values {
        query = match *value {
            Value::Text(text) => query.bind(text),
            Value::Bytes(bytes) => query.bind(bytes),
            Value::OptionalBytes(bytes) => query.bind(bytes),
            Value::SmallInt(number) => query.bind(number),
            Value::BigInt(number) => query.bind(number),
            Value::Float(number) => query.bind(number),
            Value::Uuid(uuid) => query.bind(uuid),
        };
    }
    query
}

/// `sql` with each `$n` replaced by the literal of `values[n - 1]`. The
/// store's statements use `$` for nothing else.
///
/// Each literal is typed and parenthesised, so that it reads as the bound
/// value would: text as an escape string (`E'...'`, whose backslashes and
/// quotes are escaped, so the value cannot end it), bytes as hex, numbers
/// quoted and cast (a negative number cannot become an operator).
pub(super) fn inline(sql: &str, values: &[Value<'_>]) -> String {
    let mut out = String::with_capacity(sql.len() + values.iter().map(literal_len).sum::<usize>());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let value = after[..digits]
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|index| values.get(index));
        match value {
            Some(value) => write_literal(&mut out, value),
            None => out.push_str(&rest[at..at + 1 + digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

fn literal_len(value: &Value<'_>) -> usize {
    match value {
        Value::Text(text) => text.len() + 16,
        Value::Bytes(bytes) | Value::OptionalBytes(Some(bytes)) => bytes.len() * 2 + 16,
        _ => 48,
    }
}

fn write_literal(out: &mut String, value: &Value<'_>) {
    match *value {
        Value::Text(text) => {
            out.push_str("(E'");
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("''"),
                    // The server refuses a zero byte in text, as it does
                    // a bound one; the escape keeps the message intact.
                    '\0' => out.push_str("\\000"),
                    c => out.push(c),
                }
            }
            out.push_str("'::text)");
        }
        Value::Bytes(bytes) | Value::OptionalBytes(Some(bytes)) => {
            out.push_str("(E'\\\\x");
            out.push_str(&hex::encode(bytes));
            out.push_str("'::bytea)");
        }
        Value::OptionalBytes(None) => out.push_str("(NULL::bytea)"),
        Value::SmallInt(number) => {
            let _ = write!(out, "('{number}'::int2)");
        }
        Value::BigInt(number) => {
            let _ = write!(out, "('{number}'::int8)");
        }
        Value::Float(number) => {
            let _ = write!(out, "('{number:?}'::float8)");
        }
        Value::Uuid(uuid) => {
            let _ = write!(out, "('{uuid}'::uuid)");
        }
    }
}

/// A live record read from a row of the lookup's columns.
pub(super) fn lookup_from_row(row: &PgRow) -> Result<Lookup, StoreError> {
    let state: i16 = row.try_get("state")?;
    let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
    let status: Option<i16> = row.try_get("response_status")?;
    let headers: Option<Vec<u8>> = row.try_get("response_headers")?;
    let body: Option<Vec<u8>> = row.try_get("response_body")?;
    lookup_from_columns(state, &fingerprint, status, headers.as_deref(), body.as_deref())
}

/// A `timestamptz`, decoded without a date-time crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Timestamp(pub(super) SystemTime);

/// Postgres' epoch, 2000-01-01 UTC, in Unix seconds.
const POSTGRES_EPOCH: u64 = 946_684_800;

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(1184))
    }
}

impl<'r> Decode<'r, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let bytes: [u8; 8] = value.as_bytes()?.try_into()?;
                let micros = i64::from_be_bytes(bytes);
                let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH);
                let offset = Duration::from_micros(micros.unsigned_abs());
                Ok(Timestamp(if micros >= 0 { epoch + offset } else { epoch - offset }))
            }
            PgValueFormat::Text => parse_timestamp(value.as_str()?)
                .map(Timestamp)
                .ok_or_else(|| format!("`{}` is not a timestamptz in ISO form", value.as_str().unwrap_or("")).into()),
        }
    }
}

/// Parses the ISO text form of a `timestamptz` (`DateStyle` ISO, which
/// sqlx asks for on connect): `2026-05-10 12:34:56.123456+00`, the offset
/// `±hh`, `±hh:mm` or `±hh:mm:ss`.
fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let (date, time) = text.split_once(' ')?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    let sign_at = time.find(['+', '-'])?;
    let (clock, offset) = time.split_at(sign_at);
    let mut clock_parts = clock.splitn(3, ':');
    let hour: i64 = clock_parts.next()?.parse().ok()?;
    let minute: i64 = clock_parts.next()?.parse().ok()?;
    let seconds = clock_parts.next()?;
    let (second, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let second: i64 = second.parse().ok()?;
    let mut nanos: u32 = 0;
    for (place, digit) in fraction.bytes().take(9).enumerate() {
        let digit = char::from(digit).to_digit(10)?;
        nanos += digit * 10_u32.pow(8 - place as u32);
    }
    let offset_sign: i64 = if offset.starts_with('-') { -1 } else { 1 };
    let mut offset_seconds = 0_i64;
    for (index, part) in offset[1..].split(':').enumerate() {
        let value: i64 = part.parse().ok()?;
        offset_seconds += value * [3600, 60, 1].get(index)?;
    }
    let days = days_from_civil(year, month, day)?;
    let unix = days * 86_400 + hour * 3600 + minute * 60 + second - offset_sign * offset_seconds;
    let whole = Duration::from_secs(unix.unsigned_abs());
    let base = if unix >= 0 {
        UNIX_EPOCH + whole
    } else {
        UNIX_EPOCH - whole
    };
    Some(base + Duration::from_nanos(u64::from(nanos)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_typed_literals_in_place_of_their_numbers() {
        let sql = "SELECT $1, $2, $10, $3 FROM t WHERE a = $1";
        let values = [
            Value::Text("it's a \\ key"),
            Value::Bytes(&[0xde, 0xad]),
            Value::BigInt(i64::MIN),
        ];
        assert_eq!(
            inline(sql, &values),
            "SELECT (E'it''s a \\\\ key'::text), (E'\\\\xdead'::bytea), $10, ('-9223372036854775808'::int8) \
             FROM t WHERE a = (E'it''s a \\\\ key'::text)"
        );
        assert_eq!(
            inline(
                "$1 $2 $3 $4",
                &[
                    Value::OptionalBytes(None),
                    Value::SmallInt(-1),
                    Value::Float(0.5),
                    Value::Uuid(uuid::Uuid::nil()),
                ]
            ),
            "(NULL::bytea) ('-1'::int2) ('0.5'::float8) ('00000000-0000-0000-0000-000000000000'::uuid)"
        );
    }

    #[test]
    fn a_zero_byte_in_text_is_escaped_not_sent_raw() {
        assert_eq!(inline("$1", &[Value::Text("a\0b")]), "(E'a\\000b'::text)");
    }

    #[test]
    fn iso_timestamps_parse_with_any_offset_and_fraction() {
        let at = |secs: u64, micros: u64| UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
        assert_eq!(parse_timestamp("1970-01-01 00:00:00+00"), Some(at(0, 0)));
        assert_eq!(
            parse_timestamp("2026-05-10 12:34:56.123456+00"),
            Some(at(1_778_416_496, 123_456))
        );
        assert_eq!(
            parse_timestamp("2026-05-10 14:34:56.5+02:00"),
            Some(at(1_778_416_496, 500_000))
        );
        assert_eq!(parse_timestamp("2000-02-29 00:00:00-01"), Some(at(951_786_000, 0)));
        assert_eq!(parse_timestamp("not a time"), None);
    }
}
