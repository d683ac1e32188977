//! `eventbus-client`: the Rust client of the eventbus gRPC event bus. It depends on nothing of
//! the server (no storage, no CLI parsing, no HTTP server): the wire types ([`pb`]), tonic's
//! channel and this SDK.
//!
//! Services never call each other; they publish events and subscribe to topics. The SDK makes
//! the parts of that which are easy to get wrong the default:
//!
//! - **One connection, many calls.** A [`Client`] is a cheap clone around a tonic `Channel`
//!   and a service name ([`Client::source`]) that is stamped on every event it publishes and
//!   every subscription it opens, so the bus's topology can show who talks to whom.
//! - **Publishing**: [`Client::publish`] and the [`EventBuilder`] ([`Client::event`]) for one
//!   event per call; [`Client::publish_batch`] for an all-or-nothing batch; and a batching
//!   [`Publisher`] over `PublishStream` for throughput. The publisher never resends a batch
//!   whose fate is unknown (see [`Publisher`]): whether a duplicate is harmless is the
//!   caller's call.
//! - **Subscribing**: [`Client::subscribe`] returns a [`Subscription`], a `Stream` that resumes
//!   by itself after a broken stream from the last sequence it saw, with no duplicates and no
//!   silent gaps ([`SubscriptionItem::Gap`] when the bus no longer held the events).
//! - **Request/response over events**: [`Client::query`] asks (one RPC: the bus does the
//!   inbox and correlation); [`Client::serve`] answers, with a handler per query.
//! - **Errors** are one enum, [`Error`], which keeps the bus's status code and message.
//!
//! ```no_run
//! # async fn demo() -> eventbus_client::Result<()> {
//! use std::time::Duration;
//! use eventbus_client::{Client, Reply, ServeOptions};
//!
//! let client = Client::builder("http://127.0.0.1:50051").source("user-service").connect().await?;
//! client.publish("user.created", "alice").await?;
//!
//! // Answer queries in the background (replicas in the same group share them). `responder`
//! // returns once the bus has confirmed the subscription, so a query asked after it finds it.
//! let responder = client
//!     .responder("user.query", ServeOptions::default().group("user-service"))
//!     .await?;
//! tokio::spawn(responder.run(
//!     |query| async move { Ok::<_, std::convert::Infallible>(Reply::new(query.data)) },
//!     std::future::pending::<()>(),
//! ));
//!
//! let reply = client.query("user.query", "alice", Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! Subscribing, with resume after a broken stream:
//!
//! ```no_run
//! # async fn demo(client: eventbus_client::Client) -> eventbus_client::Result<()> {
//! use futures_util::StreamExt as _;
//! use eventbus_client::SubscriptionItem;
//!
//! let mut events = client.subscribe("user.>").await?;
//! while let Some(item) = events.next().await {
//!     match item? {
//!         SubscriptionItem::Event(event) => println!("{} at {}", event.topic, event.sequence),
//!         SubscriptionItem::Gap { from, to } => eprintln!("missed {from}..={to}"),
//!         _ => {} // caught up, resumed, interrupted: informational
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Throughput with the batching publisher (ids fixed before the first send, so a resend after a
//! broken stream is stored once):
//!
//! ```no_run
//! # async fn demo(client: eventbus_client::Client) -> eventbus_client::Result<()> {
//! use eventbus_client::pb;
//!
//! let publisher = client.publisher();
//! let mut acks = Vec::new();
//! for n in 0..1000 {
//!     let event = pb::Event { topic: "metrics.tick".into(), data: n.to_string().into(), ..Default::default() };
//!     acks.push(publisher.submit(event).await?); // many in flight from one task
//! }
//! for ack in acks {
//!     let _sequence = ack.await?;
//! }
//! # Ok(()) }
//! ```
//!
//! At least once, in a MANUAL-ack group: unacked events come again after the deadline and go to
//! the dead-letter topic after `max_deliveries`:
//!
//! ```no_run
//! # async fn demo(client: eventbus_client::Client) -> eventbus_client::Result<()> {
//! use futures_util::StreamExt as _;
//! use eventbus_client::{ManualAck, SubscribeOptions, SubscriptionItem};
//!
//! let options = SubscribeOptions::new().group("billing").manual_ack(ManualAck::default());
//! let mut deliveries = client.subscribe_with("order.created", options).await?;
//! while let Some(item) = deliveries.next().await {
//!     if let SubscriptionItem::Delivery(delivery) = item? {
//!         // ... handle delivery.event (delivery.attempt counts from 1) ...
//!         delivery.ack().await?; // or delivery.nack(delay)
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Where things are
//! - [`Client`] and [`ClientBuilder`]: connection settings (several nodes, TLS, token), unary
//!   publish, admin calls.
//! - [`EventBuilder`] ([`Client::event`]): one event with attributes, correlation and trace
//!   context.
//! - [`Publisher`]: the batching publisher; [`PendingPublish`] per event.
//! - [`Subscription`], [`SubscribeOptions`], [`Start`], [`SubscriptionItem`], [`Delivery`],
//!   [`ManualAck`]: subscriptions and at-least-once groups.
//! - [`Client::query`], [`Client::responder`], [`Client::serve`], [`Reply`]: request/response
//!   over events, and the error-reply convention.
//! - [`Backoff`]: reconnect delays; [`Error`]: every failure, with the bus's status and reason.
//! - [`pb`]: the generated `eventbus.v1` types and client stubs; [`tracecontext`]: W3C trace
//!   context names and checks.

pub mod pb;
pub mod tracecontext;

/// The README's example, compiled as a doctest so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod backoff;
mod client;
mod error;
mod event;
mod publisher;
mod responder;
mod subscription;

pub use backoff::Backoff;
pub use client::{BusClient, Client, ClientBuilder, Credentials, IntoUrls, DEFAULT_SOURCE};
pub use error::{code_name, Error, Result, ERROR_REASON_KEY};
pub use event::{traceparent, EventBuilder, JSON_CONTENT_TYPE};
pub use publisher::{PendingPublish, Publisher, PublisherOptions};
pub use responder::{Reply, Responder, ServeOptions, ERROR_ATTRIBUTE, ERROR_EVENT_TYPE};
pub use subscription::{
    Delivery, ManualAck, Start, SubscribeOptions, Subscription, SubscriptionItem,
    DEFAULT_MAX_BATCH_EVENTS,
};

/// The bus a client talks to when told nothing: `$EVENTBUS_URL` if set (the name the Python and
/// TypeScript clients and the scenario's services share; one URL or several, comma-separated),
/// else `http://127.0.0.1:50051`.
pub fn default_url() -> String {
    std::env::var("EVENTBUS_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned())
}
