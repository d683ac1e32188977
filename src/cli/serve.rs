//! `eventbus serve`: settings, logging, signals, then the server.

use anyhow::Context as _;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogConfig, LogFormat, ServeArgs};

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (config, log) = args.resolve()?;
    let telemetry = init_logging(&log)?;
    crate::panics::install_panic_hook();
    crate::accept::raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let served = crate::server::run(listener, config, shutdown_signal()).await;
    if let Some(telemetry) = telemetry {
        // The last batch of spans, sent before the process ends (blocking, bounded by the
        // exporter's timeout).
        tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    }
    served?;
    Ok(())
}

/// `RUST_LOG` wins over `--log-level` when set, as users of tracing expect. Either way the
/// transport crates stay at warn unless the filter names them ([`with_quiet_transport`]). With
/// an OTLP endpoint, a second layer exports the spans of [`crate::telemetry::TARGET`], whatever
/// the log filter says (each layer has its own filter).
fn init_logging(log: &LogConfig) -> anyhow::Result<Option<crate::telemetry::Telemetry>> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(with_quiet_transport(&value)),
        _ => EnvFilter::try_new(with_quiet_transport(&log.level)),
    }
    .context("invalid log filter")?;
    // Colour only for a person at a terminal: a log file or a collector gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otlp, telemetry) = match &log.otlp_endpoint {
        Some(endpoint) => {
            let (layer, telemetry) = crate::telemetry::install(endpoint)?;
            let only_ours = Targets::new().with_target(crate::telemetry::TARGET, Level::INFO);
            (Some(layer.with_filter(only_ours)), Some(telemetry))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otlp)
        .try_init()
        .map_err(|e| anyhow::anyhow!("initialising logs: {e}"))?;
    if let Some(endpoint) = &log.otlp_endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP (spans of events with trace context)");
    }
    Ok(telemetry)
}

/// Crates whose debug output is HTTP/2 frames and connection plumbing: at `debug` they drown
/// the bus's own lines (one per publish, delivery, query and reply), so they stay at `warn`.
const QUIET_TRANSPORT: [&str; 8] = [
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "tonic",
    "axum",
    "tokio_util",
    // The OTLP exporter's own logs (`opentelemetry`, `opentelemetry_sdk`, `opentelemetry-otlp`):
    // an export that fails is an ERROR, its connection chatter debug.
    "opentelemetry",
];

/// `filter` with `crate=warn` added for each of [`QUIET_TRANSPORT`] it does not name itself,
/// so `--log-level debug` reads as the bus's log and `--log-level debug,h2=trace` still works.
pub fn with_quiet_transport(filter: &str) -> String {
    let mut full = filter.to_owned();
    for name in QUIET_TRANSPORT {
        let named = filter.split(',').any(|directive| {
            directive
                .trim()
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['=', '[', ':']))
        });
        if !named {
            if !full.is_empty() {
                full.push(',');
            }
            full.push_str(name);
            full.push_str("=warn");
        }
    }
    full
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_quiet_transport;

    #[test]
    fn transport_crates_stay_at_warn_unless_named() {
        let filter = with_quiet_transport("debug");
        assert!(filter.starts_with("debug,"), "{filter}");
        assert!(
            filter.contains(",h2=warn") && filter.contains(",hyper=warn"),
            "{filter}"
        );
        let named = with_quiet_transport("debug,h2=trace");
        assert!(
            named.contains("h2=trace") && !named.contains("h2=warn"),
            "{named}"
        );
        // A crate whose name starts like another's is not taken for it.
        assert!(with_quiet_transport("hyper_util=info").contains(",hyper=warn"));
        for filter in ["info", "debug", "eventbus=debug", "warn,h2=debug"] {
            tracing_subscriber::EnvFilter::try_new(with_quiet_transport(filter)).unwrap();
        }
    }
}
