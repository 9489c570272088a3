//! Shell conventions: `smtpstorm completions SHELL` prints a completion
//! script (clap_complete) and `smtpstorm man [--out DIR]` a man page
//! (clap_mangen), both generated from the same clap definitions as the
//! parser, so they never disagree with the flags the binary takes.
//!
//! Help texts name the `--from`/`--to`/`--xclient` placeholders (`{n}`,
//! `{r}`, ...), but clap renders a literal `{n}` in a help text as a line
//! break; [`command`] keeps each one literal (an empty style reset after the
//! brace, which no output shows: plain text, the man page and the completion
//! scripts drop it, a terminal draws nothing for it). The binary parses with
//! [`command`], and the man page and completions are made from it.
//!
//! Invariants: nothing here runs a role or touches the network; the output
//! goes to stdout (a closed pipe, as with `| head`, is not an error) or,
//! for `man --out DIR`, to one page per command (`smtpstorm.1`,
//! `smtpstorm-blast.1`, ...) in DIR.

use std::io::Write;

use clap::builder::StyledStr;
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

/// The command line as the binary parses it: [`Cli`]'s definition with
/// every `{n}` of a help text kept literal (see the module doc).
pub fn command() -> clap::Command {
    keep_placeholders(Cli::command())
}

/// `{n}` as clap shows it: the brace, an empty style reset (no output
/// shows it), then `n}`, so clap's `{n}`-means-newline finds nothing.
fn literal_n(text: &StyledStr) -> Option<StyledStr> {
    let ansi = text.ansi().to_string();
    ansi.contains("{n}").then(|| {
        let reset = clap::builder::styling::Reset.render().to_string();
        StyledStr::from(ansi.replace("{n}", &format!("{{{reset}n}}")))
    })
}

fn keep_placeholders(cmd: clap::Command) -> clap::Command {
    let mut cmd = cmd.mut_args(|mut a| {
        if let Some(h) = a.get_help().and_then(literal_n) {
            a = a.help(h);
        }
        if let Some(h) = a.get_long_help().and_then(literal_n) {
            a = a.long_help(h);
        }
        a
    });
    if let Some(h) = cmd.get_about().and_then(literal_n) {
        cmd = cmd.about(h);
    }
    if let Some(h) = cmd.get_long_about().and_then(literal_n) {
        cmd = cmd.long_about(h);
    }
    cmd.mut_subcommands(keep_placeholders)
}

/// `smtpstorm completions SHELL`.
pub fn completions(args: &CompletionsArgs) -> Result<u8, ShellError> {
    let mut cmd = command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "smtpstorm", &mut buf);
    stdout_result(std::io::stdout().lock().write_all(&buf))?;
    Ok(0)
}

/// `smtpstorm man [--out DIR]`.
pub fn man(args: &ManArgs) -> Result<u8, ShellError> {
    let cmd = command();
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
