//! The rules the fuzz targets check, written once: each cargo-fuzz target in `fuzz_targets/`
//! calls one of these on libFuzzer's bytes, and `tests/bad_input.rs` (its property-test twin,
//! `#[path]`-included there) calls the same function on proptest's inputs, so the rule is
//! checked on stable in the normal suite as well as under the fuzzer on nightly.
//!
//! Each function panics when the rule breaks (that is how a fuzzer or a test sees it) and
//! returns normally otherwise, whatever the input.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use eventbus::pb;
use eventbus::service::convert::{self, EventPath, MAX_ATTRIBUTES, MAX_ATTRIBUTE_KEY_BYTES};
use eventbus::service::convert::{MAX_ATTRIBUTE_VALUE_BYTES, MAX_NAME_BYTES};
use eventbus::sublist::SubjectTree;
use eventbus::topic::{Pattern, PatternToken, Topic, MAX_TOPIC_BYTES, RESERVED_PREFIX};
use prost::Message;

/// The syntax `src/topic.rs` documents, written out independently of its parser: dot-separated
/// tokens of `[A-Za-z0-9_-]+`, 1 to 255 bytes; a pattern may have `*` tokens and a last `>`.
fn reference_valid(text: &str, wildcards: bool) -> bool {
    if text.is_empty() || text.len() > MAX_TOPIC_BYTES {
        return false;
    }
    let tokens: Vec<&str> = text.split('.').collect();
    tokens.iter().enumerate().all(|(i, token)| match *token {
        "*" => wildcards,
        ">" => wildcards && i + 1 == tokens.len(),
        _ => {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }
    })
}

/// The topic and pattern parsers on any string: they accept exactly what the documented syntax
/// allows, never panic, and what they accept round-trips (the text is kept as given and its
/// tokens are the text's tokens).
pub fn topic_pattern(text: &str) {
    let topic = Topic::parse(text);
    assert_eq!(
        topic.is_ok(),
        reference_valid(text, false),
        "Topic::parse({text:?})"
    );
    let pattern = Pattern::parse(text);
    assert_eq!(
        pattern.is_ok(),
        reference_valid(text, true),
        "Pattern::parse({text:?})"
    );

    if let Ok(topic) = &topic {
        assert_eq!(topic.as_str(), text);
        assert_eq!(
            topic.tokens().collect::<Vec<_>>(),
            text.split('.').collect::<Vec<_>>()
        );
        assert_eq!(Topic::parse(&topic.to_string()).as_ref(), Ok(topic));
        // A topic is also a literal pattern, and that pattern matches it.
        let literal = pattern.as_ref().expect("a topic is a valid pattern");
        assert!(literal.is_literal());
        assert!(literal.matches(topic));
        let publishable = Topic::parse_client_publishable(text);
        let reserved =
            text.starts_with(RESERVED_PREFIX) && !text.starts_with(eventbus::topic::INBOX_PREFIX);
        assert_eq!(
            publishable.is_ok(),
            !reserved,
            "parse_client_publishable({text:?})"
        );
        assert_eq!(topic.is_publishable_by_clients(), !reserved);
    } else {
        assert!(Topic::parse_client_publishable(text).is_err());
    }

    if let Ok(pattern) = &pattern {
        assert_eq!(pattern.as_str(), text);
        assert_eq!(Pattern::parse(&pattern.to_string()).as_ref(), Ok(pattern));
        let tokens = pattern.tokens();
        assert_eq!(tokens.len(), text.split('.').count());
        for (token, word) in tokens.iter().zip(text.split('.')) {
            match token {
                PatternToken::Any => assert_eq!(word, "*"),
                PatternToken::Rest => assert_eq!(word, ">"),
                PatternToken::Literal(literal) => assert_eq!(&**literal, word),
            }
        }
        assert_eq!(pattern.is_literal(), topic.is_ok());
    }
}

/// A byte cursor: turns fuzzer bytes into small choices, and ends quietly when they run out.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn next(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }
}

/// Tokens of the tiny alphabet the matcher is fuzzed over: few enough that patterns and topics
/// collide often.
const TOKENS: [&str; 4] = ["a", "b", "c", "dd"];

/// A topic of 1 to 4 tokens from `choices`.
fn topic_from(choices: &mut Choices<'_>) -> Option<String> {
    let shape = choices.next()?;
    let len = 1 + (shape & 3) as usize;
    let mut tokens = Vec::with_capacity(len);
    for _ in 0..len {
        tokens.push(TOKENS[(choices.next()? & 3) as usize]);
    }
    Some(tokens.join("."))
}

/// A pattern of 1 to 4 tokens from `choices`: literals, `*`, and perhaps a last `>`.
fn pattern_from(choices: &mut Choices<'_>) -> Option<String> {
    let shape = choices.next()?;
    let len = 1 + (shape & 3) as usize;
    let mut tokens = Vec::with_capacity(len);
    for _ in 0..len {
        let choice = choices.next()? % 6;
        tokens.push(if choice < 4 {
            TOKENS[choice as usize]
        } else {
            "*"
        });
    }
    if shape & 4 != 0 {
        *tokens.last_mut().expect("at least one token") = ">";
    }
    Some(tokens.join("."))
}

/// The naive matcher the subject tree is checked against: token by token, `*` one token, `>`
/// one or more trailing tokens.
fn reference_matches(pattern: &str, topic: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let topic: Vec<&str> = topic.split('.').collect();
    for (i, p) in pattern.iter().enumerate() {
        match *p {
            ">" => return topic.len() > i,
            "*" => {
                if i >= topic.len() {
                    return false;
                }
            }
            literal => {
                if topic.get(i) != Some(&literal) {
                    return false;
                }
            }
        }
    }
    topic.len() == pattern.len()
}

/// The subject tree against [`reference_matches`] over a list of subscriptions: any sequence of
/// inserts, removals and matches (plain, or matching that drops some subscribers and prunes)
/// leaves the tree finding exactly the subscriptions the reference finds, holding exactly the
/// live patterns, and empty exactly when nothing is subscribed.
pub fn sublist_matcher(bytes: &[u8]) {
    let mut choices = Choices(bytes);
    let mut tree = SubjectTree::<Vec<u32>>::new();
    // The reference: (pattern, subscriber id), in insertion order.
    let mut live: Vec<(String, u32)> = Vec::new();
    let mut next_id = 0u32;
    while let Some(op) = choices.next() {
        match op % 4 {
            0 | 1 => {
                let Some(text) = pattern_from(&mut choices) else {
                    break;
                };
                let pattern = Pattern::parse(&text).expect("generated patterns are valid");
                tree.entry(&pattern).push(next_id);
                live.push((text, next_id));
                next_id += 1;
            }
            2 => {
                let Some(pick) = choices.next() else { break };
                if live.is_empty() {
                    continue;
                }
                let (text, id) = live.remove(pick as usize % live.len());
                let pattern = Pattern::parse(&text).unwrap();
                let values = tree
                    .get_mut(&pattern)
                    .expect("a live pattern is in the tree");
                let at = values
                    .iter()
                    .position(|v| *v == id)
                    .expect("its id is there");
                values.remove(at);
                tree.remove_if(&pattern, Vec::is_empty);
            }
            _ => {
                let Some(text) = topic_from(&mut choices) else {
                    break;
                };
                let Some(drop_every) = choices.next() else {
                    break;
                };
                let topic = Topic::parse(&text).expect("generated topics are valid");
                let mut expected: Vec<u32> = live
                    .iter()
                    .filter(|(p, _)| reference_matches(p, &text))
                    .map(|(_, id)| *id)
                    .collect();
                expected.sort_unstable();
                let mut found = Vec::new();
                if drop_every & 1 == 0 {
                    tree.for_each_match(&topic, |ids| found.extend_from_slice(ids));
                } else {
                    // Matching that drops the subscribers whose id is divisible by `modulus`, as
                    // the broker drops subscribers that are gone, and prunes what it emptied.
                    let modulus = 1 + u32::from(drop_every >> 1) % 3;
                    tree.for_each_match_and_prune(
                        &topic,
                        |ids| {
                            found.extend_from_slice(ids);
                            ids.retain(|id| id % modulus != 0);
                        },
                        Vec::is_empty,
                    );
                    live.retain(|(p, id)| !(reference_matches(p, &text) && id % modulus == 0));
                }
                found.sort_unstable();
                assert_eq!(found, expected, "subscriptions matching {text:?}");
            }
        }
        assert_eq!(
            tree.is_empty(),
            live.is_empty(),
            "empty tree iff no subscriptions"
        );
    }
    let mut in_tree: Vec<(String, Vec<u32>)> = Vec::new();
    tree.for_each(|text, ids| {
        let mut ids = ids.clone();
        ids.sort_unstable();
        in_tree.push((text.to_owned(), ids));
    });
    in_tree.sort();
    let mut expected: HashMap<String, Vec<u32>> = HashMap::new();
    for (text, id) in &live {
        expected.entry(text.clone()).or_default().push(*id);
    }
    let mut expected: Vec<(String, Vec<u32>)> = expected.into_iter().collect();
    for (_, ids) in &mut expected {
        ids.sort_unstable();
    }
    expected.sort();
    assert_eq!(
        in_tree, expected,
        "the tree holds exactly the live patterns"
    );
}

/// The config file parser on any bytes: it never panics, every failure is a `ConfigError`
/// value, and a file it accepts passes the same checks again and yields a valid bus config.
pub fn config_file(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        // A file that is not UTF-8 is refused when read, before parsing.
        return;
    };
    let path = Path::new("fuzz.toml");
    match eventbus::config::parse_config_text(text, path) {
        Ok((server, _log)) => {
            server
                .bus
                .validate()
                .expect("an accepted config is a valid one");
            assert!(server.max_concurrent_streams >= 1);
            assert!(server.receive_budget_bytes >= server.bus.max_message_bytes);
            assert!(!server.handshake_timeout.is_zero());
        }
        Err(error) => {
            // An error is a value that can be shown.
            let _ = error.to_string();
        }
    }
}

/// The message limit the publish path is checked with: the default, and a small one so the
/// size rule is exercised by small inputs too.
const MESSAGE_LIMITS: [usize; 2] = [16 * 1024 * 1024, convert::DELIVERY_OVERHEAD_BYTES + 64];

/// What `event_from_pb` documents about every event it accepts.
fn assert_within_limits(
    wire: &pb::Event,
    event: &eventbus::event::Event,
    max_message_bytes: usize,
) {
    assert!(wire.encoded_len() + convert::DELIVERY_OVERHEAD_BYTES <= max_message_bytes);
    assert_eq!(event.topic.as_str(), wire.topic);
    assert!(event.topic.is_publishable_by_clients());
    assert!(!event.source.is_empty());
    for name in [
        &wire.id,
        &wire.source,
        &wire.r#type,
        &wire.data_content_type,
        &wire.correlation_id,
        &wire.causation_id,
    ] {
        assert!(name.len() <= MAX_NAME_BYTES);
        assert!(!name.chars().any(char::is_control));
    }
    assert_eq!(&*event.source, wire.source);
    assert_eq!(event.id, wire.id);
    let expected_type = if wire.r#type.is_empty() {
        &wire.topic
    } else {
        &wire.r#type
    };
    assert_eq!(&event.event_type, expected_type);
    assert_eq!(event.data, wire.data);
    assert_eq!(
        event.reply_to.as_ref().map(Topic::as_str).unwrap_or(""),
        wire.reply_to
    );
    if let Some(reply_to) = &event.reply_to {
        assert!(reply_to.is_publishable_by_clients());
    }
    assert_eq!(event.time.is_some(), wire.time.is_some());
    assert!(event.attributes.len() <= MAX_ATTRIBUTES);
    for (key, value) in &event.attributes {
        assert!(!key.is_empty() && key.len() <= MAX_ATTRIBUTE_KEY_BYTES);
        assert!(key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
        assert!(value.len() <= MAX_ATTRIBUTE_VALUE_BYTES);
    }
}

/// `event_from_pb` and `events_from_pb` on any bytes decoded as an `Event` and as a
/// `PublishRequest`: they never panic, errors are values naming a field, accepted events keep
/// every documented limit, and a batch is accepted exactly when each of its events is.
pub fn event_from_pb(bytes: &[u8]) {
    if let Ok(wire) = pb::Event::decode(bytes) {
        for limit in MESSAGE_LIMITS {
            match convert::event_from_pb(wire.clone(), EventPath::Named("event"), limit) {
                Ok(event) => assert_within_limits(&wire, &event, limit),
                Err(error) => assert!(error.to_string().contains("event")),
            }
        }
    }
    if let Ok(request) = pb::PublishRequest::decode(bytes) {
        for limit in MESSAGE_LIMITS {
            let each: Vec<bool> = request
                .events
                .iter()
                .map(|e| convert::event_from_pb(e.clone(), EventPath::Named("e"), limit).is_ok())
                .collect();
            match convert::events_from_pb(request.events.clone(), limit) {
                Ok(events) => {
                    assert!(each.iter().all(|ok| *ok));
                    assert_eq!(events.len(), request.events.len());
                    for (wire, event) in request.events.iter().zip(&events) {
                        assert_within_limits(wire, event, limit);
                    }
                }
                Err(error) => {
                    assert!(each.iter().any(|ok| !ok), "a batch of valid events refused");
                    assert!(error.to_string().contains("events["));
                }
            }
        }
    }
}
