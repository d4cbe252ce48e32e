//! Step images on the real daemon: default and custom Dockerfiles, build args, repo.tar's .git inside the image,
//! build secrets kept out of every layer, and the cache.

mod support;

use futures::StreamExt;
use serde_json::Value;
use support::Demo;

async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The image of the change's first step that ran a container.
fn step_image(demo: &Demo) -> (String, bool) {
    let change = demo.json(&["change", "show", &demo.last_change()]);
    let step = change["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| !s["image_id"].is_null())
        .expect("a step with an image")
        .clone();
    (
        step["image_id"].as_str().unwrap().to_owned(),
        step["image_cached"].as_bool().unwrap(),
    )
}

/// The build events of the last change as `{vertex, status}`, read from its log as `show-logs` renders them
/// (`[ACTION] build: VERTEX STATUS`).
fn build_events(demo: &Demo) -> Vec<Value> {
    demo.ok(&["change", "show-logs", &demo.last_change()])
        .lines()
        .filter_map(|l| l.split_once("] build: ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.rsplit_once(' '))
        .map(|(vertex, status)| serde_json::json!({"vertex": vertex, "status": status}))
        .collect()
}

#[test]
fn custom_dockerfile_build_args_and_git_inside_the_image() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let sha = support::git(&demo.repo, &["rev-parse", "HEAD"]);
    let (ok, stdout, stderr) = demo.change("dev", "show_commit");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("commit {sha}")),
        "git log -1 inside the step prints the change's SHA: {stdout}"
    );
    assert!(stdout.contains("modified tracked files: 0"), "{stdout}");
    assert!(
        stdout.contains("\"environment\"") && stdout.contains("\"code\": \"dev\""),
        "COPY of step_context_env.json: {stdout}"
    );
    let (image, _) = step_image(&demo);
    let history = block_on(async { docker().await.image_history(&image).await.unwrap() });
    let created: Vec<String> = history.iter().map(|h| h.created_by.clone()).collect();
    let all = created.join("\n");
    assert!(
        all.contains(&format!("GIT_SHA={sha}")),
        "build args are visible in the image history: {all}"
    );
    assert!(
        all.contains("GIT_REV=main")
            && all.contains(&format!("OPSCHAIN_VERSION={}", env!("CARGO_PKG_VERSION")))
    );
    assert!(all.contains("build-info.txt"), "the custom RUN: {all}");
}

#[test]
fn default_dockerfile_when_the_repository_has_none() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    support::git(&demo.repo, &["rm", "-q", ".opschain/Dockerfile"]);
    support::git(
        &demo.repo,
        &["commit", "-q", "-m", "use the default Dockerfile"],
    );
    let sha = support::git(&demo.repo, &["rev-parse", "HEAD"]);
    let (ok, stdout, stderr) = demo.change("dev", "noop");
    assert!(ok, "{stdout}\n{stderr}");
    let (image, _) = step_image(&demo);
    let history = block_on(async { docker().await.image_history(&image).await.unwrap() });
    let all: Vec<String> = history.iter().map(|h| h.created_by.clone()).collect();
    let all = all.join("\n");
    assert!(
        all.contains("ADD repo.tar /opt/opschain/") && all.contains("COPY step_context_env.json"),
        "{all}"
    );
    assert!(
        !all.contains("build-info"),
        "not the repository's Dockerfile: {all}"
    );
    // No RUN in the default Dockerfile, so the args are not in its history: the step shows the commit instead.
    let (ok, stdout, _) = demo.change("dev", "gated");
    assert!(!ok);
    assert!(
        stdout.contains(&format!("running commit {sha}")),
        "{stdout}"
    );
}

#[test]
fn build_secret_canary_is_in_no_decompressed_layer_history_or_config() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let canary = "build-canary-5e0c9a";
    demo.ok(&[
        "secret",
        "set",
        "opschain-build-env",
        &format!("BUILD_TOKEN={canary}"),
    ]);
    // A property change makes a fresh image (step_context_env.json differs), so the RUN with the secret runs.
    let props = demo.home.path().join("p.json");
    std::fs::write(
        &props,
        format!(
            r#"{{"opschain": {{"env": {{"UNIQUE": "{}"}}}}}}"#,
            uuid_like()
        ),
    )
    .unwrap();
    demo.ok(&[
        "environment",
        "set-properties",
        "--project",
        "demo",
        "--environment",
        "dev",
        "--file",
        props.to_str().unwrap(),
    ]);
    let (ok, stdout, stderr) = demo.change("dev", "build");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("build secrets: present"),
        "the RUN saw the secret: {stdout}"
    );
    let (image, cached) = step_image(&demo);
    assert!(!cached);
    let (saved, history, inspect) = block_on(async {
        let docker = docker().await;
        let mut saved = Vec::new();
        let mut export = docker.export_image(&image);
        while let Some(chunk) = export.next().await {
            saved.extend_from_slice(&chunk.unwrap());
        }
        let history = serde_json::to_string(&docker.image_history(&image).await.unwrap()).unwrap();
        let inspect = serde_json::to_string(&docker.inspect_image(&image).await.unwrap()).unwrap();
        (saved, history, inspect)
    });
    let files = layer_files(&saved);
    // The scan reads what the layers hold: the file the RUN with the secret wrote is there, decompressed.
    assert!(
        files.iter().any(
            |(_, path, bytes)| path.ends_with("opt/opschain/build-secrets.txt")
                && bytes.starts_with(b"build secrets: present")
        ),
        "the layers hold the RUN's output file: {:?}",
        files
            .iter()
            .map(|(l, p, _)| format!("{l}:{p}"))
            .collect::<Vec<_>>()
    );
    let needle = canary.as_bytes();
    for (layer, path, bytes) in &files {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the secret is in {path} of layer {layer}"
        );
    }
    assert!(!history.contains(canary));
    assert!(!inspect.contains(canary));
    let logs = demo.ok(&["change", "show-logs", &demo.last_change()]);
    assert!(!logs.contains(canary));
}

/// Every file of every layer of a `docker save` archive, decompressed: (layer, path, bytes). A layer compressed
/// in a way this cannot read fails the test rather than being skipped.
fn layer_files(saved: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    use std::io::Read;
    let mut files = vec![];
    let mut layers = 0;
    let mut outer = tar::Archive::new(saved);
    for entry in outer.entries().unwrap() {
        let mut entry = entry.unwrap();
        let layer = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = vec![];
        entry.read_to_end(&mut bytes).unwrap();
        let tar_bytes = match bytes.get(..4) {
            Some([0x1f, 0x8b, ..]) => {
                let mut plain = vec![];
                flate2::read::GzDecoder::new(bytes.as_slice())
                    .read_to_end(&mut plain)
                    .unwrap();
                plain
            }
            Some([0x28, 0xb5, 0x2f, 0xfd]) => panic!("{layer} is zstd-compressed: cannot scan it"),
            _ if bytes.get(257..262) == Some(b"ustar") => bytes,
            _ => continue, // the manifest, configs, and other JSON of the archive
        };
        layers += 1;
        let mut inner = tar::Archive::new(tar_bytes.as_slice());
        for file in inner.entries().unwrap() {
            let mut file = file.unwrap();
            let path = file.path().unwrap().to_string_lossy().into_owned();
            let mut content = vec![];
            file.read_to_end(&mut content).unwrap();
            files.push((layer.clone(), path, content));
        }
    }
    assert!(layers > 0, "the saved image holds no layer");
    files
}

fn uuid_like() -> String {
    format!("{:?}", std::time::SystemTime::now())
}

#[test]
fn second_build_of_the_same_step_is_a_cache_hit() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, _, stderr) = demo.change("dev", "noop");
    assert!(ok, "{stderr}");
    let (first, _) = step_image(&demo);
    // Same SHA, same properties: the content key matches and nothing is built at all.
    let (ok, _, stderr) = demo.change("dev", "noop");
    assert!(ok, "{stderr}");
    let (second, cached) = step_image(&demo);
    assert_eq!(second, first);
    assert!(cached, "the step image is reused by its content key");
    assert!(build_events(&demo).is_empty(), "no build ran");
    // Without the tag, BuildKit builds again but every step comes from its cache.
    block_on(async {
        docker()
            .await
            .remove_image(
                &first,
                Some(bollard::query_parameters::RemoveImageOptions {
                    force: true,
                    ..Default::default()
                }),
                None,
            )
            .await
            .unwrap()
    });
    let (ok, _, stderr) = demo.change("dev", "noop");
    assert!(ok, "{stderr}");
    let (_, cached) = step_image(&demo);
    assert!(!cached);
    let events = build_events(&demo);
    let steps: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["vertex"].as_str().unwrap().starts_with('[')
                && !e["vertex"].as_str().unwrap().starts_with("[internal]")
                && e["status"] != "started"
        })
        .collect();
    assert!(!steps.is_empty(), "{events:?}");
    assert!(
        steps
            .iter()
            .filter(|e| !e["vertex"].as_str().unwrap().contains("FROM"))
            .all(|e| e["status"] == "cached"),
        "{steps:?}"
    );
}
