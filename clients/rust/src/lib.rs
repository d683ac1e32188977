//! `eventbus-client`: the Rust client of the eventbus gRPC event bus, used by the `eventbus` CLI
//! and by the scenario's services in `clients/`. It depends on nothing of the server (no
//! storage, no CLI parsing, no HTTP server): the wire types ([`pb`]), tonic's channel and this
//! SDK. The bus's crate re-exports it as `eventbus::sdk`.
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
//! use eventbus_client::{Client, Reply};
//!
//! let client = Client::builder("http://127.0.0.1:50051").source("user-service").connect().await?;
//! client.publish("user.created", "alice").await?;
//!
//! // Answer queries until Ctrl-C (replicas in the same group share them).
//! let server = client.clone();
//! tokio::spawn(async move {
//!     let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//!     server
//!         .serve("user.query", "user-service", |query| async move {
//!             Ok::<_, std::convert::Infallible>(Reply::new(query.data))
//!         }, shutdown)
//!         .await
//! });
//!
//! let reply = client.query("user.query", "alice", Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `client`: [`Client`], connection settings, unary publish, admin calls.
//! - `event`: [`EventBuilder`].
//! - `publisher`: the batching [`Publisher`].
//! - `subscription`: [`Subscription`], start positions, resume logic.
//! - `backoff`: reconnect delays.
//! - `responder`: [`Client::query`], [`Client::serve`] and the error-reply convention.
//! - `error`: [`Error`].
//! - [`pb`]: the generated `eventbus.v1` types and client stubs.
//! - [`tracecontext`]: W3C trace-context attribute names and checks.

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
