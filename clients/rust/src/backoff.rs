//! Reconnect delays for resuming subscriptions: exponential, capped, with jitter so that many
//! clients cut off together (a bus restart) do not all come back in the same instant.

use std::time::Duration;

/// How long to wait before each reconnect attempt.
///
/// Attempt `n` (0-based) waits `min(max, initial * multiplier^n)`, reduced by a random part of
/// up to `jitter` of itself. The attempt counter starts again after every successful
/// resubscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// The delay before the first attempt.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
    /// Fraction of each delay (0.0 to 1.0) that is randomised away.
    pub jitter: f64,
    /// Give up after this many failed attempts in a row; `None` retries for ever.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.3,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt`, with `unit` a random number in `[0, 1)`: pure so the
    /// schedule can be tested.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(attempt as i32);
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped * (1.0 - jitter))
    }

    /// The delay before attempt `attempt`, with fresh randomness.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_unit())
    }

    /// Whether another attempt is allowed after `failed` failures in a row.
    pub fn allows(&self, failed: u32) -> bool {
        self.max_attempts.is_none_or(|max| failed < max)
    }
}

/// A random number in `[0, 1)`. Jitter needs no strong randomness, so the std hasher's random
/// keys do, instead of another dependency.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: None,
        };
        let delays: Vec<_> = (0..6).map(|n| b.delay_with(n, 0.5).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let b = Backoff {
            jitter: 0.5,
            ..Backoff::default()
        };
        let full = b.delay_with(3, 0.0);
        assert_eq!(full, Duration::from_millis(400));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_millis(200));
        for _ in 0..100 {
            let d = b.delay(3);
            assert!(d <= full && d >= full / 2, "{d:?}");
        }
    }

    #[test]
    fn huge_attempt_counts_stay_at_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay_with(10_000, 0.0), b.max);
    }

    #[test]
    fn max_attempts_limits_retries() {
        let b = Backoff {
            max_attempts: Some(2),
            ..Backoff::default()
        };
        assert!(b.allows(0) && b.allows(1) && !b.allows(2));
        assert!(Backoff::default().allows(u32::MAX));
    }
}
