//! `smtpstorm completions bash|zsh|fish` and `smtpstorm man`, in the
//! shells and the man reader themselves (bash, zsh, fish, man-db and groff,
//! installed by `scripts/install-peers.sh`): bash's completion function
//! completes a flag and a subcommand, fish's `complete -C` does the same,
//! zsh loads the script and defines its function, `man -l` renders the page
//! with the subcommands and exit codes, and groff (with preconv, as man
//! runs it) parses every page of `man --out DIR` without a warning.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn smtpstorm_to(args: &[&str], file: &Path) {
    let out = run("smtpstorm", Command::new(bin()).args(args), LIMIT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    std::fs::write(file, &out.stdout).unwrap();
}

/// Runs `prog args`, returns stdout; panics with stderr on failure.
fn sh(prog: &str, args: &[&str]) -> String {
    let out = run(
        prog,
        Command::new(prog)
            .args(args)
            .env("HOME", std::env::temp_dir()),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completes_flags_and_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("smtpstorm.bash");
    smtpstorm_to(&["completions", "bash"], &script);
    // What bash does on TAB: the function named by `complete -F` is called
    // with COMP_WORDS/COMP_CWORD set and fills COMPREPLY.
    let complete = |words: &str| {
        let prog = format!(
            r#"source '{}'
               fn=$(complete -p smtpstorm | sed -n 's/.*-F \([^ ]*\) .*/\1/p')
               COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
               COMP_LINE="{words}"; COMP_POINT=${{#COMP_LINE}}
               "$fn" smtpstorm "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
               printf '%s\n' "${{COMPREPLY[@]}}""#,
            script.display()
        );
        sh("bash", &["--norc", "-c", &prog])
    };
    let flags = complete("smtpstorm blast --metr");
    assert_eq!(flags.trim(), "--metrics-listen", "{flags}");
    let subs = complete("smtpstorm rep");
    assert_eq!(subs.trim(), "report", "{subs}");
    let html = complete("smtpstorm report run.json --ht");
    assert_eq!(html.trim(), "--html", "{html}");
}

#[test]
fn fish_completes_flags_and_zsh_loads_its_function() {
    let dir = tempfile::tempdir().unwrap();
    let fish = dir.path().join("smtpstorm.fish");
    smtpstorm_to(&["completions", "fish"], &fish);
    let prog = format!(
        "source '{}'; complete -C 'smtpstorm blast --jun'; complete -C 'smtpstorm com'",
        fish.display()
    );
    let out = sh("fish", &["--no-config", "-c", &prog]);
    let firsts: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(firsts, ["--junit", "completions"], "{out}");

    let zsh = dir.path().join("_smtpstorm");
    smtpstorm_to(&["completions", "zsh"], &zsh);
    sh("zsh", &["-n", zsh.to_str().unwrap()]);
    let prog = format!(
        "autoload -Uz compinit && compinit -u -d '{}/zcompdump'; source '{}'; \
         (( $+functions[_smtpstorm] )) && print defined",
        dir.path().display(),
        zsh.display()
    );
    assert_eq!(sh("zsh", &["-f", "-c", &prog]).trim(), "defined");
}

#[test]
fn the_man_page_renders_with_subcommands_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("smtpstorm.1");
    smtpstorm_to(&["man"], &page);
    let out = run(
        "man",
        Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "200")
            .env("LANG", "C.UTF-8"),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "NAME",
        "SYNOPSIS",
        "SUBCOMMANDS",
        "smtpstorm-blast(1)",
        "smtpstorm-completions(1)",
        "4 failed run",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }

    let pages = dir.path().join("pages");
    let out = run(
        "smtpstorm man --out",
        Command::new(bin()).arg("man").arg("--out").arg(&pages),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for want in [
        "smtpstorm.1",
        "smtpstorm-blast.1",
        "smtpstorm-sink.1",
        "smtpstorm-report.1",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    for name in &names {
        let path = pages.join(name);
        let out = run(
            "groff",
            Command::new("groff")
                .args(["-k", "-man", "-ww", "-z"])
                .arg(&path),
            LIMIT,
        );
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let blast = std::fs::read_to_string(pages.join("smtpstorm-blast.1")).unwrap();
    assert!(
        blast.contains("data\\-order"),
        "blast's page lists its flags"
    );
}

/// clap turns a literal `{n}` of a help text into a line break; every
/// placeholder the templates accept must read as itself in `--help`, the
/// man page and the completion scripts.
#[test]
fn every_template_placeholder_reads_right_in_help_man_and_completions() {
    let text = |args: &[&str]| {
        let out = run("smtpstorm", Command::new(bin()).args(args), LIMIT);
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let help = text(&["blast", "--help"]);
    // The --from line names the placeholders on one line.
    let from = help
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("--from"))
        .nth(1)
        .unwrap_or("");
    assert!(
        from.contains("{n} global sequence, {thread}, {rand}, {instance}"),
        "--from help: {from:?}\n{help}"
    );
    for p in ["{n}", "{thread}", "{rand}", "{instance}", "{r}", "client{n}.example"] {
        assert!(help.contains(p), "`blast --help` lacks {p}:\n{help}");
    }
    assert!(!help.contains('\u{1b}'), "escape codes in plain --help");
    let pages = tempfile::tempdir().unwrap();
    text(&["man", "--out", pages.path().to_str().unwrap()]);
    let man = std::fs::read_to_string(pages.path().join("smtpstorm-blast.1")).unwrap();
    let zsh = text(&["completions", "zsh"]);
    let fish = text(&["completions", "fish"]);
    for (what, doc) in [("man", &man), ("zsh", &zsh), ("fish", &fish)] {
        for p in ["{n}", "{thread}", "{rand}", "{instance}", "{r}"] {
            assert!(doc.contains(p), "{what} lacks {p}");
        }
        assert!(!doc.contains('\u{1b}'), "escape codes in {what}");
    }
    assert!(
        man.contains("{n} global sequence"),
        "the man page keeps the --from text"
    );
}
