//! W3C Trace Context (`traceparent`, `tracestate`) as events carry it: the attribute names, the
//! limit the bus keeps, and the check of a `traceparent`'s form. The bus copies a caller's
//! context from request metadata into events, and services copy a query's into their replies
//! (see the bus's README, "Trace context").

/// The attribute and metadata key of the trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The attribute and metadata key of the vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` taken from metadata (the W3C limit is 32 entries of at most 256
/// characters; 512 bytes is what implementations are asked to propagate at least).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Whether `value` is a W3C `traceparent`: `version-traceid-parentid-flags` in lowercase hex
/// (2, 32, 16 and 2 digits), version not `ff`, ids not all zeros; version `00` has nothing more.
pub fn is_valid_traceparent(value: &str) -> bool {
    let mut parts = value.split('-');
    let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |part: &str| part.bytes().any(|b| b != b'0');
    let rest_ok = match version {
        "00" => parts.next().is_none(),
        _ => true,
    };
    hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && nonzero(trace_id)
        && hex(parent_id, 16)
        && nonzero(parent_id)
        && hex(flags, 2)
        && rest_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn recognises_w3c_traceparents() {
        assert!(is_valid_traceparent(VALID));
        for bad in [
            "",
            "00-abc",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?}");
        }
        // A later version may add fields.
        assert!(is_valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
    }
}
