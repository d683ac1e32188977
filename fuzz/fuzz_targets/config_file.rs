//! Fuzzes the TOML config file parser (`eventbus::config::parse_config_text`) on arbitrary
//! bytes: it never panics, errors are values, and what it accepts is a valid config.
//! The rule lives in `fuzz/properties.rs`, shared with its property-test twin
//! (`tests/bad_input.rs`).
#![no_main]

#[path = "../properties.rs"]
mod properties;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| properties::config_file(bytes));
