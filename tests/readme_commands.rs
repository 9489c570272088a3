//! Every smtpstorm command the README shows works as shown: each command
//! line of a code block parses with the real CLI definition (every flag
//! exists, every value has an accepted form) and, for `sink` and `blast`,
//! passes the same validation a run starts with; every `--flag` of an
//! inline `smtpstorm ...` span exists on its command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use smtpstorm::cli::{self, Cli, Command};

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(path).expect("README.md")
}

/// Shell-like words: single and double quotes group, a backslash escapes
/// outside single quotes. The command ends at an unquoted `#`, `&`, `|`,
/// `;`, `)` or `>`.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                have = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    cur.push(q);
                }
            }
            '"' => {
                have = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        _ => cur.push(q),
                    }
                }
            }
            '\\' => {
                have = true;
                cur.extend(chars.next());
            }
            '#' | '&' | '|' | ';' | ')' | '>' if !have => break,
            '#' | '&' | '|' | ';' | ')' | '>' => {
                out.push(std::mem::take(&mut cur));
                have = false;
                break;
            }
            c if c.is_whitespace() => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                have = true;
                cur.push(c);
            }
        }
    }
    if have {
        out.push(cur);
    }
    out
}

/// The smtpstorm command lines of the README's code blocks, continuation
/// lines joined, each with its line number.
fn block_commands(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("```") {
            in_block = !in_block;
            pending = None;
            continue;
        }
        if !in_block {
            continue;
        }
        let (start, mut joined) = match pending.take() {
            Some((n, s)) => (n, s),
            None => (i + 1, String::new()),
        };
        if let Some(cont) = line.strip_suffix('\\') {
            joined.push_str(cont);
            joined.push(' ');
            pending = Some((start, joined));
            continue;
        }
        joined.push_str(line);
        if joined.starts_with('#') {
            continue;
        }
        for (at, _) in joined.match_indices("smtpstorm ") {
            // A command starts the line or follows `<(`, `$(`, `&&`, `--`.
            let before = joined[..at].trim_end();
            let starts = before.is_empty()
                || before.ends_with("<(")
                || before.ends_with("$(")
                || before.ends_with("&&")
                || before.ends_with("cargo run --release --");
            if starts {
                let w = words(&joined[at..]);
                out.push((start, w));
            }
        }
        if let Some(rest) = joined.strip_prefix("cargo run --release -- ") {
            let mut w = vec!["smtpstorm".to_string()];
            w.extend(words(rest));
            out.push((start, w));
        }
    }
    out
}

/// `--flags` of the inline code spans that start with `smtpstorm SUB`.
fn inline_flags(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        for (k, span) in line.split('`').enumerate() {
            if k % 2 == 0 {
                continue;
            }
            let mut w = span.split_whitespace();
            if w.next() != Some("smtpstorm") {
                continue;
            }
            // `smtpstorm <command> --help` names no command.
            let Some(sub) = w.next().filter(|s| !s.starts_with('<')) else {
                continue;
            };
            for flag in w.filter(|t| t.starts_with("--")) {
                let name = flag.split('=').next().unwrap().to_string();
                out.push((i + 1, sub.to_string(), name));
            }
        }
    }
    out
}

/// A directory holding one message, for `--data` paths the README names.
fn corpus() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("readme-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.eml"),
        "From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n",
    )
    .unwrap();
    dir
}

#[test]
fn the_readme_shows_commands_to_check() {
    let cmds = block_commands(&readme());
    let subs: Vec<&str> = cmds.iter().map(|(_, w)| w[1].as_str()).collect();
    // Every subcommand appears at least once, so none of them escapes the
    // checks below.
    for sub in ["sink", "blast", "probe", "bench", "merge", "report", "completions", "man"] {
        assert!(subs.contains(&sub), "no `smtpstorm {sub}` in a README code block: {subs:?}");
    }
}

#[test]
fn every_command_in_a_readme_code_block_parses_and_validates() {
    let corpus = corpus();
    let mut failures = Vec::new();
    for (line, mut argv) in block_commands(&readme()) {
        for w in argv.iter_mut() {
            if w == "corpus/" {
                *w = corpus.display().to_string();
            }
        }
        let shown = argv.join(" ");
        let cli = match Cli::try_parse_from(&argv) {
            Ok(c) => c,
            Err(e) => {
                let text = e.to_string();
                failures.push(format!("README line {line}: `{shown}`: {}", text.lines().next().unwrap_or("")));
                continue;
            }
        };
        let checked = match &cli.command {
            Command::Sink(a) => cli::sink::config(a).map(drop).map_err(|e| e.to_string()),
            Command::Blast(a) => {
                // The README's example hosts (mx.test, 192.0.2.10) stand
                // for the reader's server: validate the flags against a
                // resolved address instead of looking the name up.
                let addr: SocketAddr = a.target.parse().unwrap_or_else(|_| "127.0.0.1:25".parse().unwrap());
                cli::blast::config_for(addr, addr.ip().to_string(), &a.load)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        if let Err(e) = checked {
            failures.push(format!("README line {line}: `{shown}`: {e}"));
        }
    }
    let _ = std::fs::remove_dir_all(&corpus);
    assert!(failures.is_empty(), "README commands that do not work as shown:\n{}", failures.join("\n"));
}

#[test]
fn the_ci_example_gate_parses() {
    // scripts/ci-example.yml: `./target/release/smtpstorm ...` lines, the
    // optional `$( [ -f F ] && echo FLAGS )` taken as present.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ci-example.yml");
    let text = std::fs::read_to_string(path).unwrap().replace("./target/release/smtpstorm ", "smtpstorm ");
    let mut joined = String::new();
    let mut seen = Vec::new();
    for line in text.lines() {
        let t = line.trim().trim_start_matches("run: ");
        match t.strip_suffix('\\') {
            Some(cont) => {
                joined.push_str(cont);
                joined.push(' ');
                continue;
            }
            None => joined.push_str(t),
        }
        let mut cmd = std::mem::take(&mut joined);
        if let (Some(a), Some(e)) = (cmd.find("$("), cmd.find("&& echo ")) {
            let z = cmd[e..].find(')').map_or(cmd.len(), |z| e + z);
            let flags = cmd[e + "&& echo ".len()..z].to_string();
            cmd.replace_range(a..(z + 1).min(cmd.len()), &flags);
        }
        if cmd.starts_with("smtpstorm ") {
            let argv = words(&cmd);
            Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("ci-example.yml: `{cmd}`: {e}"));
            seen.push(argv[1].clone());
        }
    }
    assert_eq!(seen, ["bench", "report"], "the gate and the HTML report step");
}

#[test]
fn every_flag_of_an_inline_readme_command_exists() {
    let cli = Cli::command();
    let mut failures = Vec::new();
    let flags = inline_flags(&readme());
    assert!(!flags.is_empty(), "no inline `smtpstorm SUB --flag` spans found");
    for (line, sub, flag) in flags {
        let Some(cmd) = cli.find_subcommand(&sub) else {
            failures.push(format!("README line {line}: no subcommand `{sub}`"));
            continue;
        };
        let name = flag.trim_start_matches("--");
        let known = name == "help"
            || cmd
                .get_arguments()
                .any(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|v| v.contains(&name)));
        if !known {
            failures.push(format!("README line {line}: `smtpstorm {sub}` has no {flag}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_checks_catch_a_wrong_flag_and_a_wrong_value() {
    // The checks above would pass vacuously if parsing accepted anything.
    let bad = "```sh\nsmtpstorm blast 127.0.0.1:25 --rate fast\nsmtpstorm sink --no-such-flag\n```\n";
    let cmds = block_commands(bad);
    assert_eq!(cmds.len(), 2);
    for (_, argv) in cmds {
        assert!(Cli::try_parse_from(&argv).is_err(), "{argv:?} parsed");
    }
    let w = words("smtpstorm blast h --assert 'p99(message) < 20ms' --x \"a b\" && man x # c");
    assert_eq!(w, ["smtpstorm", "blast", "h", "--assert", "p99(message) < 20ms", "--x", "a b"]);
    let inline = inline_flags("run `smtpstorm sink --listen A --nope` then `other --x`");
    assert_eq!(inline.len(), 2);
    assert_eq!(inline[1].2, "--nope");
    assert_eq!(words("source <(smtpstorm completions bash)  # or zsh"), ["source", "<(smtpstorm", "completions", "bash"]);
}
