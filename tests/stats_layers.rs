//! `src/stats` is layered: data at the bottom, the report above it, checks
//! (assertions, merge) above that, renderers on top, and every module
//! imports only from layers below its own — no import cycles, and nothing
//! of the roles or the network (the roles pass their CPU figures in).
//!
//! The check reads the sources: every `super::NAME` and `crate::stats::NAME`
//! outside the `#[cfg(test)]` module must name a module of a lower layer,
//! and no `crate::net`, `crate::blast`, `crate::sink` or `crate::bench`
//! appears at all.

use std::collections::BTreeMap;

/// Module → layer (lower numbers are further down).
const LAYERS: &[(&str, u32)] = &[
    ("units", 0),
    ("recorder", 1),
    ("trace", 1),
    ("report", 2),
    ("assert", 3),
    ("merge", 4),
    ("e2e", 4),
    ("summary", 5),
    ("hgrm", 5),
    ("hlog", 5),
    ("charts", 5),
    ("metrics", 5),
    ("junit", 5),
    ("csv", 5),
    ("svg", 6),
    ("html", 6),
];

/// The words following each occurrence of `prefix` in `code`, e.g. for
/// `super::` in `use super::{a, b::C}; super::d::f()`: a, b, d.
fn referenced(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        } else {
            out.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn stats_modules_import_only_from_layers_below_their_own() {
    let dir = format!("{}/src/stats", env!("CARGO_MANIFEST_DIR"));
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut problems = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        if path.extension().is_none_or(|e| e != "rs") || name == "mod" {
            continue;
        }
        seen += 1;
        let Some(&mine) = layers.get(name.as_str()) else {
            problems.push(format!("{name}.rs has no layer in this test"));
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut names = referenced(&code, "super::");
        names.extend(referenced(&code, "crate::stats::"));
        for other in names {
            match layers.get(other.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(_) => problems.push(format!("{name} (layer {mine}) imports {other}")),
                None => problems.push(format!("{name} refers to unknown module `{other}`")),
            }
        }
        for role in ["net", "blast", "sink", "bench", "offline"] {
            if referenced(&code, "crate::").iter().any(|n| n == role) {
                problems.push(format!("{name} reaches up into crate::{role}"));
            }
        }
    }
    assert!(seen >= 9, "read the stats modules");
    assert!(problems.is_empty(), "{problems:#?}");
}
