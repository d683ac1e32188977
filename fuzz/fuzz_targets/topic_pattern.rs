//! Fuzzes the topic and pattern parser (`src/topic.rs`): any string is accepted exactly when the
//! documented syntax allows it, never panics, and what is accepted round-trips.
//! The rule lives in `fuzz/properties.rs`, shared with its property-test twin
//! (`tests/bad_input.rs`).
#![no_main]

#[path = "../properties.rs"]
mod properties;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| properties::topic_pattern(text));
