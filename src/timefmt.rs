//! Durations and times as people write them, in one place and through one crate (`jiff`):
//! every flag, config value and CLI argument that takes a duration or a time reads it here, and
//! every duration or time the CLI prints is written here.
//!
//! - Durations: jiff's friendly format (`500ms`, `5s`, `2m`, `1h30m`, `1h 30m`, `7d`,
//!   `2 hours`) or ISO 8601 (`PT5S`). A day is 24 hours here (retention and timeouts are
//!   lengths of time, not calendar arithmetic); months and years are refused.
//! - Times: RFC 3339 with any offset (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`).

use std::time::{Duration, SystemTime};

use jiff::fmt::friendly::SpanPrinter;
use jiff::{SignedDuration, Span, SpanRelativeTo, Timestamp};

/// Reads a non-negative duration: `500ms`, `5s`, `1h30m`, `7d`, `PT5S`.
///
/// # Errors
/// Text jiff cannot read as a span, a span with months or years (no fixed length), or a
/// negative one; the message shows the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const FORMS: &str = "a duration is a number and a unit: 500ms, 5s, 2m, 1h30m, 7d";
    if text.trim().parse::<f64>().is_ok() {
        let n = text.trim();
        return Err(format!("{n} needs a unit: {n}s, {n}ms, {n}m ({FORMS})"));
    }
    let span: Span = text
        .trim()
        .parse()
        .map_err(|error| format!("{text:?} is not a duration ({error}); {FORMS}"))?;
    let signed = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|_| format!("{text:?}: months and years have no fixed length; use days"))?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} must not be negative"))
}

/// Writes a duration as the friendly format reads it back: `5s`, `1h 30m`, `250ms`, `72h`.
pub fn format_duration(duration: Duration) -> String {
    static PRINTER: SpanPrinter = SpanPrinter::new();
    match SignedDuration::try_from(duration) {
        Ok(duration) => PRINTER.duration_to_string(&duration),
        Err(_) => format!("{}s", duration.as_secs()),
    }
}

/// Reads an RFC 3339 time with its offset.
///
/// # Errors
/// Text that is not an RFC 3339 time with an offset (`Z` or `+02:00`), with jiff's reason.
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    text.trim()
        .parse::<Timestamp>()
        .map(SystemTime::from)
        .map_err(|error| error.to_string())
}

/// Writes a time as RFC 3339 in UTC with as many fraction digits as it needs (none, 3, 6 or
/// 9), so `12:00:00.250Z` comes back as it went in; `None` outside jiff's range (years
/// -9999 to 9999).
pub fn format_time(time: SystemTime) -> Option<String> {
    let timestamp = Timestamp::try_from(time).ok()?;
    let nanos = timestamp.subsec_nanosecond();
    Some(if nanos == 0 {
        format!("{timestamp:.0}")
    } else if nanos % 1_000_000 == 0 {
        format!("{timestamp:.3}")
    } else if nanos % 1_000 == 0 {
        format!("{timestamp:.6}")
    } else {
        format!("{timestamp:.9}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_forms_people_write() {
        for (text, expected) in [
            ("500ms", Duration::from_millis(500)),
            ("5s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h 30m", Duration::from_secs(5400)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("2 hours", Duration::from_secs(7200)),
            ("PT5S", Duration::from_secs(5)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for bad in ["5", "five seconds", "-5s", "1 month", ""] {
            assert!(parse_duration(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_duration("10")
            .unwrap_err()
            .starts_with("10 needs a unit: 10s"));
    }

    #[test]
    fn durations_written_read_back_the_same() {
        for duration in [
            Duration::from_millis(250),
            Duration::from_secs(5),
            Duration::from_secs(5400),
            Duration::from_secs(3 * 86_400 + 7),
            Duration::from_micros(1_500),
        ] {
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h 30m");
    }

    #[test]
    fn times_take_any_offset_and_print_in_utc_with_the_digits_they_need() {
        let plus_two = parse_time("2024-05-01T14:00:00+02:00").unwrap();
        assert_eq!(plus_two, parse_time("2024-05-01T12:00:00Z").unwrap());
        assert_eq!(format_time(plus_two).unwrap(), "2024-05-01T12:00:00Z");
        let millis = parse_time("2024-05-01T12:00:00.250Z").unwrap();
        assert_eq!(format_time(millis).unwrap(), "2024-05-01T12:00:00.250Z");
        let nanos = parse_time("2024-05-01T12:00:00.000000001Z").unwrap();
        assert_eq!(
            format_time(nanos).unwrap(),
            "2024-05-01T12:00:00.000000001Z"
        );
        assert!(parse_time("2024-05-01 12:00").is_err());
        assert!(parse_time("2024-05-01T12:00:00").is_err(), "no offset");
    }
}
