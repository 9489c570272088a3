//! `scripts/k8s/` runs as committed (issue 22, item 5): `render.sh N` prints
//! every manifest with the one instance count set everywhere it appears;
//! each rendered manifest passes `kubernetes-validate --strict` (the
//! Kubernetes schemas, unknown fields rejected; installed by
//! scripts/install-peers.sh) and a manifest with a wrong field does not;
//! the shared volume is ReadWriteMany; the image the manifests name is
//! built by the repository's Dockerfile, whose COPY sources exist and hold
//! everything the build compiles. (No container engine here: the image
//! itself is not built.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s() -> PathBuf {
    root().join("scripts/k8s")
}

#[track_caller]
fn ok(what: &str, out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `render.sh ARGS`: the manifests as YAML text.
fn render(args: &[&str]) -> String {
    let out = Command::new("sh")
        .arg(k8s().join("render.sh"))
        .args(args)
        .output()
        .expect("sh runs");
    ok("render.sh", out)
}

/// The YAML documents of `text` as JSON values (PyYAML, a dependency of
/// kubernetes-validate).
fn documents(text: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.yaml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&f)
        .output()
        .unwrap();
    serde_json::from_str(&ok("yaml to json", out)).unwrap()
}

/// `kubernetes-validate --strict` on `text`: (success, its output).
fn validate(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("manifests.yaml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&f)
        .output()
        .expect("kubernetes-validate is installed (scripts/install-peers.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {docs:?}"))
}

/// The shell script a Job's container runs (`sh -c SCRIPT`).
fn script(container: &Value) -> &str {
    assert_eq!(container["command"], serde_json::json!(["/bin/sh", "-c"]));
    container["args"][0].as_str().unwrap()
}

#[test]
fn every_rendered_manifest_passes_the_kubernetes_schemas_strictly() {
    for n in ["1", "4", "7"] {
        let text = render(&[n, "45"]);
        assert!(!text.contains("__"), "a placeholder left: {text}");
        let (passed, out) = validate(&text);
        assert!(passed, "{n} instances: {out}");
        for resource in [
            "persistentvolumeclaim/smtpstorm-results",
            "job/smtpstorm-blast",
            "job/smtpstorm-merge",
        ] {
            assert!(
                out.contains(&format!("passed for resource {resource}")),
                "{out}"
            );
        }
    }
}

#[test]
fn every_manifest_file_in_scripts_k8s_is_rendered_and_so_validated() {
    let render_sh = std::fs::read_to_string(k8s().join("render.sh")).unwrap();
    let list = render_sh
        .lines()
        .find(|l| l.starts_with("for f in "))
        .expect("render.sh lists its files");
    let mut yaml: Vec<String> = std::fs::read_dir(k8s())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    yaml.sort();
    assert_eq!(yaml.len(), 3, "{yaml:?}");
    for f in &yaml {
        assert!(list.contains(f.as_str()), "{f} is not rendered: {list}");
    }
}

#[test]
fn a_manifest_with_a_wrong_field_or_type_fails_validation() {
    let text = render(&["4", "45"]);
    let misspelt = text.replacen("  completions: 4", "  completion: 4", 1);
    assert_ne!(misspelt, text);
    let (passed, out) = validate(&misspelt);
    assert!(!passed, "an unknown field must fail: {out}");
    assert!(out.contains("completion"), "{out}");
    let wrong_type = text.replacen("  parallelism: 4", "  parallelism: four", 1);
    assert_ne!(wrong_type, text);
    let (passed, out) = validate(&wrong_type);
    assert!(
        !passed,
        "a string where an integer belongs must fail: {out}"
    );
    assert!(out.contains("four"), "{out}");
}

#[test]
fn one_value_sets_the_instance_count_everywhere_it_appears() {
    for n in [3u64, 12] {
        let docs = documents(&render(&[&n.to_string(), "45"]));
        let blast = kind(&docs, "Job", "smtpstorm-blast");
        assert_eq!(blast["spec"]["completionMode"], "Indexed");
        assert_eq!(blast["spec"]["completions"], n);
        assert_eq!(blast["spec"]["parallelism"], n);
        let run = script(&blast["spec"]["template"]["spec"]["containers"][0]);
        assert!(run.contains(&format!("--instance \"$i/{n}\"")), "{run}");
        assert!(run.contains("i=$JOB_COMPLETION_INDEX"), "{run}");
        let merge = kind(&docs, "Job", "smtpstorm-merge");
        let wait = script(&merge["spec"]["template"]["spec"]["initContainers"][0]);
        assert!(wait.contains(&format!("-lt {n} ]")), "{wait}");
        // The same start time and directory in both Jobs.
        let start = run
            .split("--start-at ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap();
        assert!(start.parse::<u64>().is_ok(), "{run}");
        let merge_run = script(&merge["spec"]["template"]["spec"]["containers"][0]);
        for s in [wait, merge_run] {
            assert!(s.contains(&format!("dir=/results/run-{start}")), "{s}");
        }
        assert!(
            merge_run.contains("smtpstorm merge \"$dir\"/blast-*.json"),
            "{merge_run}"
        );
    }
    // The default is 4; a count that is no positive integer is refused.
    let docs = documents(&render(&[]));
    assert_eq!(
        kind(&docs, "Job", "smtpstorm-blast")["spec"]["completions"],
        4
    );
    let out = Command::new("sh")
        .arg(k8s().join("render.sh"))
        .arg("0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_shared_volume_is_read_write_many_and_both_jobs_mount_it() {
    let docs = documents(&render(&["2", "45"]));
    let pvc = kind(&docs, "PersistentVolumeClaim", "smtpstorm-results");
    assert_eq!(
        pvc["spec"]["accessModes"],
        serde_json::json!(["ReadWriteMany"])
    );
    let comment = std::fs::read_to_string(k8s().join("results-pvc.yaml")).unwrap();
    assert!(comment.contains("different nodes"), "the why is stated");
    for job in ["smtpstorm-blast", "smtpstorm-merge"] {
        let spec = &kind(&docs, "Job", job)["spec"]["template"]["spec"];
        assert_eq!(
            spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "smtpstorm-results"
        );
    }
}

/// The Dockerfile's instructions, continuation lines joined, comments out.
fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        match line.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(line);
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
        }
    }
    out
}

#[test]
fn the_image_the_manifests_name_is_built_from_the_repository_dockerfile() {
    let build = "docker build -t smtpstorm:latest .";
    let recipe = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        recipe.contains(build),
        "the Dockerfile says how it is built"
    );
    let blast_yaml = std::fs::read_to_string(k8s().join("blast-indexed-job.yaml")).unwrap();
    assert!(
        blast_yaml.contains("Dockerfile at the repository root") && blast_yaml.contains(build),
        "the manifest names the recipe"
    );
    for doc in documents(&render(&["2", "45"])) {
        if doc["kind"] != "Job" {
            continue;
        }
        let spec = &doc["spec"]["template"]["spec"];
        for c in ["containers", "initContainers"]
            .iter()
            .flat_map(|k| spec[*k].as_array().cloned().unwrap_or_default())
        {
            assert_eq!(c["image"], "smtpstorm:latest", "{c}");
        }
    }
    // The toolchain is the one Cargo.toml asks for.
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let steps = dockerfile();
    assert!(
        steps[0].starts_with(&format!("FROM docker.io/library/rust:{rust_version}-")),
        "{}",
        steps[0]
    );
    // Every COPY from the context names files that exist; together they
    // hold the manifest, the lock file and every source the binary needs.
    let ctx = tempfile::tempdir().unwrap();
    let mut copied: Vec<PathBuf> = Vec::new();
    for step in steps
        .iter()
        .filter(|s| s.starts_with("COPY ") && !s.contains("--from"))
    {
        let words: Vec<&str> = step.split_whitespace().skip(1).collect();
        let (dest, sources) = words.split_last().unwrap();
        for src in sources {
            let from = root().join(src);
            assert!(from.exists(), "{step}: {src} does not exist");
            let to = if sources.len() > 1 || dest.ends_with('/') && from.is_file() {
                ctx.path().join(dest.trim_start_matches("./")).join(src)
            } else {
                ctx.path().join(dest.trim_start_matches("./"))
            };
            copy(&from, &to);
            copied.push(PathBuf::from(src));
        }
    }
    let out = Command::new("cargo")
        .args([
            "metadata",
            "--offline",
            "--locked",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(ctx.path())
        .output()
        .unwrap();
    let meta: Value =
        serde_json::from_str(&ok("cargo metadata in the copied context", out)).unwrap();
    let targets = meta["packages"][0]["targets"].as_array().unwrap();
    let bin = targets
        .iter()
        .find(|t| t["kind"] == serde_json::json!(["bin"]) && t["name"] == "smtpstorm")
        .expect("the smtpstorm binary");
    for t in targets.iter().filter(|t| {
        t["kind"] == serde_json::json!(["bin"]) || t["kind"] == serde_json::json!(["lib"])
    }) {
        let src = Path::new(t["src_path"].as_str().unwrap());
        assert!(
            src.exists(),
            "{} is not in the build context",
            src.display()
        );
        // Every module of the crate is there too: the whole source tree was copied.
        assert!(
            src.starts_with(ctx.path().canonicalize().unwrap().join("src")),
            "{}",
            src.display()
        );
    }
    assert!(copied.contains(&PathBuf::from("src")), "{copied:?}");
    assert_eq!(bin["name"], "smtpstorm");
    let run = steps
        .iter()
        .find(|s| s.starts_with("RUN cargo build"))
        .unwrap();
    assert!(
        run.contains("--locked") && run.contains("--bin smtpstorm"),
        "{run}"
    );
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("COPY --from=build /src/target/release/smtpstorm ")),
        "the runtime stage takes the release binary"
    );
}

fn copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}
