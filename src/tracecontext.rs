//! W3C Trace Context (`traceparent`, `tracestate`) carried through the bus.
//!
//! A client that traces sends its context as gRPC request metadata (as OpenTelemetry's gRPC
//! instrumentation does) or as event attributes of the same names. The bus copies the metadata
//! into each published event's attributes unless the event carries a `traceparent` of its own,
//! so the stored event, every delivery of it and a query's reply keep the trace: one trace spans
//! asker → bus → responder → bus → asker. A query's answer also carries the reply's context as
//! response metadata.
//!
//! Only a well-formed `traceparent` is taken from metadata (a malformed one is ignored, as the
//! W3C recommendation says), and a `tracestate` only beside one, at most
//! [`MAX_TRACESTATE_BYTES`].

use tonic::metadata::MetadataMap;

use crate::event::Event;

pub use eventbus_client::tracecontext::{
    is_valid_traceparent, MAX_TRACESTATE_BYTES, TRACEPARENT, TRACESTATE,
};

/// A trace context read from request metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
    pub traceparent: String,
    /// Vendor entries, if any.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context in `metadata`, if it holds a well-formed `traceparent`.
    pub fn from_metadata(metadata: &MetadataMap) -> Option<TraceContext> {
        let traceparent = metadata.get(TRACEPARENT)?.to_str().ok()?.trim();
        if !is_valid_traceparent(traceparent) {
            return None;
        }
        let tracestate = metadata
            .get(TRACESTATE)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE_BYTES)
            .map(str::to_owned);
        Some(TraceContext {
            traceparent: traceparent.to_owned(),
            tracestate,
        })
    }

    /// Puts the context into `event`'s attributes unless it carries a `traceparent` already
    /// (the event's own context is the more specific one; its `tracestate` stays with it).
    pub fn apply(&self, event: &mut Event) {
        if event.attributes.contains_key(TRACEPARENT) {
            return;
        }
        event
            .attributes
            .insert(TRACEPARENT.to_owned(), self.traceparent.clone());
        match &self.tracestate {
            Some(state) => {
                event
                    .attributes
                    .insert(TRACESTATE.to_owned(), state.clone());
            }
            None => {
                event.attributes.remove(TRACESTATE);
            }
        }
    }

    /// Sets the context as `traceparent`/`tracestate` metadata (on a response).
    pub fn to_metadata(&self, metadata: &mut MetadataMap) {
        if let Ok(value) = self.traceparent.parse() {
            metadata.insert(TRACEPARENT, value);
        }
        if let Some(Ok(value)) = self.tracestate.as_deref().map(str::parse) {
            metadata.insert(TRACESTATE, value);
        }
    }

    /// The context an event's attributes carry, if its `traceparent` is well-formed.
    pub fn from_attributes(
        attributes: &std::collections::HashMap<String, String>,
    ) -> Option<TraceContext> {
        let traceparent = attributes.get(TRACEPARENT)?;
        is_valid_traceparent(traceparent).then(|| TraceContext {
            traceparent: traceparent.clone(),
            tracestate: attributes.get(TRACESTATE).cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn metadata_fills_events_without_a_context_of_their_own() {
        let mut metadata = MetadataMap::new();
        metadata.insert(TRACEPARENT, VALID.parse().unwrap());
        metadata.insert(TRACESTATE, "vendor=1".parse().unwrap());
        let context = TraceContext::from_metadata(&metadata).unwrap();
        let mut event = Event::for_test("a.b");
        context.apply(&mut event);
        assert_eq!(event.attributes[TRACEPARENT], VALID);
        assert_eq!(event.attributes[TRACESTATE], "vendor=1");

        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        event.attributes.insert(TRACEPARENT.into(), own.into());
        event.attributes.insert(TRACESTATE.into(), "own=2".into());
        context.apply(&mut event);
        assert_eq!(event.attributes[TRACEPARENT], own);
        assert_eq!(event.attributes[TRACESTATE], "own=2");

        metadata.insert(TRACEPARENT, "garbage".parse().unwrap());
        assert_eq!(TraceContext::from_metadata(&metadata), None);
    }
}
