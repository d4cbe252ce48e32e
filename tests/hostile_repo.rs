//! Hostile and malformed repositories, driven through the real `runner` binary against the real daemon: every one
//! is refused with an error naming what is wrong, exit code 1 (2 for a usage error), no panic, nothing applied to
//! the properties, nothing read from outside the repository, and no container left behind. Also the runner's own
//! edges that a careless or hostile input reaches: absurd durations, sizes and names, a closed stdout, the data
//! directory's modes.

mod support;

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Sits in a file beside the repository: no output, log or image may ever show it.
const CANARY: &str = "host-only-canary-7c1d";

/// A data directory with project `h` (environment `dev`) whose repository each test fills with something hostile.
/// `outside/` beside the repository holds the canary; the unpacked snapshot lives three levels below the data
/// directory (`cache/repo-trees/<sha>`), so `../../../outside` from its root reaches the canary.
struct Hostile {
    home: tempfile::TempDir,
    repo: PathBuf,
    outside: PathBuf,
}

impl Hostile {
    fn new() -> Hostile {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("repo");
        let outside = home.path().join("outside");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), format!("{CANARY}\n")).unwrap();
        std::fs::write(
            outside.join("Dockerfile"),
            format!("FROM scratch\nLABEL leaked={CANARY}\n"),
        )
        .unwrap();
        std::fs::write(
            outside.join("props.json"),
            format!(r#"{{"leak": "{CANARY}"}}"#),
        )
        .unwrap();
        support::git(&repo, &["init", "-q", "-b", "main"]);
        let h = Hostile {
            home,
            repo,
            outside,
        };
        h.commit(&[(".opschain/actions.json", OK_MANIFEST)], &[]);
        h.ok(&[
            "project",
            "create",
            "--code",
            "h",
            "--name",
            "Hostile",
            "--git-remote",
            h.repo.to_str().unwrap(),
        ]);
        h.ok(&[
            "environment",
            "create",
            "--project",
            "h",
            "--code",
            "dev",
            "--name",
            "Dev",
        ]);
        h
    }

    /// Writes `files` and `symlinks` (path, target) into the repository and commits everything.
    fn commit(&self, files: &[(&str, &str)], symlinks: &[(&str, &str)]) {
        for (path, content) in files {
            let path = self.repo.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let _ = std::fs::remove_file(&path);
            std::fs::write(path, content).unwrap();
        }
        for (path, target) in symlinks {
            let path = self.repo.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir_all(&path);
            std::os::unix::fs::symlink(target, path).unwrap();
        }
        support::git(&self.repo, &["add", "-A"]);
        support::git(
            &self.repo,
            &["commit", "-q", "--allow-empty", "-m", "hostile"],
        );
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(args)
            .env("RUNNER_HOME", self.home.path())
            .env("RUNNER_STOP_GRACE", "2s")
            .env_remove("RUNNER_OUTPUT");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("runner runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "runner {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&args)).expect("JSON output")
    }

    /// `change create` of `action` at `main`, in the foreground.
    fn change(&self, action: &str) -> Output {
        self.run(&[
            "change",
            "create",
            "--project",
            "h",
            "--environment",
            "dev",
            "--git-rev",
            "main",
            "--action",
            action,
        ])
    }

    fn changes(&self) -> Vec<Value> {
        self.json(&["change", "list"]).as_array().unwrap().clone()
    }

    /// How many versions the project's and the environment's properties have.
    fn property_versions(&self) -> (usize, usize) {
        let count = |args: &[&str]| self.json(args).as_array().unwrap().len();
        (
            count(&["project", "properties-history", "--project", "h"]),
            count(&[
                "environment",
                "properties-history",
                "--project",
                "h",
                "--environment",
                "dev",
            ]),
        )
    }

    /// The id the runner labels this data directory's containers with.
    fn store_id(&self) -> String {
        use sha2::Digest;
        let canonical = std::fs::canonicalize(self.home.path()).unwrap();
        hex::encode(&sha2::Sha256::digest(canonical.to_string_lossy().as_bytes())[..8])
    }

    /// Nothing of this data directory's is left on the daemon.
    fn assert_nothing_left_running(&self) {
        let output = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=runner.store={}", self.store_id()),
            ])
            .output()
            .unwrap();
        let left = String::from_utf8_lossy(&output.stdout);
        assert!(left.trim().is_empty(), "containers left behind: {left}");
    }

    /// The stored logs of every change of this data directory.
    fn all_logs(&self) -> String {
        self.changes()
            .iter()
            .map(|c| self.ok(&["change", "show-logs", c["id"].as_str().unwrap()]))
            .collect()
    }
}

const OK_MANIFEST: &str = r#"{"actions": {"ok": {"run": "echo fine"}}}"#;

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Exit code `code`, `needle` in stderr, no panic and no canary anywhere in the output.
fn assert_refused(out: &Output, code: i32, needle: &str) {
    let all = text(out);
    assert_eq!(out.status.code(), Some(code), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(needle),
        "expected {needle:?} in stderr:\n{all}"
    );
    assert!(!all.contains("panicked"), "{all}");
    assert!(!all.contains(CANARY), "the host file leaked:\n{all}");
}

/// A manifest the runner must refuse when the change is created: before any change, build or container exists.
fn refused_at_create(h: &Hostile, action: &str, needle: &str) {
    let before = h.property_versions();
    let out = h.change(action);
    assert_refused(&out, 1, needle);
    assert!(h.changes().is_empty(), "no change may be recorded");
    assert_eq!(h.property_versions(), before, "nothing may be applied");
    h.assert_nothing_left_running();
}

/// A change that is created but fails before its step's container runs (e.g. while building); returns the failed
/// step's reason.
fn refused_in_change(h: &Hostile, action: &str, needle: &str) -> String {
    let before = h.property_versions();
    let out = h.change(action);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(!all.contains("panicked"), "{all}");
    assert!(!all.contains(CANARY), "the host file leaked:\n{all}");
    let changes = h.changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["state"], "error", "{all}");
    let shown = h.json(&["change", "show", changes[0]["id"].as_str().unwrap()]);
    let reasons: Vec<String> = std::iter::once(&shown["change"])
        .chain(shown["steps"].as_array().unwrap())
        .filter_map(|s| s["reason"].as_str().map(str::to_owned))
        .collect();
    let reason = reasons.join("\n");
    assert!(
        reason.contains(needle),
        "expected {needle:?} in {reasons:?}"
    );
    assert!(
        shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["exit_code"].is_null()),
        "no step container may have run: {shown}"
    );
    assert_eq!(h.property_versions(), before, "nothing may be applied");
    assert!(!h.all_logs().contains(CANARY), "the host file leaked");
    h.assert_nothing_left_running();
    reason
}

// ---- Manifests ----

/// Manifests the runner must refuse when the change is created, with the error each gets. One data directory
/// serves every row: a refusal records nothing, so none can see another's.
#[test]
fn manifests_that_cannot_run_are_refused_when_the_change_is_created() {
    if !support::docker_available() {
        return;
    }
    let h = Hostile::new();
    let long_service = "s".repeat(64);
    let outside_dockerfile = h.outside.join("Dockerfile");
    // (case, .opschain/actions.json, action, what the error says)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "a timeout too long to represent is refused, not a panic",
            r#"{"actions": {"slow": {"run": "true", "timeout": "99999999999999999999h"}}}"#.into(),
            "slow",
            "\"99999999999999999999h\" is too long: at most 8760h",
        ),
        (
            "a numeric timeout beyond any duration",
            r#"{"actions": {"slow": {"run": "true", "timeout": 18446744073709551615}}}"#.into(),
            "slow",
            "is too long",
        ),
        (
            "a service readiness timeout overflow",
            r#"{"actions": {"it": {"run": "true", "services": {"db": {"image": "x", "readiness_timeout": "1e400h"}}}}}"#.into(),
            "it",
            "invalid duration unit",
        ),
        (
            "a manifest that is not UTF-8",
            b"{\"actions\": {\"\xff\xfe\": {}}}".to_vec(),
            "ok",
            ".opschain/actions.json is malformed",
        ),
        (
            "a truncated manifest",
            r#"{"actions": {"ok": {"run": "#.into(),
            "ok",
            ".opschain/actions.json is malformed",
        ),
        (
            "an action cannot grant itself unknown settings",
            r#"{"actions": {"ok": {"run": "true", "privileged": true, "secrets": ["db"]}}}"#.into(),
            "ok",
            "unknown field `privileged`",
        ),
        (
            "an action name with control characters",
            r#"{"actions": {"ok\u001b[2J": {"run": "true"}, "ok": {"run": "true"}}}"#.into(),
            "ok",
            "action name \"ok\\u{1b}[2J\"",
        ),
        (
            "a service name longer than a host name",
            format!(
                r#"{{"actions": {{"it": {{"run": "true", "services": {{"{long_service}": {{"image": "x"}}}}}}}}}}"#
            )
            .into(),
            "it",
            "use 1-63 letters",
        ),
        (
            "actions that reach themselves",
            r#"{"actions": {"a": {"steps": ["b"]}, "b": {"steps": ["a"]}}}"#.into(),
            "a",
            "form a cycle: a -> b -> a",
        ),
        (
            "a service build context with `..`",
            service_build("web/Dockerfile", "web/../../outside").into(),
            "it",
            "leaves the repository (`..`)",
        ),
        (
            "an absolute service Dockerfile path",
            service_build(outside_dockerfile.to_str().unwrap(), ".").into(),
            "it",
            "is absolute: give a path inside the repository",
        ),
        (
            "resources that are not sizes",
            r#"{"actions": {"it": {"run": "true", "resources": {"memory": "lots"}}}}"#.into(),
            "it",
            "action \"it\" in .opschain/actions.json: `resources` invalid size \"lots\"",
        ),
    ];
    let cases = cases.into_iter().map(|(case, m, a, n)| (case, (m, a, n)));
    support::each_case(cases, |(manifest, action, needle)| {
        std::fs::write(h.repo.join(".opschain/actions.json"), manifest).unwrap();
        h.commit(&[], &[]);
        refused_at_create(&h, action, needle);
    });
}

#[test]
fn an_action_name_longer_than_the_limit_is_refused() {
    if !support::docker_available() {
        return;
    }
    let h = Hostile::new();
    let name = "a".repeat(5000);
    h.commit(
        &[(
            ".opschain/actions.json",
            &format!(r#"{{"actions": {{"{name}": {{"run": "true"}}, "ok": {{"run": "true"}}}}}}"#),
        )],
        &[],
    );
    refused_at_create(&h, "ok", "use 1-100 printable characters");
    let out = h.change("ok");
    assert!(
        out.stderr.len() < 1000,
        "the error quotes a bounded excerpt of the name, not all of it"
    );
}

#[test]
fn a_manifest_symlinked_out_of_the_repository_is_refused() {
    if !support::docker_available() {
        return;
    }
    let h = Hostile::new();
    std::fs::remove_file(h.repo.join(".opschain/actions.json")).unwrap();
    let target = h.outside.join("secret.txt");
    h.commit(&[], &[(".opschain/actions.json", target.to_str().unwrap())]);
    refused_at_create(&h, "ok", ".opschain/actions.json at ");
    let out = h.change("ok");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symlinks are never followed"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_opschain_directory_symlinked_out_of_the_repository_is_refused() {
    if !support::docker_available() {
        return;
    }
    let h = Hostile::new();
    std::fs::remove_dir_all(h.repo.join(".opschain")).unwrap();
    std::fs::write(
        h.outside.join("actions.json"),
        r#"{"actions": {"ok": {"run": "true"}}}"#,
    )
    .unwrap();
    h.commit(&[], &[(".opschain", "../outside")]);
    refused_at_create(&h, "ok", "is reached through the symlink .opschain");
}

/// The service manifest for the build tests: `web` built from `dockerfile` with `context`.
fn service_build(dockerfile: &str, context: &str) -> String {
    format!(
        r#"{{"actions": {{"it": {{"run": "true", "services": {{"web": {{"build": {{"dockerfile": "{dockerfile}", "context": "{context}"}}}}}}}}}}}}"#
    )
}

/// Symlinks out of the repository, one per kind of path read while the change runs: each fails the change before
/// any step container runs, with a reason that names it.
#[test]
fn paths_symlinked_out_of_the_repository_fail_the_change_before_any_step_runs() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let service =
        |dockerfile, context| (".opschain/actions.json", service_build(dockerfile, context));
    let copy_secret = (
        "web/Dockerfile",
        "FROM scratch\nCOPY secret.txt /\n".to_owned(),
    );
    let cases = [
        (
            "repository properties",
            Escape {
                files: vec![],
                link: (".opschain/properties.json", "$OUTSIDE/props.json"),
                action: "ok",
                reason: &["symlinks are never followed"],
            },
        ),
        (
            "the repository's Dockerfile",
            Escape {
                files: vec![],
                link: (".opschain/Dockerfile", "$OUTSIDE/Dockerfile"),
                action: "ok",
                reason: &[".opschain/Dockerfile at ", "symlinks are never followed"],
            },
        ),
        (
            "a relative service build context",
            Escape {
                files: vec![service("web/Dockerfile", "svc"), copy_secret.clone()],
                link: ("svc", "../../../outside"),
                action: "it",
                reason: &[
                    "build context \"svc\" leads outside the repository",
                    "service \"web\"",
                ],
            },
        ),
        (
            "an absolute service build context",
            Escape {
                files: vec![service("web/Dockerfile", "svc"), copy_secret],
                link: ("svc", "$OUTSIDE"),
                action: "it",
                reason: &["build context \"svc\" leads outside the repository"],
            },
        ),
        (
            "a service Dockerfile",
            Escape {
                files: vec![service("web/Dockerfile", ".")],
                link: ("web/Dockerfile", "../../../../outside/Dockerfile"),
                action: "it",
                reason: &["build Dockerfile \"web/Dockerfile\" leads outside the repository"],
            },
        ),
        (
            "a service Dockerfile below a symlinked directory",
            Escape {
                files: vec![service("svc/Dockerfile", ".")],
                link: ("svc", "../../../outside"),
                action: "it",
                reason: &["build Dockerfile \"svc/Dockerfile\" leads outside the repository"],
            },
        ),
    ];
    support::each_case(cases, |escape| {
        let h = Hostile::new();
        let files: Vec<(&str, &str)> = escape.files.iter().map(|(p, c)| (*p, c.as_str())).collect();
        let (link, target) = escape.link;
        let target = target.replace("$OUTSIDE", h.outside.to_str().unwrap());
        h.commit(&files, &[(link, &target)]);
        let reason = refused_in_change(&h, escape.action, escape.reason[0]);
        for needle in &escape.reason[1..] {
            assert!(reason.contains(needle), "expected {needle:?} in {reason}");
        }
    });
}

/// A path of the repository symlinked out of it, and how the change fails.
struct Escape {
    /// Committed as they are.
    files: Vec<(&'static str, String)>,
    /// The symlink (path, target); a target `$OUTSIDE…` starts with the absolute path of `outside/`.
    link: (&'static str, &'static str),
    action: &'static str,
    /// What the failed change's reason says: all of these.
    reason: &'static [&'static str],
}

#[test]
fn symlinks_in_the_repository_reach_the_step_as_symlinks_never_as_host_files() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let h = Hostile::new();
    let target = h.outside.join("secret.txt");
    h.commit(
        &[(
            ".opschain/actions.json",
            r#"{"actions": {"look": {"run": "readlink /opt/opschain/out; readlink /opt/opschain/up; cat /opt/opschain/out /opt/opschain/up/secret.txt 2>&1; true"}}}"#,
        )],
        &[("out", target.to_str().unwrap()), ("up", "../outside")],
    );
    let out = h.change("look");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains(target.to_str().unwrap()), "{all}");
    assert!(all.contains("../outside"), "{all}");
    assert!(
        !all.contains(CANARY),
        "a symlink was followed on the host:\n{all}"
    );
    h.assert_nothing_left_running();
}

// ---- Sizes ----

#[test]
fn a_step_patch_over_the_properties_size_cap_fails_the_step_and_applies_nothing() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let h = Hostile::new();
    h.commit(
        &[(
            ".opschain/actions.json",
            r#"{"actions": {"grow": {"run": "{ printf '{\"blob\": \"'; head -c 1100000 /dev/zero | tr '\\0' a; printf '\"}'; } > \"$RUNNER_PROJECT_PROPERTIES\""}}}"#,
        )],
        &[],
    );
    let before = h.property_versions();
    let out = h.change("grow");
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("over the limit of 1048576 bytes"), "{all}");
    assert_eq!(h.property_versions(), before, "nothing may be applied");
    h.assert_nothing_left_running();
}

#[test]
fn cli_properties_over_the_size_cap_are_refused_like_a_steps() {
    let h = Hostile::new();
    let big = format!(r#"{{"blob": "{}"}}"#, "a".repeat(1_100_000));
    let file = h.home.path().join("big.json");
    std::fs::write(&file, big).unwrap();
    let before = h.property_versions();
    let out = h.run(&[
        "project",
        "set-properties",
        "--project",
        "h",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert_refused(&out, 1, "over the limit of 1048576 bytes");
    assert_eq!(h.property_versions(), before);
}

#[test]
fn a_secret_name_longer_than_the_limit_is_refused() {
    let h = Hostile::new();
    let name = "s".repeat(101);
    let out = h.run(&["secret", "set", &name, "K=V"]);
    assert_refused(&out, 1, "use 1-100 letters");
    assert!(!h.home.path().join(format!("secrets/{name}.json")).exists());
}

#[test]
fn a_project_code_longer_than_the_limit_is_refused() {
    let h = Hostile::new();
    let code = "p".repeat(51);
    let out = h.run(&["project", "create", "--code", &code, "--name", "P"]);
    assert_refused(&out, 1, "use 1-50 lowercase letters");
    let out = h.run(&[
        "environment",
        "create",
        "--project",
        "h",
        "--code",
        &code,
        "--name",
        "E",
    ]);
    assert_refused(&out, 1, "use 1-50 lowercase letters");
}

// ---- The runner's own edges ----

#[test]
fn serve_grace_overflow_is_a_usage_error_not_a_panic() {
    let h = Hostile::new();
    let out = h.run(&["serve", "--grace", "99999999999999999999h"]);
    assert_refused(&out, 2, "is too long: at most 8760h");
}

#[test]
fn a_stop_grace_overflow_in_the_environment_is_refused() {
    if !support::docker_available() {
        return;
    }
    let h = Hostile::new();
    let out = h
        .command(&[
            "change",
            "create",
            "--project",
            "h",
            "--environment",
            "dev",
            "--git-rev",
            "main",
            "--action",
            "ok",
        ])
        .env("RUNNER_STOP_GRACE", "99999999999999999999h")
        .output()
        .unwrap();
    assert_refused(
        &out,
        1,
        "invalid RUNNER_STOP_GRACE \"99999999999999999999h\"",
    );
    assert!(h.changes().is_empty());
}

#[test]
fn show_logs_into_a_closed_pipe_ends_quietly() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let h = Hostile::new();
    h.commit(
        &[(
            ".opschain/actions.json",
            r#"{"actions": {"chatty": {"run": "i=0; while [ $i -lt 5000 ]; do echo line $i, padded to fill the pipe buffer ..........................................; i=$((i+1)); done"}}}"#,
        )],
        &[],
    );
    let out = h.change("chatty");
    assert!(out.status.success(), "{}", text(&out));
    let id = h.changes()[0]["id"].as_str().unwrap().to_owned();
    // `runner change show-logs ID | head -1`: the reader goes away after one line.
    let mut child = h
        .command(&["change", "show-logs", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    let n = std::io::Read::read(&mut stdout, &mut first).unwrap();
    assert!(n > 0);
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.trim().is_empty(), "ends quietly: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_data_directory_store_and_secrets_are_private_even_if_they_were_not() {
    let h = Hostile::new();
    h.ok(&["secret", "set", "db", "PASSWORD=x"]);
    let home = h.home.path();
    // As an older runner (or a careless copy) left them: readable by everyone.
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in [
        "runner.db",
        "secrets/db.json",
        "secrets/opschain-runner-env.json",
    ] {
        std::fs::set_permissions(home.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    h.ok(&["project", "list"]);
    assert_eq!(mode(home), 0o700);
    assert_eq!(mode(&home.join("secrets")), 0o700);
    for file in [
        "runner.db",
        "secrets/db.json",
        "secrets/opschain-runner-env.json",
    ] {
        assert_eq!(mode(&home.join(file)), 0o600, "{file}");
    }
    for file in ["runner.db-wal", "runner.db-shm"] {
        if home.join(file).exists() {
            assert_eq!(mode(&home.join(file)), 0o600, "{file}");
        }
    }

    // A fresh data directory is private from the first command.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_home = fresh.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["project", "list"])
        .env("RUNNER_HOME", &fresh_home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&fresh_home), 0o700);
    assert_eq!(mode(&fresh_home.join("runner.db")), 0o600);
}

// ---- Step containers within the operator's limits ----

#[test]
fn resources_above_the_operators_maximum_are_refused_before_anything_runs() {
    if !support::docker_available() {
        return;
    }
    let h = Hostile::new();
    h.commit(
        &[(
            ".opschain/actions.json",
            r#"{"actions": {"deploy": {"steps": ["fine", "greedy"]}, "fine": {"run": "true"},
                "greedy": {"run": "true", "resources": {"memory": "64GiB"}}}}"#,
        )],
        &[],
    );
    // A child asking for too much fails the whole change when it is created, not half-way through.
    refused_at_create(
        &h,
        "deploy",
        "the step asks for memory 64GiB, above the operator's maximum 4GiB",
    );
    let out = h.change("deploy");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("raise `max_memory` in [steps] of"),
        "{}",
        text(&out)
    );
    h.commit(
        &[(
            ".opschain/actions.json",
            r#"{"actions": {"forky": {"run": "true", "resources": {"pids": 1000000}}}}"#,
        )],
        &[],
    );
    refused_at_create(&h, "forky", "raise `max_pids`");
}

#[test]
fn a_fork_bomb_and_a_memory_hog_each_fail_alone_while_a_sibling_succeeds() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let h = Hostile::new();
    h.commit(
        &[(
            ".opschain/actions.json",
            r#"{"actions": {
                "all": {"steps": ["bomb", "hog", "sibling"], "run_as": "parallel"},
                "bomb": {"run": "b() { b | b & }; b; sleep 60; echo the bomb was not stopped",
                         "resources": {"pids": 64}, "timeout": "5m"},
                "hog": {"run": "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo the hog survived ${#x}",
                        "resources": {"memory": "64MiB"}, "timeout": "5m"},
                "sibling": {"run": "sleep 2; echo sibling done"},
                "ok": {"run": "echo fine"}}}"#,
        )],
        &[],
    );
    let out = h.change("all");
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(!all.contains("panicked"), "{all}");
    let id = h.changes()[0]["id"].as_str().unwrap().to_owned();
    let shown = h.json(&["change", "show", &id]);
    let step = |action: &str| -> Value {
        shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["action"] == action)
            .cloned()
            .unwrap_or_else(|| panic!("no step {action}: {shown}"))
    };
    let (bomb, hog, sibling) = (step("bomb"), step("hog"), step("sibling"));
    assert_eq!(bomb["state"], "error", "{shown}");
    assert!(
        bomb["reason"]
            .as_str()
            .unwrap()
            .ends_with("process limit reached (pids 64)"),
        "{bomb}"
    );
    assert_eq!(hog["state"], "error", "{shown}");
    assert!(
        hog["reason"]
            .as_str()
            .unwrap()
            .ends_with("out of memory (limit 64MiB)"),
        "{hog}"
    );
    assert_eq!(sibling["state"], "success", "{shown}");
    assert!(all.contains("sibling done"), "{all}");
    assert!(!all.contains("the bomb was not stopped"), "{all}");
    assert!(!all.contains("the hog survived"), "{all}");
    h.assert_nothing_left_running();
    // The runner carries on: the next change runs as usual.
    let out = h.change("ok");
    assert!(out.status.success(), "{}", text(&out));
}
