//! What every service's `main` does the same way: the bus flag, logging, and shutdown.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Flags every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct BusArgs {
    /// The bus to connect to: one URL, or several nodes of a cluster separated by commas;
    /// `EVENTBUS_URL` is read when neither this nor `EVENTBUS_SERVER` is set.
    #[arg(
        long,
        env = "EVENTBUS_SERVER",
        default_value_t = eventbus_client::default_url()
    )]
    pub bus: String,
    /// A log level or a RUST_LOG-style filter; RUST_LOG wins when set.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// `text` or `json` (one JSON object per line, with the span fields such as
    /// `correlation_id`).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Flags of the services that answer queries.
#[derive(Debug, Clone, clap::Args)]
pub struct ResponderArgs {
    /// Answer every query this much later (e.g. `300ms`): a slow service for the demo.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub reply_delay: std::time::Duration,
}

/// Sets up tracing to stderr. Every line inside a span shows the span's fields, so a line logged
/// while handling a query carries its `correlation_id`.
pub fn init_tracing(args: &BusArgs) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(args.log_level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
