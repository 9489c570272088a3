//! The `smtpstorm` binary: parse the flags, run the role, map the result to
//! an exit code. Everything else lives in the library (`smtpstorm::run`), so
//! tests can call it.

use std::process::ExitCode;

use clap::error::ErrorKind;

fn main() -> ExitCode {
    // The parser of `shell::command`: help texts keep their `{n}`, flags
    // read the environment too.
    let parsed = smtpstorm::cli::shell::parse_from(std::env::args_os());
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(2)
                }
                _ => {
                    // One line naming the flag and the expected form: clap's
                    // first paragraph, joined (a missing required flag is
                    // named on the line after "...not provided:"), without
                    // the usage hint that follows.
                    let text = e.render().to_string();
                    let first: Vec<&str> = text
                        .lines()
                        .map(str::trim)
                        .take_while(|l| !l.is_empty())
                        .collect();
                    let line = if first.is_empty() {
                        "bad arguments".to_string()
                    } else {
                        first.join(" ")
                    };
                    eprintln!("smtpstorm: {}", line.trim_start_matches("error: "));
                    ExitCode::from(2)
                }
            };
        }
    };
    match smtpstorm::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("smtpstorm: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once: many error types
/// already quote their source in their own message.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}
