//! # eventbus
//!
//! A gRPC event bus for microservices that talk asynchronously.
//!
//! # Layout
//! - [`pb`]: the generated `eventbus.v1` types and gRPC stubs (from `proto/`).
//! - [`topic`]: topic and pattern syntax.
//! - [`sublist`]: the subject tree that matches a topic to subscriptions.
//! - [`config`]: server settings from flags, environment and file.
//! - [`receive`]: bounds on request bodies as they arrive (deadline, shared budget).
//! - [`content_type`]: only gRPC reaches the services (others get HTTP 415).
//! - [`panics`]: the panic hook, and panics contained to the call they happen in.
//! - [`accept`]: the accept loop's connection stream (backs off when out of file descriptors;
//!   runs TLS handshakes, each in its own future, under the connection limit and deadline).
//! - [`tls`]: the server's TLS certificates, reloaded on SIGHUP or when the files change.
//! - [`metrics`]: the bus's Prometheus metrics, updated by the broker through a handle.
//! - [`admin`]: the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`), which also serves
//!   the [`dashboard`] (a web page of the event web, a live tail and conversations).
//! - [`tracecontext`]: W3C `traceparent`/`tracestate` carried from request metadata into events;
//!   [`telemetry`]: OpenTelemetry spans of traced events, exported over OTLP.
//! - [`auth`]: principals, permissions and the audit log; [`limits`]: per-connection and
//!   per-principal limits.
//! - [`sdk`]: the Rust client SDK, the `eventbus-client` crate (`clients/rust`).
//! - [`cli`]: the `eventbus` command line.

pub mod accept;
pub mod admin;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod content_type;
pub mod dashboard;
pub mod error;
pub mod event;
pub mod limits;
pub mod metrics;
pub mod panics;
pub mod pb;
pub mod receive;
/// The Rust client SDK: the `eventbus-client` crate (`clients/rust`), re-exported.
pub use eventbus_client as sdk;
pub mod server;
pub mod service;
pub mod store;
pub mod sublist;
pub mod telemetry;
pub mod timefmt;
pub mod tls;
pub mod topic;
pub mod tracecontext;
