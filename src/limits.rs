//! Limits that protect the bus from its clients: publish rates, open subscriptions and queries
//! in flight, per connection and per principal.
//!
//! HTTP/2 bounds what one connection can open at the transport level (`max_concurrent_streams`,
//! the header list size, flow-control windows: see [`crate::server`]); these bound what a
//! client does with what it opened. Each is counted twice: on the connection the call came on
//! ([`crate::accept::ConnectionInfo::usage`]), so one misbehaving process cannot starve the
//! others, and on the principal it authenticated as ([`crate::auth`]), so a service cannot
//! get around its limit by opening more connections. A call past either gets
//! RESOURCE_EXHAUSTED with reason `limit-exceeded`, a message that names the limit and its
//! scope, an audit line, and a count in `eventbus_limit_exceeded_total{limit}`.
//!
//! Rates are token buckets from the `governor` crate (GCRA), with a burst of one second's worth:
//! a batch larger than a whole second of the bytes limit can never pass, and the error says so.
//!
//! Limits are read from the config file's `[limits.connection]` and `[limits.principal]`
//! tables, and a principal's own `limits` table overrides the principal defaults key by key.
//! A reload applies to connections opened, and principals counted, after it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::error::BusError;

/// One scope's limits; an absent key is no limit. Keys as in the config file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Events published per second (Publish, PublishStream and Query together), with a burst of
    /// one second's worth.
    pub publish_events_per_second: Option<NonZeroU32>,
    /// Bytes of published events per second (their protobuf encoding), with a burst of one
    /// second's worth; a batch larger than that can never pass.
    pub publish_bytes_per_second: Option<NonZeroU32>,
    /// Subscribe streams open at once.
    pub subscriptions: Option<u32>,
    /// Query calls waiting for their reply at once.
    pub queries_in_flight: Option<u32>,
}

impl Limits {
    /// These limits with `overrides`' keys in place of theirs.
    pub fn overridden_by(self, overrides: &Limits) -> Limits {
        Limits {
            publish_events_per_second: overrides
                .publish_events_per_second
                .or(self.publish_events_per_second),
            publish_bytes_per_second: overrides
                .publish_bytes_per_second
                .or(self.publish_bytes_per_second),
            subscriptions: overrides.subscriptions.or(self.subscriptions),
            queries_in_flight: overrides.queries_in_flight.or(self.queries_in_flight),
        }
    }
}

/// The `[limits]` table of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `[limits.connection]`: per client connection.
    pub connection: Limits,
    /// `[limits.principal]`: per principal, unless its own `limits` say otherwise. Applies only
    /// when `[[principals]]` are configured.
    pub principal: Limits,
}

impl Default for LimitsConfig {
    /// A connection may hold 1,024 subscriptions and 1,024 queries in flight (the HTTP/2 stream
    /// limit, 4,096 by default, bounds them together); rates are not limited.
    fn default() -> Self {
        LimitsConfig {
            connection: Limits {
                subscriptions: Some(DEFAULT_CONNECTION_SUBSCRIPTIONS),
                queries_in_flight: Some(DEFAULT_CONNECTION_QUERIES),
                ..Limits::default()
            },
            principal: Limits::default(),
        }
    }
}

/// The default `[limits.connection] subscriptions`.
pub const DEFAULT_CONNECTION_SUBSCRIPTIONS: u32 = 1024;
/// The default `[limits.connection] queries_in_flight`.
pub const DEFAULT_CONNECTION_QUERIES: u32 = 1024;

/// Whose limit a breach is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The client connection's (`[limits.connection]`).
    Connection,
    /// The named principal's.
    Principal(Arc<str>),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Connection => f.write_str("this connection"),
            Scope::Principal(name) => write!(f, "principal {name:?}"),
        }
    }
}

/// What one scope has used of its [`Limits`]: rate buckets and counts of open streams. Shared by
/// every call of the scope; counts go down as [`Slot`]s drop.
#[derive(Debug)]
pub struct Usage {
    scope: Scope,
    limits: Limits,
    events: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
    subscriptions: AtomicU32,
    queries: AtomicU32,
}

impl Usage {
    /// Fresh usage of `limits` by `scope`.
    pub fn new(scope: Scope, limits: Limits) -> Usage {
        let bucket = |rate: Option<NonZeroU32>| {
            rate.map(|rate| RateLimiter::direct(Quota::per_second(rate).allow_burst(rate)))
        };
        Usage {
            scope,
            limits,
            events: bucket(limits.publish_events_per_second),
            bytes: bucket(limits.publish_bytes_per_second),
            subscriptions: AtomicU32::new(0),
            queries: AtomicU32::new(0),
        }
    }

    /// The limits this usage counts against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes `events` events of `bytes` bytes from the publish rates.
    ///
    /// # Errors
    /// [`BusError::LimitExceeded`] naming `publish_events_per_second` or
    /// `publish_bytes_per_second` when the bucket holds too little now (or could never hold
    /// this much).
    pub fn admit_publish(&self, events: usize, bytes: usize) -> Result<(), BusError> {
        take(
            self.events.as_ref(),
            events,
            "publish_events_per_second",
            "events",
            &self.scope,
            self.limits.publish_events_per_second,
        )?;
        take(
            self.bytes.as_ref(),
            bytes,
            "publish_bytes_per_second",
            "bytes",
            &self.scope,
            self.limits.publish_bytes_per_second,
        )
    }

    /// Counts one more open subscription until the returned slot drops.
    ///
    /// # Errors
    /// [`BusError::LimitExceeded`] naming `subscriptions` at the limit.
    pub fn open_subscription(self: &Arc<Self>) -> Result<Slot, BusError> {
        self.occupy(Kind::Subscription)
    }

    /// Counts one more query in flight until the returned slot drops.
    ///
    /// # Errors
    /// [`BusError::LimitExceeded`] naming `queries_in_flight` at the limit.
    pub fn start_query(self: &Arc<Self>) -> Result<Slot, BusError> {
        self.occupy(Kind::Query)
    }

    fn occupy(self: &Arc<Self>, kind: Kind) -> Result<Slot, BusError> {
        let (counter, limit, name) = self.counter(kind);
        let taken = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| match limit {
            Some(limit) if now >= limit => None,
            _ => Some(now + 1),
        });
        match taken {
            Ok(_) => Ok(Slot {
                usage: self.clone(),
                kind,
            }),
            Err(now) => Err(BusError::LimitExceeded {
                limit: name,
                scope: self.scope.to_string(),
                rule: format!(
                    "{now} open, the most allowed is {}",
                    limit.expect("refused only under a limit")
                ),
            }),
        }
    }

    fn counter(&self, kind: Kind) -> (&AtomicU32, Option<u32>, &'static str) {
        match kind {
            Kind::Subscription => (
                &self.subscriptions,
                self.limits.subscriptions,
                "subscriptions",
            ),
            Kind::Query => (
                &self.queries,
                self.limits.queries_in_flight,
                "queries_in_flight",
            ),
        }
    }
}

fn take(
    bucket: Option<&DefaultDirectRateLimiter>,
    amount: usize,
    limit: &'static str,
    unit: &str,
    scope: &Scope,
    rate: Option<NonZeroU32>,
) -> Result<(), BusError> {
    let (Some(bucket), Some(rate)) = (bucket, rate) else {
        return Ok(());
    };
    let Some(amount) = u32::try_from(amount).ok().and_then(NonZeroU32::new) else {
        return if amount == 0 {
            Ok(())
        } else {
            Err(exceeded_forever(limit, unit, scope, rate, amount))
        };
    };
    match bucket.check_n(amount) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(BusError::LimitExceeded {
            limit,
            scope: scope.to_string(),
            rule: format!("at most {rate} {unit} per second; retry later"),
        }),
        Err(_) => Err(exceeded_forever(
            limit,
            unit,
            scope,
            rate,
            amount.get() as usize,
        )),
    }
}

fn exceeded_forever(
    limit: &'static str,
    unit: &str,
    scope: &Scope,
    rate: NonZeroU32,
    amount: usize,
) -> BusError {
    BusError::LimitExceeded {
        limit,
        scope: scope.to_string(),
        rule: format!(
            "one call of {amount} {unit} is more than a whole second's {rate}; send smaller \
             batches"
        ),
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Subscription,
    Query,
}

/// One open subscription or query in flight, counted until dropped.
#[derive(Debug)]
pub struct Slot {
    usage: Arc<Usage>,
    kind: Kind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.usage
            .counter(self.kind)
            .0
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's [`Usage`], made on its first call with the limits in force then. Lives in
/// [`crate::accept::ConnectionInfo`], so it goes when the connection and its calls are gone.
#[derive(Debug, Default)]
pub struct ConnectionUsage(OnceLock<Arc<Usage>>);

impl ConnectionUsage {
    /// The connection's usage, made with `limits` if this is its first call.
    pub fn get_or_init(&self, limits: impl FnOnce() -> Limits) -> &Arc<Usage> {
        self.0
            .get_or_init(|| Arc::new(Usage::new(Scope::Connection, limits())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(events: u32, bytes: u32, subscriptions: u32) -> Limits {
        Limits {
            publish_events_per_second: NonZeroU32::new(events),
            publish_bytes_per_second: NonZeroU32::new(bytes),
            subscriptions: Some(subscriptions),
            queries_in_flight: Some(1),
        }
    }

    fn limit_of(error: BusError) -> &'static str {
        match error {
            BusError::LimitExceeded { limit, .. } => limit,
            other => panic!("not a limit: {other:?}"),
        }
    }

    #[test]
    fn a_burst_of_one_second_passes_and_the_next_event_does_not() {
        let usage = Usage::new(Scope::Connection, limits(10, 1_000_000, 1));
        usage.admit_publish(10, 10).unwrap();
        assert_eq!(
            limit_of(usage.admit_publish(1, 1).unwrap_err()),
            "publish_events_per_second"
        );
    }

    #[test]
    fn a_batch_larger_than_a_second_of_bytes_says_it_can_never_pass() {
        let usage = Usage::new(Scope::Principal(Arc::from("svc")), limits(1000, 100, 1));
        let error = usage.admit_publish(1, 101).unwrap_err();
        assert!(
            error.to_string().contains("send smaller batches"),
            "{error}"
        );
        assert!(error.to_string().contains("principal \"svc\""), "{error}");
    }

    #[test]
    fn slots_count_until_dropped() {
        let usage = Arc::new(Usage::new(Scope::Connection, limits(1, 1, 2)));
        let a = usage.open_subscription().unwrap();
        let _b = usage.open_subscription().unwrap();
        assert_eq!(
            limit_of(usage.open_subscription().unwrap_err()),
            "subscriptions"
        );
        drop(a);
        let _c = usage.open_subscription().unwrap();
        let _q = usage.start_query().unwrap();
        assert_eq!(
            limit_of(usage.start_query().unwrap_err()),
            "queries_in_flight"
        );
    }

    #[test]
    fn no_limit_takes_anything() {
        let usage = Arc::new(Usage::new(Scope::Connection, Limits::default()));
        usage.admit_publish(usize::MAX, usize::MAX).unwrap();
        let _slots: Vec<_> = (0..10_000)
            .map(|_| usage.open_subscription().unwrap())
            .collect();
    }

    #[test]
    fn overrides_replace_key_by_key() {
        let defaults = limits(10, 20, 30);
        let mine = Limits {
            subscriptions: Some(1),
            ..Limits::default()
        };
        let merged = defaults.overridden_by(&mine);
        assert_eq!(merged.subscriptions, Some(1));
        assert_eq!(merged.publish_events_per_second, NonZeroU32::new(10));
    }
}
