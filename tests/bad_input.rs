//! The fuzz targets' property-test twins: the rules in `fuzz/properties.rs` (topic and pattern
//! parsing, the subject tree against a reference matcher, the config file parser, and
//! `event_from_pb` on arbitrary protobuf bytes), checked here on proptest's inputs so they run
//! on stable in the normal suite; `scripts/fuzz.sh` runs the same rules under libFuzzer when a
//! nightly toolchain exists.
//!
//! Inputs mix plain random bytes with ones shaped like the real thing (near-valid topics, TOML
//! with real keys, encoded events with wild field values), since random bytes rarely get past
//! the first check.

#[path = "../fuzz/properties.rs"]
mod properties;

use eventbus::pb;
use proptest::prelude::*;
use prost::Message;

/// Strings that are often valid topics or patterns, and often nearly so.
fn topicish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => "[a-c_-]{1,3}",
        1 => Just("*".to_owned()),
        1 => Just(">".to_owned()),
        1 => Just(String::new()),
        1 => Just("_bus".to_owned()),
        1 => Just("inbox".to_owned()),
        1 => "\\PC{1,2}",
    ];
    prop::collection::vec(token, 1..6).prop_map(|tokens| tokens.join("."))
}

/// TOML documents built from the config file's real keys, with values of every type.
fn tomlish() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "listen",
        "retention_max_events",
        "retention_max_bytes",
        "retention_max_age",
        "storage",
        "nats_url",
        "jetstream_stream",
        "jetstream_replicas",
        "fsync",
        "segment_bytes",
        "subscriber_queue_size",
        "subscriber_queue_bytes",
        "delivery_buffer_bytes",
        "max_subscriber_lag",
        "max_event_data_bytes",
        "max_batch_events",
        "max_message_bytes",
        "default_query_timeout",
        "max_query_timeout",
        "names_idle_after",
        "max_names",
        "keepalive_interval",
        "receive_timeout",
        "receive_budget_bytes",
        "max_concurrent_streams",
        "max_connections",
        "handshake_timeout",
        "admin_listen",
        "log_format",
        "unknown_key",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000_000).prop_map(|n| n.to_string()),
        Just("0".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("\"0s\"".to_owned()),
        Just("\"99999999999999999999d\"".to_owned()),
        Just("\"5s\"".to_owned()),
        Just("\"memory\"".to_owned()),
        Just("\"jetstream\"".to_owned()),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("[\"nats://a:1\", \" \"]".to_owned()),
        Just("\"\"".to_owned()),
        Just("true".to_owned()),
        Just("1.5".to_owned()),
        "\"\\PC{0,8}\"",
    ];
    prop::collection::vec((key, value), 0..8).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect()
    })
}

/// Events with every field drawn from valid, limit-edge and invalid values.
fn wire_event() -> impl Strategy<Value = pb::Event> {
    let name = prop_oneof![
        Just(String::new()),
        "[a-z]{1,8}",
        "\\PC{0,4}",
        Just("\u{7}".to_owned()),
        Just("n".repeat(256)),
        Just("n".repeat(257)),
    ];
    let topic = prop_oneof![topicish(), Just("_bus.inbox.x".to_owned())];
    let attributes = prop::collection::hash_map(
        prop_oneof!["[a-z._-]{0,4}", "\\PC{1,3}", Just("k".repeat(129))],
        prop_oneof!["[a-z]{0,4}", Just("v".repeat(4097))],
        0..4,
    );
    let time = prop::option::of((any::<i64>(), any::<i32>()))
        .prop_map(|t| t.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }));
    (
        (topic, name.clone(), name.clone(), name.clone()),
        (
            name.clone(),
            name,
            prop_oneof![Just(String::new()), topicish()],
        ),
        (attributes, time, prop::collection::vec(any::<u8>(), 0..200)),
    )
        .prop_map(
            |((topic, id, source, r#type), (correlation_id, causation_id, reply_to), rest)| {
                let (attributes, time, data) = rest;
                pb::Event {
                    topic,
                    id,
                    source,
                    r#type,
                    correlation_id,
                    causation_id,
                    reply_to,
                    attributes,
                    time,
                    data: data.into(),
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn topic_pattern_on_shaped_strings(text in topicish()) {
        properties::topic_pattern(&text);
    }

    #[test]
    fn topic_pattern_on_any_string(text in "\\PC{0,300}") {
        properties::topic_pattern(&text);
    }

    #[test]
    fn sublist_matcher_on_any_operations(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        properties::sublist_matcher(&bytes);
    }

    #[test]
    fn config_file_on_shaped_toml(text in tomlish()) {
        properties::config_file(text.as_bytes());
    }

    #[test]
    fn config_file_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        properties::config_file(&bytes);
    }

    #[test]
    fn event_from_pb_on_encoded_events(events in prop::collection::vec(wire_event(), 0..4)) {
        let request = pb::PublishRequest { events };
        properties::event_from_pb(&request.encode_to_vec());
        if let Some(event) = request.events.first() {
            properties::event_from_pb(&event.encode_to_vec());
        }
    }

    #[test]
    fn event_from_pb_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        properties::event_from_pb(&bytes);
    }
}
