//! The decoding of stored responses: the `response_headers` column is read
//! back from the database, so any bytes must decode or be refused, never
//! panic, and whatever decodes must re-encode to the same headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_idempotency::fuzzing::stored_response_headers(data);
});
