//! The `eventbus` binary: parses the command line and hands over to the library. Kept thin so
//! everything it does can be driven from tests.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = eventbus::cli::Cli::parse();
    let outcome = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(eventbus::cli::run(cli)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match config_parse_error(&error) {
                // TOML's message points at the spot with a caret under the line: keep its lines.
                Some(parse) => eprintln!("error: {parse}"),
                None => eprintln!("error: {}", one_line(&error)),
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined with ": " (not anyhow's multi-line `Debug` form), skipping
/// causes whose text is already there: transport errors often repeat their source's message.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// A config file that does not parse, anywhere in `error`'s chain.
fn config_parse_error(error: &anyhow::Error) -> Option<&eventbus::config::ConfigError> {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<eventbus::config::ConfigError>())
        .find(|cause| matches!(cause, eventbus::config::ConfigError::Parse { .. }))
}
