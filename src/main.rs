//! The `eventbus` binary: parses the command line and hands over to the library. Kept thin so
//! everything it does can be driven from tests.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = eventbus::cli::Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(eventbus::cli::run(cli))
}
