//! Shell conventions: `smtpstorm completions SHELL` prints a completion
//! script (clap_complete) and `smtpstorm man [--out DIR]` a man page
//! (clap_mangen), both generated from the same clap definitions as the
//! parser, so they never disagree with the flags the binary takes.
//!
//! Invariants: nothing here runs a role or touches the network; the output
//! goes to stdout (a closed pipe, as with `| head`, is not an error) or,
//! for `man --out DIR`, to one page per command (`smtpstorm.1`,
//! `smtpstorm-blast.1`, ...) in DIR.

use std::io::Write;

use clap::CommandFactory;
use thiserror::Error;

use std::path::PathBuf;

use clap::Args;

use super::Cli;

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write smtpstorm.1 and smtpstorm-COMMAND.1 into DIR instead of printing smtpstorm.1.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Errors writing completions or man pages.
#[derive(Debug, Error)]
pub enum ShellError {
    #[error("cannot write the man pages to {path}: {source}")]
    ManDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

fn stdout_result(r: std::io::Result<()>) -> Result<(), ShellError> {
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ShellError::Stdout(e)),
        _ => Ok(()),
    }
}

/// `smtpstorm completions SHELL`.
pub fn completions(args: &CompletionsArgs) -> Result<u8, ShellError> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "smtpstorm", &mut buf);
    stdout_result(std::io::stdout().lock().write_all(&buf))?;
    Ok(0)
}

/// `smtpstorm man [--out DIR]`.
pub fn man(args: &ManArgs) -> Result<u8, ShellError> {
    let cmd = Cli::command();
    match &args.out {
        Some(dir) => {
            let err = |source| ShellError::ManDir {
                path: dir.display().to_string(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            clap_mangen::generate_to(cmd, dir).map_err(err)?;
        }
        None => {
            let mut buf = Vec::new();
            // Rendering into a Vec cannot fail.
            let _ = clap_mangen::Man::new(cmd).render(&mut buf);
            stdout_result(std::io::stdout().lock().write_all(&buf))?;
        }
    }
    Ok(0)
}
