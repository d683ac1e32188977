//! Events as CloudEvents 1.0 JSON documents (the JSON event format,
//! <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md>), both
//! ways: what `subscribe --json` and `query --json` print, and what `publish --cloudevent`
//! reads. Pure functions, so the mapping is tested here and the commands stay thin.
//!
//! The mapping of a bus event:
//! - `id`, `source`, `type`, `time` (RFC 3339), `datacontenttype` are the CloudEvents context
//!   attributes of the same meaning; `specversion` is always `"1.0"`.
//! - The payload is `data` holding the JSON value itself when the content type is JSON and the
//!   data parses, `data` holding a string when the content type is text (`text/*`, or unset)
//!   and the data is UTF-8, and `data_base64` otherwise. Empty data is left out.
//! - The bus's own fields are extensions, lower-case without underscores as the spec requires:
//!   `topic`, `sequence`, `publishtime`, `correlationid`, `causationid`, `replyto`. `sequence`
//!   is a decimal string, as the spec's documented `sequence` extension is a string (and a
//!   CloudEvents Integer holds 32 bits only).
//! - The event's attributes become extensions when their names are valid extension names
//!   (lower-case ASCII letters and digits) and not taken by the spec or by the fields above;
//!   an attribute named `subject` or `dataschema` becomes that context attribute. The others
//!   (e.g. `dlq_original_topic`) cannot be written as CloudEvents attributes and are left out:
//!   [`left_out_attributes`] names them so the command can say so.
//! - Unset fields are left out, never written as empty strings.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::format::parse_time;
use crate::pb;

/// The CloudEvents version written and accepted.
pub const SPEC_VERSION: &str = "1.0";

/// Context attribute names the spec defines (and `data`, which it reserves): never taken from
/// an event's attributes.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
];

/// The extensions that carry the bus's own fields.
const BUS_EXTENSIONS: &[&str] = &[
    "topic",
    "sequence",
    "publishtime",
    "correlationid",
    "causationid",
    "replyto",
];

/// Attributes mapped to optional context attributes instead of extensions.
const MAPPED: &[&str] = &["subject", "dataschema"];

/// Whether `name` is a valid CloudEvents attribute name: lower-case ASCII letters and digits,
/// at least one.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether an attribute of the event is written to the CloudEvents document.
fn is_written(name: &str) -> bool {
    MAPPED.contains(&name)
        || (is_valid_name(name) && !RESERVED.contains(&name) && !BUS_EXTENSIONS.contains(&name))
}

/// The event's attributes that [`to_json`] leaves out, sorted: their names are not valid
/// CloudEvents attribute names, or are taken by the spec or by the bus's own extensions.
pub fn left_out_attributes(event: &pb::Event) -> Vec<&str> {
    let mut names: Vec<&str> = event
        .attributes
        .keys()
        .map(String::as_str)
        .filter(|name| !is_written(name))
        .collect();
    names.sort_unstable();
    names
}

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// `application/json` or any `+json` type, parameters ignored.
pub fn is_json(content_type: &str) -> bool {
    let media = media_type(content_type);
    media.eq_ignore_ascii_case("application/json") || media.ends_with("+json")
}

/// `text/*`, or no content type at all (the CLI publishes plain text without one).
fn is_text(content_type: &str) -> bool {
    let media = media_type(content_type);
    media.is_empty() || media.starts_with("text/")
}

/// One event as a CloudEvents 1.0 JSON object (the mapping is in the module docs).
pub fn to_json(event: &pb::Event) -> Value {
    let mut object = Map::new();
    let mut put = |key: &str, value: &str| {
        if !value.is_empty() {
            object.insert(key.to_owned(), Value::String(value.to_owned()));
        }
    };
    put("specversion", SPEC_VERSION);
    put("id", &event.id);
    put("source", &event.source);
    put("type", &event.r#type);
    put("time", &rfc3339(event.time.as_ref()));
    put("datacontenttype", &event.data_content_type);
    put("topic", &event.topic);
    if event.sequence != 0 {
        put("sequence", &event.sequence.to_string());
    }
    put("publishtime", &rfc3339(event.publish_time.as_ref()));
    put("correlationid", &event.correlation_id);
    put("causationid", &event.causation_id);
    put("replyto", &event.reply_to);
    let attributes: BTreeMap<_, _> = event
        .attributes
        .iter()
        .filter(|(name, _)| is_written(name))
        .collect();
    for (name, value) in attributes {
        put(name, value);
    }
    if !event.data.is_empty() {
        let (key, value) = data_member(&event.data_content_type, &event.data);
        object.insert(key.to_owned(), value);
    }
    Value::Object(object)
}

/// A protobuf timestamp as RFC 3339 in UTC with as many fraction digits as it needs (none,
/// 3, 6 or 9), so `12:00:00.250Z` comes back as it went in; empty when unset or out of range.
fn rfc3339(time: Option<&prost_types::Timestamp>) -> String {
    time.and_then(|time| SystemTime::try_from(*time).ok())
        .and_then(crate::timefmt::format_time)
        .unwrap_or_default()
}

/// `("data", value)` or `("data_base64", text)` for a payload of the given content type.
fn data_member(content_type: &str, data: &[u8]) -> (&'static str, Value) {
    if is_json(content_type) {
        if let Ok(value) = serde_json::from_slice::<Value>(data) {
            return ("data", value);
        }
    } else if is_text(content_type) {
        if let Ok(text) = std::str::from_utf8(data) {
            return ("data", Value::String(text.to_owned()));
        }
    }
    (
        "data_base64",
        Value::String(base64::engine::general_purpose::STANDARD.encode(data)),
    )
}

/// Why a CloudEvents document cannot be published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CloudEventError {
    /// The text is not JSON, or not a JSON object.
    #[error("not a CloudEvents JSON object: {0}")]
    NotAnObject(String),
    /// `specversion` is missing or not `1.0`.
    #[error("specversion: must be \"1.0\", got {0}")]
    SpecVersion(String),
    /// A context attribute or extension has the wrong JSON type or an unreadable value.
    #[error("{name}: {rule}")]
    Attribute {
        /// The member's name.
        name: String,
        /// What it must be.
        rule: &'static str,
    },
    /// Neither the `topic` extension nor `--topic` names the topic.
    #[error("topic: the document has no `topic` extension; name the topic with --topic")]
    NoTopic,
    /// Both `data` and `data_base64` are present (the spec allows one).
    #[error("data and data_base64: at most one of them may be present")]
    BothData,
}

fn string_member(name: &str, value: &Value) -> Result<String, CloudEventError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        _ => Err(CloudEventError::Attribute {
            name: name.to_owned(),
            rule: "must be a string",
        }),
    }
}

/// Reads a CloudEvents 1.0 JSON document into an event to publish on `topic` (or on the
/// document's `topic` extension when `topic` is `None`).
///
/// `id`, `source` and `type` may be absent although the spec requires them: the bus fills in
/// an id, the client's source and the topic as the type. `sequence` and `publishtime` are set
/// by the bus and ignored. Other extensions become attributes (numbers and booleans as their
/// JSON text). `data` is stored as its JSON text when the content type is JSON, or absent
/// (and then the content type becomes `application/json`); a string `data` with a text
/// content type, or none, is stored as that text.
///
/// # Errors
/// A [`CloudEventError`] naming the member and the rule it breaks.
pub fn from_json(text: &str, topic: Option<&str>) -> Result<pb::Event, CloudEventError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| CloudEventError::NotAnObject(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(CloudEventError::NotAnObject(format!(
            "found {}",
            json_kind(&value)
        )));
    };
    match object.get("specversion") {
        Some(Value::String(version)) if version == SPEC_VERSION => {}
        Some(other) => return Err(CloudEventError::SpecVersion(other.to_string())),
        None => return Err(CloudEventError::SpecVersion("nothing".to_owned())),
    }
    let mut event = pb::Event::default();
    let mut data = None;
    let mut data_base64 = None;
    for (name, value) in &object {
        match name.as_str() {
            "specversion" | "sequence" | "publishtime" => {}
            "id" => event.id = string_member(name, value)?,
            "source" => event.source = string_member(name, value)?,
            "type" => event.r#type = string_member(name, value)?,
            "datacontenttype" => event.data_content_type = string_member(name, value)?,
            "topic" => event.topic = string_member(name, value)?,
            "correlationid" => event.correlation_id = string_member(name, value)?,
            "causationid" => event.causation_id = string_member(name, value)?,
            "replyto" => event.reply_to = string_member(name, value)?,
            "time" => {
                let time: SystemTime = parse_time(&string_member(name, value)?).map_err(|_| {
                    CloudEventError::Attribute {
                        name: name.clone(),
                        rule: "must be an RFC 3339 time, e.g. 2024-05-01T12:00:00Z",
                    }
                })?;
                event.time = Some(time.into());
            }
            "data" => data = Some(value),
            "data_base64" => data_base64 = Some(string_member(name, value)?),
            _ => {
                let text = match value {
                    Value::String(text) => text.clone(),
                    Value::Number(_) | Value::Bool(_) => value.to_string(),
                    Value::Null => continue,
                    _ => {
                        return Err(CloudEventError::Attribute {
                            name: name.clone(),
                            rule: "an extension must be a string, a number or a boolean",
                        })
                    }
                };
                event.attributes.insert(name.clone(), text);
            }
        }
    }
    if let Some(topic) = topic {
        event.topic = topic.to_owned();
    }
    if event.topic.is_empty() {
        return Err(CloudEventError::NoTopic);
    }
    event.data = match (data, data_base64) {
        (Some(Value::Null), Some(base64)) | (None, Some(base64)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(base64.as_bytes())
                .map_err(|_| CloudEventError::Attribute {
                    name: "data_base64".to_owned(),
                    rule: "must be base64 (RFC 4648, with padding)",
                })?,
        ),
        (Some(_), Some(_)) => return Err(CloudEventError::BothData),
        (Some(Value::Null), None) | (None, None) => Bytes::new(),
        (Some(Value::String(text)), None) if !is_json(&event.data_content_type) => {
            Bytes::from(text.clone())
        }
        (Some(value), None) => {
            if event.data_content_type.is_empty() {
                // The JSON format's rule: no datacontenttype means application/json.
                event.data_content_type = "application/json".to_owned();
            }
            Bytes::from(value.to_string())
        }
    };
    Ok(event)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> pb::Event {
        let mut event = pb::Event {
            id: "e1".into(),
            source: "shop".into(),
            r#type: "order.created".into(),
            topic: "a.b".into(),
            sequence: 3,
            data_content_type: "application/json".into(),
            data: Bytes::from_static(br#"{"x":1}"#),
            time: Some(prost_types::Timestamp {
                seconds: 1_714_564_800,
                nanos: 0,
            }),
            correlation_id: "c-1".into(),
            ..Default::default()
        };
        event.attributes.insert("k".into(), "v".into());
        event.attributes.insert("subject".into(), "order-7".into());
        event
            .attributes
            .insert("dlq_original_topic".into(), "x.y".into());
        event.attributes.insert("Upper".into(), "u".into());
        event.attributes.insert("topic".into(), "spoof".into());
        event
    }

    #[test]
    fn writes_the_json_format_and_leaves_unset_fields_out() {
        let value = to_json(&sample());
        assert_eq!(
            value,
            json!({
                "specversion": "1.0",
                "id": "e1",
                "source": "shop",
                "type": "order.created",
                "time": "2024-05-01T12:00:00Z",
                "datacontenttype": "application/json",
                "topic": "a.b",
                "sequence": "3",
                "correlationid": "c-1",
                "k": "v",
                "subject": "order-7",
                "data": {"x": 1},
            })
        );
        assert_eq!(
            left_out_attributes(&sample()),
            vec!["Upper", "dlq_original_topic", "topic"]
        );
    }

    #[test]
    fn data_is_json_text_or_base64_by_content_type() {
        let mut event = sample();
        event.data_content_type = String::new();
        event.data = Bytes::from_static(b"plain");
        assert_eq!(to_json(&event)["data"], "plain");
        assert!(to_json(&event).get("datacontenttype").is_none());

        event.data_content_type = "application/octet-stream".into();
        let value = to_json(&event);
        assert_eq!(value["data_base64"], "cGxhaW4=");
        assert!(value.get("data").is_none());

        event.data_content_type = "text/plain".into();
        event.data = Bytes::from_static(&[0xff]);
        assert_eq!(to_json(&event)["data_base64"], "/w==");

        // JSON that does not parse is not passed off as text: base64 keeps it exact.
        event.data_content_type = "application/json".into();
        event.data = Bytes::from_static(b"{nope");
        assert_eq!(to_json(&event)["data_base64"], "e25vcGU=");

        event.data = Bytes::new();
        let value = to_json(&event);
        assert!(value.get("data").is_none() && value.get("data_base64").is_none());
    }

    /// Every payload kind survives a trip through the document.
    #[test]
    fn reads_back_what_it_writes() {
        let cases: &[(&str, &[u8])] = &[
            ("application/json", br#"{"x":[1,2]}"#),
            ("application/json", br#""just a string""#),
            ("application/json", b"{nope"),
            ("application/cloudevents+json", b"42"),
            ("", b"plain text"),
            ("text/plain; charset=utf-8", b"line\nline"),
            ("text/plain", &[0xff, 0x00]),
            ("application/octet-stream", b"\x00\x01bin"),
            ("", b""),
        ];
        for (content_type, data) in cases {
            let mut event = sample();
            event.attributes.clear();
            event
                .attributes
                .insert("traceparent".into(), "00-ab".into());
            event.causation_id = "cause".into();
            event.reply_to = "_bus.inbox.x".into();
            event.data_content_type = (*content_type).into();
            event.data = Bytes::copy_from_slice(data);
            let text = to_json(&event).to_string();
            let back = from_json(&text, None).unwrap();
            // Set by the bus, not published.
            event.sequence = 0;
            assert_eq!(back, event, "{content_type} {data:?}: {text}");
        }
    }

    #[test]
    fn reads_documents_from_elsewhere() {
        let event = from_json(
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"x",
                "count":3,"flag":true,"data":{"a":1}}"#,
            Some("t.topic"),
        )
        .unwrap();
        assert_eq!(event.topic, "t.topic");
        assert_eq!(event.data_content_type, "application/json");
        assert_eq!(&event.data[..], br#"{"a":1}"#);
        assert_eq!(event.attributes["subject"], "x");
        assert_eq!(event.attributes["count"], "3");
        assert_eq!(event.attributes["flag"], "true");
        // --topic wins over the extension.
        let event = from_json(r#"{"specversion":"1.0","topic":"a"}"#, Some("b")).unwrap();
        assert_eq!(event.topic, "b");
    }

    #[test]
    fn refuses_what_is_not_a_cloudevent() {
        assert!(matches!(
            from_json("[1]", None),
            Err(CloudEventError::NotAnObject(_))
        ));
        assert!(matches!(
            from_json(r#"{"specversion":"0.3","topic":"a"}"#, None),
            Err(CloudEventError::SpecVersion(_))
        ));
        assert_eq!(
            from_json(r#"{"specversion":"1.0"}"#, None),
            Err(CloudEventError::NoTopic)
        );
        assert_eq!(
            from_json(
                r#"{"specversion":"1.0","topic":"a","data":"x","data_base64":"eA=="}"#,
                None
            ),
            Err(CloudEventError::BothData)
        );
        let error = from_json(r#"{"specversion":"1.0","topic":"a","id":7}"#, None).unwrap_err();
        assert_eq!(error.to_string(), "id: must be a string");
        let error =
            from_json(r#"{"specversion":"1.0","topic":"a","time":"noon"}"#, None).unwrap_err();
        assert!(error.to_string().starts_with("time: must be an RFC 3339"));
        let error =
            from_json(r#"{"specversion":"1.0","topic":"a","x":{"y":1}}"#, None).unwrap_err();
        assert!(error.to_string().starts_with("x: an extension must be"));
    }
}
