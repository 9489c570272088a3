//! The crate is one way down (ARCHITECTURE.md, "What never imports what"):
//! `cli` → the roles (`sink`, `blast`, `bench`, `offline`) → `net` /
//! `smtp` / `stats`; no role imports the CLI or names a backend, no backend
//! imports another, and the seam names no backend.
//!
//! The check reads the sources, as `tests/stats_layers.rs` does for
//! `src/stats`: the code of every file outside its `#[cfg(test)]` module,
//! comment lines left out, must not contain the paths its layer forbids.

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir` (or `dir` itself when it is a file).
fn files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The file's code outside its test module, without comment lines.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let before_tests = text.split("#[cfg(test)]").next().unwrap();
    before_tests
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `needle` occurs in `hay` as a path segment: not followed by an
/// identifier character (so `::xdp` does not match `::xdp_run`).
fn names(hay: &str, needle: &str) -> bool {
    hay.match_indices(needle).any(|(i, _)| {
        hay[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// The (file, forbidden path) pairs found under `places` (relative to src/).
fn offences(places: &[&str], forbidden: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = 0;
    for place in places {
        for f in files(&src().join(place)) {
            seen += 1;
            let c = code(&f);
            for bad in forbidden {
                if names(&c, bad) {
                    let rel = f.strip_prefix(src()).unwrap().display().to_string();
                    out.push(format!("src/{rel} names {bad}"));
                }
            }
        }
    }
    assert!(seen > 0, "no source file found under {places:?}");
    out
}

#[track_caller]
fn assert_none(found: Vec<String>) {
    assert!(found.is_empty(), "upward or sideways imports:\n{}", found.join("\n"));
}

#[test]
fn nothing_below_the_command_line_imports_it() {
    assert_none(offences(
        &[
            "sink", "blast", "bench.rs", "offline.rs", "net", "smtp", "stats", "digest.rs",
            "rng.rs", "units.rs",
        ],
        &["crate::cli", "super::cli"],
    ));
}

#[test]
fn roles_name_no_backend() {
    assert_none(offences(
        &["sink", "blast", "bench.rs", "offline.rs"],
        &[
            "net::xdp", "net::epoll", "net::uring", "net::conn_table", "XdpOptions",
            "XdpRun", "XdpThread",
        ],
    ));
}

#[test]
fn the_lower_layers_know_no_role() {
    assert_none(offences(
        &["net", "smtp", "stats", "digest.rs", "rng.rs", "units.rs"],
        &[
            "crate::sink",
            "crate::blast",
            "crate::bench",
            "crate::offline",
        ],
    ));
}

#[test]
fn the_protocol_knows_no_network_and_no_statistics() {
    assert_none(offences(&["smtp"], &["crate::net", "crate::stats"]));
}

#[test]
fn the_sink_and_the_blaster_do_not_import_each_other() {
    assert_none(offences(&["sink"], &["crate::blast"]));
    assert_none(offences(&["blast"], &["crate::sink"]));
}

#[test]
fn no_backend_imports_another_and_the_seam_names_none() {
    assert_none(offences(&["net/epoll.rs"], &["::uring", "::xdp", "::driver"]));
    assert_none(offences(&["net/uring"], &["::epoll", "::xdp", "::driver"]));
    assert_none(offences(&["net/xdp"], &["::epoll", "::uring", "::driver"]));
    assert_none(offences(
        &["net/backend.rs", "net/conn_table.rs", "net/tls_stream.rs"],
        &["::epoll", "::uring", "::xdp", "::driver"],
    ));
}

#[test]
fn the_check_finds_what_it_looks_for() {
    // The checker itself: a forbidden path in code is found, the same in a
    // comment or a longer identifier is not.
    assert!(names("use crate::net::xdp::XdpRun;", "net::xdp"));
    assert!(!names("use crate::net::xdp_like;", "net::xdp"));
    let c = "// crate::cli in a comment\nfn f() {}";
    let kept: String = c
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect();
    assert!(!names(&kept, "crate::cli"));
}
