//! `eventbus completions SHELL` and `eventbus man`: shell completion scripts and man pages made
//! from the same clap definition as the parser, so they cannot drift from the real flags.

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, CommandFactory as _};

use super::Cli;

/// `eventbus completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for. Load it with e.g. `source <(eventbus completions bash)`, or
    /// write it where the shell looks (`~/.local/share/bash-completion/completions/eventbus`,
    /// a directory on zsh's `$fpath` as `_eventbus`, `~/.config/fish/completions/eventbus.fish`).
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `eventbus man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write `eventbus.1` and one page per command (`eventbus-publish.1`, ...) into this
    /// directory instead of printing `eventbus.1` (roff) on stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut stdout = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut command, "eventbus", &mut stdout);
    stdout.flush()?;
    Ok(())
}

/// Prints the man page, or writes the pages into `args.dir` (created if missing) and names
/// each file on stdout.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let command = Cli::command();
    match &args.dir {
        None => {
            let mut stdout = std::io::stdout().lock();
            clap_mangen::Man::new(command).render(&mut stdout)?;
            stdout.flush()?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .map_err(|e| anyhow::anyhow!("cannot write into {}: {e}", dir.display()))?;
            let mut pages: Vec<_> = std::fs::read_dir(dir)?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "1"))
                .collect();
            pages.sort();
            for page in pages {
                println!("{}", page.display());
            }
        }
    }
    Ok(())
}
