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
/// every `{n}` of a help text kept literal (see the module doc), and every
/// flag readable from the environment ([`with_env`]).
pub fn command() -> clap::Command {
    with_env(keep_placeholders(Cli::command()))
}

/// The prefix of every flag's environment variable.
pub const ENV_PREFIX: &str = "SMTPSTORM_";

/// The environment variable of flag `--long`: `--max-connections` is
/// `SMTPSTORM_MAX_CONNECTIONS`.
pub fn env_name(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// Every flag (not the positional arguments, `--help` or `--version`) also
/// read from its environment variable ([`env_name`]) when it is not on the
/// command line; `--help` shows the name. A switch takes `true`/`false`
/// (also `1`/`0`, `yes`/`no`, `on`/`off`). A flag that already names its
/// variable (`--io`: `SMTPSTORM_IO`) keeps it. Flags of the same name in
/// several commands share the variable. Done here, over the built
/// definition, so a flag added anywhere gets its variable without a line
/// of its own.
pub fn with_env(cmd: clap::Command) -> clap::Command {
    use clap::ArgAction;
    cmd.mut_args(|a| {
        let Some(long) = a.get_long() else {
            return a;
        };
        if a.get_env().is_some()
            || matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        {
            return a;
        }
        // Built once per process, for the life of the process (clap takes
        // an owned name only with its `string` feature).
        let name: &'static str = Box::leak(env_name(long).into_boxed_str());
        match a.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => a
                .env(name)
                .value_parser(clap::builder::BoolishValueParser::new()),
            _ => a.env(name),
        }
    })
    .mut_subcommands(with_env)
}

/// Parses `argv` as the binary does ([`command`]). An error about a flag
/// that came from the environment (not on the command line) says so and
/// names the variable: clap's own message names only the flag.
pub fn parse_from<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::FromArgMatches;
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    command()
        .try_get_matches_from(&argv)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|e| name_env_source(e, &argv))
}

/// `e` with a note naming the environment variable of each flag it
/// mentions that was set there and not on the command line.
fn name_env_source(e: clap::Error, argv: &[std::ffi::OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let mut flags: Vec<String> = Vec::new();
    for kind in [ContextKind::InvalidArg, ContextKind::PriorArg] {
        match e.get(kind) {
            Some(ContextValue::String(s)) => flags.push(s.clone()),
            Some(ContextValue::Strings(v)) => flags.extend(v.iter().cloned()),
            _ => {}
        }
    }
    let on_line = |long: &str| {
        argv.iter().skip(1).any(|a| {
            a.to_str()
                .is_some_and(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")))
        })
    };
    let mut notes = Vec::new();
    for f in flags {
        let Some(long) = f
            .split_whitespace()
            .next()
            .and_then(|t| t.strip_prefix("--"))
        else {
            continue;
        };
        let name = env_name(long);
        if let Some(v) = std::env::var_os(&name).filter(|_| !on_line(long)) {
            notes.push(format!(
                "--{long} comes from the environment: {name}={}",
                v.to_string_lossy()
            ));
        }
    }
    if notes.is_empty() || e.kind() == clap::error::ErrorKind::DisplayHelp {
        return e;
    }
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let line = first.join(" ");
    let line = line.trim_start_matches("error: ");
    clap::Error::raw(e.kind(), format!("{line} ({})\n", notes.join("; ")))
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
