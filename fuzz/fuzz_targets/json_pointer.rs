//! JSON Pointer and dotted JSONPath parsing, and lookups over arbitrary
//! JSON: never a panic; a valid path is a pointer ("" or starting with
//! "/"); a dotted path built from plain tokens finds what sits at those keys.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    path: &'a str,
    document: &'a [u8],
    tokens: Vec<&'a str>,
}

fuzz_target!(|input: Input<'_>| {
    let document: Value = serde_json::from_slice(input.document).unwrap_or(Value::Null);
    if let Some((pointer, _)) = tower_idempotency::fuzzing::json_pointer(input.path, &document) {
        assert!(
            pointer.is_empty() || pointer.starts_with('/'),
            "{:?} -> {pointer:?}",
            input.path
        );
    }

    // `$.a.b` over {"a": {"b": marker}} finds the marker, whatever the
    // tokens hold besides the separators `.` and `[`.
    let tokens: Vec<&str> = input
        .tokens
        .iter()
        .copied()
        .filter(|token| !token.is_empty() && !token.contains(['.', '[']))
        .take(8)
        .collect();
    if tokens.is_empty() {
        return;
    }
    let path: String = std::iter::once("$".to_owned())
        .chain(tokens.iter().map(|token| format!(".{token}")))
        .collect();
    let mut nested = json!("marker");
    for token in tokens.iter().rev() {
        nested = json!({ *token: nested });
    }
    let found = tower_idempotency::fuzzing::json_pointer(&path, &nested);
    assert_eq!(
        found.as_ref().and_then(|(_, value)| value.clone()),
        Some(json!("marker")),
        "{path} -> {found:?}"
    );
});
