//! What the scenario's four services share, so each of them is only its own logic.
//!
//! The services talk only through the bus, with the topics and JSON payloads of
//! `docs/scenario-protocol.md`; this crate is that contract in Rust plus the plumbing every
//! service needs.
//!
//! # Layout
//! - [`model`]: the payloads (users, products, orders, queries, replies, error replies) and the
//!   topic names.
//! - [`fixtures`]: the committed seed data (`clients/fixtures/*.json`), embedded at build time.
//! - [`db`]: one SQLite database per service, used from async code without blocking it.
//! - [`outbox`]: change events written in the same transaction as the change, then published,
//!   so each is published once (and republished with the same id after a crash, never lost).
//! - [`bus`]: asking a query ([`bus::ask`]) and answering one ([`bus::serve_until`], replies in
//!   the protocol's shape), with reconnects.
//! - [`runtime`]: flags every service takes, tracing setup, SIGINT/SIGTERM shutdown.

pub mod bus;
pub mod db;
pub mod fixtures;
pub mod model;
pub mod outbox;
pub mod runtime;
