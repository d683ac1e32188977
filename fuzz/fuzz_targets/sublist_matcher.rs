//! Fuzzes the subject tree (`src/sublist.rs`) against a naive token-by-token matcher: any
//! sequence of inserts, removals and matches finds exactly the subscriptions the reference finds.
//! The rule lives in `fuzz/properties.rs`, shared with its property-test twin
//! (`tests/bad_input.rs`).
#![no_main]

#[path = "../properties.rs"]
mod properties;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| properties::sublist_matcher(bytes));
