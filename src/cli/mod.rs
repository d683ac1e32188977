//! The `eventbus` command line: `serve` runs the bus; every other command is a client of a
//! running bus, built on the Rust SDK, in the spirit of the `nats` CLI.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

/// A gRPC event bus for microservices that talk asynchronously.
#[derive(Debug, Parser)]
#[command(name = "eventbus", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where client commands find the bus.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// The bus to talk to.
    #[arg(
        long,
        env = "EVENTBUS_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bus.
    Serve(Box<ServeArgs>),
    /// Client commands (publish, subscribe, query, ...) live in this module; see below.
    #[command(skip)]
    Placeholder(PathBuf),
}

mod serve;

/// Runs one command to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Placeholder(_) => Ok(()),
    }
}
