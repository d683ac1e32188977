//! Fuzzes `service::convert::event_from_pb` and `events_from_pb` on arbitrary protobuf bytes
//! decoded as `pb::Event` and `pb::PublishRequest`: never a panic, and accepted events keep
//! every documented limit.
//! The rule lives in `fuzz/properties.rs`, shared with its property-test twin
//! (`tests/bad_input.rs`).
#![no_main]

#[path = "../properties.rs"]
mod properties;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| properties::event_from_pb(bytes));
