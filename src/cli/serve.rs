//! `eventbus serve`: logging, signals, and the server.

use crate::config::ServeArgs;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _ = args.resolve()?;
    Ok(())
}
