//! Base runner images built `--from` an image of the user's: an image made on the spot from this machine's own
//! files (dash as /bin/sh, perl and the libraries it loads — no busybox, no agent), imported into the Engine with
//! bollard's import API, then used by real changes.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The staged images, imported once per test binary (their tags are content keys, so reruns find them).
struct Staged {
    /// dash at /bin/sh, perl, /tmp; runs as root.
    perl: String,
    /// The same files with `USER 1000:1000`.
    perl_non_root: String,
    /// perl alone: no /bin/sh.
    no_shell: String,
    /// dash alone: a shell, no perl.
    dash: String,
}

fn staged() -> &'static Staged {
    static STAGED: OnceLock<Staged> = OnceLock::new();
    STAGED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let docker = bollard::Docker::connect_with_local_defaults().unwrap();
            let with_shell = rootfs_tar(true, true);
            let without_shell = rootfs_tar(false, true);
            let shell_only = rootfs_tar(true, false);
            Staged {
                perl: import(&docker, "runner-test/perl", &with_shell, None).await,
                perl_non_root: import(
                    &docker,
                    "runner-test/perl-user",
                    &with_shell,
                    Some("USER 1000:1000"),
                )
                .await,
                no_shell: import(&docker, "runner-test/perl-no-shell", &without_shell, None).await,
                dash: import(&docker, "runner-test/dash", &shell_only, None).await,
            }
        })
    })
}

/// A root filesystem of this machine's perl and dash (as /bin/sh) with every library `ldd` lists.
fn rootfs_tar(with_shell: bool, with_perl: bool) -> Vec<u8> {
    let mut files: Vec<(String, PathBuf)> = vec![];
    if with_perl {
        files.push(("usr/bin/perl".into(), "/usr/bin/perl".into()));
    }
    if with_shell {
        files.push(("bin/sh".into(), "/bin/dash".into()));
    }
    let mut libraries = vec![];
    for (_, program) in &files {
        assert!(
            program.exists(),
            "{} is missing: tools/setup.sh installs dash and perl",
            program.display()
        );
        libraries.extend(runner::image::rootfs::shared_libraries(program));
    }
    libraries.sort();
    libraries.dedup();
    files.extend(
        libraries
            .into_iter()
            .map(|l| (l.to_string_lossy().trim_start_matches('/').to_owned(), l)),
    );
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = |path: &str, mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(mode);
        header.set_size(0);
        header.set_mtime(1);
        tar.append_data(&mut header, path, std::io::empty())
            .unwrap();
    };
    dir("tmp/", 0o1777);
    dir("opt/", 0o755);
    for (target, source) in files {
        let bytes = std::fs::read(std::fs::canonicalize(&source).unwrap()).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o755);
        header.set_size(bytes.len() as u64);
        header.set_mtime(1);
        tar.append_data(&mut header, &target, bytes.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap()
}

/// Imports `rootfs` as `repository:<content hash>` unless that tag exists.
async fn import(
    docker: &bollard::Docker,
    repository: &str,
    rootfs: &[u8],
    change: Option<&str>,
) -> String {
    use futures::StreamExt;
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(rootfs);
    hash.update(change.unwrap_or_default());
    let tag = hex::encode(&hash.finalize()[..8]);
    let reference = format!("{repository}:{tag}");
    if docker.inspect_image(&reference).await.is_ok() {
        return reference;
    }
    let options = bollard::query_parameters::CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(repository.into()),
        tag: Some(tag),
        changes: change.into_iter().map(str::to_owned).collect(),
        ..Default::default()
    };
    let body = http_body_util::Full::new(bytes::Bytes::from(rootfs.to_vec()));
    let mut stream = docker.create_image(
        Some(options),
        Some(http_body_util::Either::Left(body)),
        None,
    );
    while let Some(step) = stream.next().await {
        step.unwrap_or_else(|e| panic!("importing {reference}: {e}"));
    }
    reference
}

/// A data directory with a project whose repository runs perl in its steps.
struct World {
    home: tempfile::TempDir,
    repo: PathBuf,
}

const ACTIONS: &str = r#"{ "actions": {
  "answer": { "run": "a=$(perl -e 'print 6*7') && opschain-properties set --scope project /answer \"$a\" && u=$(perl -e 'print $<') && opschain-properties set --scope environment /uid \"$u\"" },
  "sh": { "run": "echo from the shell" }
} }"#;

impl World {
    fn new() -> World {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("repo");
        std::fs::create_dir_all(repo.join(".opschain")).unwrap();
        std::fs::write(repo.join(".opschain/actions.json"), ACTIONS).unwrap();
        support::git(&repo, &["init", "-q", "-b", "main"]);
        support::git(&repo, &["add", "-A"]);
        support::git(&repo, &["commit", "-q", "-m", "perl project"]);
        let world = World { home, repo };
        world.ok(&[
            "project",
            "create",
            "--code",
            "perl",
            "--name",
            "Perl",
            "--git-remote",
            world.repo.to_str().unwrap(),
        ]);
        world.ok(&[
            "environment",
            "create",
            "--project",
            "perl",
            "--code",
            "dev",
            "--name",
            "Dev",
        ]);
        world
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(args).env("RUNNER_HOME", self.home.path());
        cmd
    }

    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(args);
        assert!(ok, "runner {args:?} failed:\n{stdout}\n{stderr}");
        stdout
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// `runner image build-base --from FROM --tag TAG`: (success, stdout, stderr).
    fn build_base(&self, from: &str, tag: &str) -> (bool, String, String) {
        support::static_agent();
        self.run(&["image", "build-base", "--from", from, "--tag", tag])
    }

    /// Runs `action` on `dev` with `base` as the operator's default base image.
    fn change(&self, action: &str, base: &str) -> (bool, String, String) {
        self.change_with(action, Some(base))
    }

    /// Runs `action` on `dev`; `base`, if given, is the operator's default base image (`RUNNER_BASE_IMAGE`).
    fn change_with(&self, action: &str, base: Option<&str>) -> (bool, String, String) {
        let mut command = self.command(&[
            "change",
            "create",
            "--project",
            "perl",
            "--environment",
            "dev",
            "--git-rev",
            "main",
            "--action",
            action,
        ]);
        match base {
            Some(base) => command.env("RUNNER_BASE_IMAGE", base),
            None => command.env_remove("RUNNER_BASE_IMAGE"),
        };
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The step image (its content-keyed reference) the last change's step ran in.
fn last_step_image(world: &World) -> String {
    let changes = world.json(&["change", "list"]);
    let id = changes[0]["id"].as_str().unwrap().to_owned();
    let change = world.json(&["change", "show", &id]);
    change["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s["image_id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("a step with an image: {change}"))
}

fn image_labels(reference: &str) -> serde_json::Value {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            reference,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn image_id(reference: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A tag for a base built in this test run from `source` (content-named, so reruns reuse it).
fn base_tag(name: &str, source: &str) -> String {
    format!(
        "runner-test/base-{name}:{}",
        source.rsplit(':').next().unwrap()
    )
}

#[test]
fn a_base_built_from_a_perl_image_runs_a_perl_step_that_patches_properties() {
    if !support::docker_available() {
        return;
    }
    let staged = staged();
    let world = World::new();
    let tag = base_tag("perl", &staged.perl);
    let (ok, first, stderr) = world.build_base(&staged.perl, &tag);
    assert!(ok, "{stderr}");
    assert!(first.trim().starts_with("sha256:"), "{first}");
    let (ok, second, stderr) = world.build_base(&staged.perl, &tag);
    assert!(ok, "{stderr}");
    assert_eq!(second, first, "same inputs, same image");
    assert!(stderr.contains("up to date"), "{stderr}");

    let labels = image_labels(&tag);
    assert_eq!(labels["runner.base.from"], staged.perl.as_str());
    assert_eq!(
        labels["runner.base.from-id"],
        image_id(&staged.perl).unwrap().as_str(),
        "the source is recorded by its image ID"
    );
    assert_eq!(labels["runner.base.user"], "0:0");

    let (ok, stdout, stderr) = world.change("answer", &tag);
    assert!(ok, "{stdout}\n{stderr}");
    let project = world.json(&["project", "show-properties", "--project", "perl"]);
    assert_eq!(project["answer"], 42, "perl ran in the step: {project}");
    let environment = world.json(&[
        "environment",
        "show-properties",
        "--project",
        "perl",
        "--environment",
        "dev",
    ]);
    assert_eq!(environment["uid"], 0);

    let listed = world.json(&["image", "list"]);
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == tag.as_str())
        })
        .unwrap_or_else(|| panic!("{tag} is listed: {listed}"));
    assert_eq!(entry["from"], staged.perl.as_str());
    assert_eq!(entry["id"], first.trim());
    assert!(entry["size_bytes"].as_i64().unwrap() > 0);
    let text = world.ok(&["image", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&tag) && l.contains(&staged.perl)),
        "{text}"
    );
}

#[test]
fn the_agent_works_under_the_non_root_user_of_the_base_image() {
    if !support::docker_available() {
        return;
    }
    let staged = staged();
    let world = World::new();
    let tag = base_tag("perl-user", &staged.perl_non_root);
    let (ok, _, stderr) = world.build_base(&staged.perl_non_root, &tag);
    assert!(ok, "{stderr}");
    assert_eq!(image_labels(&tag)["runner.base.user"], "1000:1000");
    let (ok, stdout, stderr) = world.change("answer", &tag);
    assert!(ok, "{stdout}\n{stderr}");
    let environment = world.json(&[
        "environment",
        "show-properties",
        "--project",
        "perl",
        "--environment",
        "dev",
    ]);
    assert_eq!(
        environment["uid"], 1000,
        "the action ran as the image's user"
    );
    let project = world.json(&["project", "show-properties", "--project", "perl"]);
    assert_eq!(project["answer"], 42);
}

#[test]
fn a_base_image_without_a_shell_is_refused_before_anything_is_built() {
    if !support::docker_available() {
        return;
    }
    let staged = staged();
    let world = World::new();
    let tag = base_tag("no-shell", &staged.no_shell);
    let (ok, _, stderr) = world.build_base(&staged.no_shell, &tag);
    assert!(!ok);
    assert!(
        stderr.contains("has no usable POSIX shell at /bin/sh")
            && stderr.contains(&staged.no_shell),
        "{stderr}"
    );
    assert_eq!(image_id(&tag), None, "nothing was built");
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=runner.store={}", store_id(world.home.path())),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "the probe container is removed"
    );
}

/// The id a data directory labels its containers with (as the store computes it).
fn store_id(home: &Path) -> String {
    use sha2::Digest;
    let canonical = std::fs::canonicalize(home).unwrap();
    hex::encode(&sha2::Sha256::digest(canonical.to_string_lossy().as_bytes())[..8])
}

#[test]
fn a_missing_source_image_is_named_with_how_to_get_it() {
    if !support::docker_available() {
        return;
    }
    let world = World::new();
    // (case, --from, --tag, what stderr says)
    let cases = [
        (
            "a source image that is not there",
            "runner-test/does-not-exist:1",
            "runner-test/never:1",
            &[
                "\"runner-test/does-not-exist:1\" is not in the Docker Engine",
                "docker pull",
                "docker import",
            ][..],
        ),
        (
            "a tag that is not a tag",
            "runner-test/does-not-exist:1",
            "Not A Tag",
            &["invalid --tag \"Not A Tag\""][..],
        ),
    ];
    let cases = cases.map(|(case, from, tag, needles)| (case, (from, tag, needles)));
    support::each_case(cases, |(from, tag, needles)| {
        let (ok, _, stderr) = world.build_base(from, tag);
        assert!(!ok, "refused");
        for needle in needles {
            assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
        }
    });
}

#[test]
fn a_project_setting_switches_its_steps_base_and_their_content_key() {
    if !support::docker_available() {
        return;
    }
    let staged = staged();
    let world = World::new();
    let tag = base_tag("perl", &staged.perl);
    let (ok, _, stderr) = world.build_base(&staged.perl, &tag);
    assert!(ok, "{stderr}");
    // The operator's default here: a base of this test's own (a shell, no perl), so nothing else moves it.
    let operator = base_tag("dash", &staged.dash);
    let (ok, _, stderr) = world.build_base(&staged.dash, &operator);
    assert!(ok, "{stderr}");
    let change = |action: &str| world.change_with(action, Some(&operator));
    std::fs::write(
        world.home.path().join("policy.toml"),
        format!("[[grant]]\nproject = \"perl\"\nbase_images = [\"{tag}\"]\n"),
    )
    .unwrap();
    let show = || {
        world.json(&[
            "environment",
            "show-base-image",
            "--project",
            "perl",
            "--environment",
            "dev",
        ])
    };
    assert_eq!(show()["source"], "operator");

    // The operator's base: a shell step runs, perl is not there.
    let (ok, stdout, stderr) = change("sh");
    assert!(ok, "{stdout}{stderr}");
    let on_default = last_step_image(&world);
    let (ok, _, _) = change("answer");
    assert!(!ok, "the default base has no perl");

    let set = world.ok(&[
        "project",
        "set-base-image",
        "--project",
        "perl",
        "--image",
        &tag,
    ]);
    assert_eq!(set.trim(), format!("{tag} (set on the project)"));
    assert_eq!(show()["image"], tag.as_str());
    assert_eq!(show()["source"], "project");
    let (ok, stdout, stderr) = change("sh");
    assert!(ok, "{stdout}{stderr}");
    let on_perl = last_step_image(&world);
    assert_ne!(
        on_perl, on_default,
        "same commit and action, another base: another content key"
    );
    let (ok, stdout, stderr) = change("answer");
    assert!(ok, "the project's base has perl: {stdout}{stderr}");
    let project = world.json(&["project", "show-properties", "--project", "perl"]);
    assert_eq!(project["answer"], 42);

    // The environment's own setting wins; clearing it gives the project's back.
    let default = operator.clone();
    world.ok(&[
        "environment",
        "set-base-image",
        "--project",
        "perl",
        "--environment",
        "dev",
        "--image",
        &default,
    ]);
    assert_eq!(show()["source"], "environment");
    world.ok(&[
        "environment",
        "set-base-image",
        "--project",
        "perl",
        "--environment",
        "dev",
        "--clear",
    ]);
    assert_eq!(show()["image"], tag.as_str());

    // Cleared at the project too: back to the operator's default and to the very same step image.
    world.ok(&["project", "set-base-image", "--project", "perl", "--clear"]);
    let (ok, stdout, stderr) = change("sh");
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(last_step_image(&world), on_default);
}

#[test]
fn a_base_image_the_policy_does_not_grant_fails_the_change_naming_the_setting() {
    if !support::docker_available() {
        return;
    }
    let world = World::new();
    world.ok(&[
        "project",
        "set-base-image",
        "--project",
        "perl",
        "--image",
        "runner-test/not-granted:1",
    ]);
    let (ok, stdout, stderr) = world.change_with("sh", None);
    assert!(!ok);
    let text = format!("{stdout}{stderr}");
    assert!(
        text.contains("base image \"runner-test/not-granted:1\"")
            && text.contains("base_images = [\"runner-test/not-granted:1\"]"),
        "{text}"
    );
}

#[test]
fn base_image_settings_are_checked_and_only_admins_set_them() {
    let world = World::new();
    let set = |extra: &[&'static str]| {
        let mut args = vec!["project", "set-base-image"];
        args.extend_from_slice(extra);
        args
    };
    // (case, arguments, what stderr says)
    let cases = [
        (
            "an image that is not an image reference",
            set(&["--project", "perl", "--image", "Not An Image"]),
            "invalid base image \"Not An Image\"",
        ),
        (
            "a project that does not exist",
            set(&["--project", "nope", "--image", "a:1"]),
            "\"nope\" does not exist",
        ),
        (
            "neither --image nor --clear",
            set(&["--project", "perl"]),
            "--image",
        ),
    ];
    let cases = cases.map(|(case, args, needle)| (case, (args, needle)));
    support::each_case(cases, |(args, needle)| {
        let (ok, _, stderr) = world.run(&args);
        assert!(!ok, "refused");
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    });
}

#[test]
fn cache_prune_offers_a_base_image_only_once_no_setting_names_it() {
    if !support::docker_available() {
        return;
    }
    let staged = staged();
    let world = World::new();
    let tag = base_tag("prune", &staged.dash);
    let (ok, _, stderr) = world.build_base(&staged.dash, &tag);
    assert!(ok, "{stderr}");
    let offered = || {
        let report = world.json(&["cache", "prune", "--dry-run"]);
        report["removed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "base-image" && p["what"] == tag.as_str())
    };
    world.ok(&[
        "project",
        "set-base-image",
        "--project",
        "perl",
        "--image",
        &tag,
    ]);
    assert!(!offered(), "the project's base image is kept");
    world.ok(&["project", "set-base-image", "--project", "perl", "--clear"]);
    assert!(offered(), "an unused base image is offered to prune");
    assert!(
        image_id(&tag).is_some(),
        "a dry run removes nothing from the daemon"
    );
}
