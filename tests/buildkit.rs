//! The BuildKit driver against the real daemon.

mod support;

use runner::buildkit::{build, BuildError, BuildProgress, BuildRequest, DockerEndpoint};
use std::collections::BTreeMap;
use std::path::Path;
use tokio_util::sync::CancellationToken;

struct Built {
    result: Result<runner::buildkit::BuiltImage, BuildError>,
    progress: Vec<BuildProgress>,
}

async fn run_build(
    dir: &Path,
    dockerfile: &str,
    tag: &str,
    secrets: BTreeMap<String, Vec<u8>>,
) -> Built {
    std::fs::create_dir_all(dir.join("ctx")).unwrap();
    std::fs::create_dir_all(dir.join("df")).unwrap();
    std::fs::write(dir.join("df/Dockerfile"), dockerfile).unwrap();
    let request = BuildRequest {
        context_dir: dir.join("ctx").into(),
        dockerfile_dir: dir.join("df").into(),
        dockerfile_name: "Dockerfile".into(),
        build_args: BTreeMap::from([("GREETING".into(), "hello".into())]),
        labels: BTreeMap::from([("runner.test".into(), "yes".into())]),
        tags: vec![tag.into()],
        secrets,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let result = build(
        &DockerEndpoint::from_env(),
        request,
        tx,
        CancellationToken::new(),
    )
    .await;
    let mut progress = vec![];
    while let Ok(p) = rx.try_recv() {
        progress.push(p);
    }
    Built { result, progress }
}

async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

async fn remove_image(tag: &str) {
    let _ = docker()
        .await
        .remove_image(
            tag,
            Some(bollard::query_parameters::RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}

#[tokio::test]
async fn builds_from_scratch_and_the_second_build_is_all_cached() {
    if !support::docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ctx")).unwrap();
    std::fs::write(dir.path().join("ctx/hello.txt"), "hi").unwrap();
    let dockerfile =
        "FROM scratch\nARG GREETING\nCOPY hello.txt /hello.txt\nLABEL greeting=${GREETING}\n";
    let tag = "runner-test/buildkit-scratch:1";
    let first = run_build(dir.path(), dockerfile, tag, BTreeMap::new()).await;
    let image = first.result.unwrap();
    assert!(image.image_id.starts_with("sha256:"), "{image:?}");
    let inspect = docker().await.inspect_image(tag).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(image.image_id.as_str()));
    let labels = inspect.config.unwrap().labels.unwrap();
    assert_eq!(labels["greeting"], "hello");
    assert_eq!(labels["runner.test"], "yes");

    let second = run_build(dir.path(), dockerfile, tag, BTreeMap::new()).await;
    assert_eq!(second.result.unwrap(), image);
    let completed: Vec<(String, bool)> = second
        .progress
        .iter()
        .filter_map(|p| match p {
            BuildProgress::VertexCompleted { name, cached, .. } => Some((name.clone(), *cached)),
            _ => None,
        })
        .collect();
    let copy = completed
        .iter()
        .find(|(n, _)| n.contains("COPY"))
        .expect("a COPY vertex");
    assert!(copy.1, "COPY was rebuilt: {completed:?}");
    remove_image(tag).await;
}

#[tokio::test]
async fn errors_say_what_went_wrong() {
    if !support::docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = run_build(
        dir.path(),
        "FROM scratch\nFROBNICATE now\n",
        "runner-test/bad:1",
        BTreeMap::new(),
    )
    .await;
    assert!(
        matches!(bad.result, Err(BuildError::Dockerfile { .. })),
        "{:?}",
        bad.result
    );

    let missing = run_build(
        dir.path(),
        "FROM runner-test/no-such-image:404\n",
        "runner-test/missing:1",
        BTreeMap::new(),
    )
    .await;
    let err = missing.result.unwrap_err();
    assert!(
        matches!(err, BuildError::BaseImageMissing { .. }),
        "{err:?}"
    );

    let request = BuildRequest {
        context_dir: dir.path().into(),
        dockerfile_dir: dir.path().into(),
        dockerfile_name: "Dockerfile".into(),
        ..Default::default()
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = build(
        &DockerEndpoint::unix(dir.path().join("no.sock")),
        request,
        tx,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BuildError::DaemonUnreachable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no.sock"));
}
