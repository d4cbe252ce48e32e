//! The secret canary: a runner secret, a build secret and a multi-line PEM-like secret, used by a real change and a
//! real RunStep on the real daemon, are absent from everything the runner leaves or answers — image layers (as
//! saved, uncompressed), `docker history`, container inspect, `runner.db` (raw bytes), stored and streamed logs,
//! every gRPC response and stream, stored reasons — while the step that prints them shows `***`.

mod support;

use runner::grpc::pb::change_service_client::ChangeServiceClient;
use runner::grpc::pb::step_runner_service_client::StepRunnerServiceClient;
use runner::grpc::pb::{self, run_step_event::Event as R};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

const TOKEN: &str = "canary-api-token";
const RUNNER_CANARY: &str = "runner-canary-4d8e1b";
const BUILD_CANARY: &str = "build-canary-a63f70";
/// The lines of the PEM-like secret that are secret (its armour lines are not).
const PEM_BODY: [&str; 3] = [
    "MIIEcanaryQ2FuYXJ5IGtleSBsaW5lIG9uZQ",
    "Q2FuYXJ5IGtleSBsaW5lIHR3byBwZW1wZW0",
    "Q2FuYXJ5IGtleSBsaW5lIHRocmVlIDk5OQ",
];

fn pem() -> String {
    format!(
        "-----BEGIN CANARY PRIVATE KEY-----\n{}\n-----END CANARY PRIVATE KEY-----",
        PEM_BODY.join("\n")
    )
}

fn needles() -> Vec<String> {
    let mut all = vec![RUNNER_CANARY.to_owned(), BUILD_CANARY.to_owned(), pem()];
    all.extend(PEM_BODY.iter().map(|l| l.to_string()));
    all
}

/// Fails naming `what` if any canary is in `bytes`.
fn assert_absent(what: &str, bytes: &[u8]) {
    for needle in needles() {
        let n = needle.as_bytes();
        assert!(
            !bytes.windows(n.len()).any(|w| w == n),
            "{what} holds the secret {needle:?}"
        );
    }
}

async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

/// Adds the canary action and a build step that prints the build secret, committed to the demo repository.
fn commit_canary(demo: &support::Demo) {
    let manifest_path = demo.repo.join(".opschain/actions.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["actions"]["canary"] = json!({
        "description": "Prints every secret it has, and hands one back in a malformed child list.",
        "run": "echo \"runner $RUNNER_CANARY\"; echo 'pem follows'; printf '%s\\n' \"$PEM_KEY\"; echo 'pem done'; \
                printf '{\"children\":[{\"name\":\"%s\"}]}' \"$RUNNER_CANARY\" > \"$RUNNER_CHILD_STEPS\"; sleep 4"
    });
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let dockerfile = demo.repo.join(".opschain/Dockerfile");
    let mut text = std::fs::read_to_string(&dockerfile).unwrap();
    text.push_str(
        "RUN --mount=type=secret,id=opschain-build-env opschain-exec sh -c 'echo \"build canary $BUILD_TOKEN\"'\n",
    );
    std::fs::write(&dockerfile, text).unwrap();
    support::git(&demo.repo, &["commit", "-qam", "canary"]);
}

fn authed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap(),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secrets_are_absent_from_images_inspect_store_logs_and_the_api() {
    if !support::docker_available() {
        return;
    }
    let demo = support::Demo::new();
    commit_canary(&demo);
    demo.set_policy(
        "[[grant]]\nproject = \"demo\"\nenvironment = \"dev\"\nsecrets = [\"pem\"]\n\n\
         [run_step]\nallow_file_remotes = true\nsecrets = [\"opschain-runner-env\", \"opschain-build-env\", \"pem\"]\n",
    );
    demo.ok(&[
        "secret",
        "set",
        "opschain-runner-env",
        &format!("RUNNER_CANARY={RUNNER_CANARY}"),
    ]);
    demo.ok(&[
        "secret",
        "set",
        "opschain-build-env",
        &format!("BUILD_TOKEN={BUILD_CANARY}"),
    ]);
    demo.ok(&[
        "secret",
        "set",
        "pem",
        &format!("PEM_KEY={}", Value::from(pem())),
    ]);
    let props = demo.home.path().join("canary-props.json");
    let unique = format!("{:?}", std::time::SystemTime::now());
    std::fs::write(
        &props,
        json!({"opschain": {"env:runner_secrets": ["opschain-runner-env", "pem"], "env": {"UNIQUE": unique}}})
            .to_string(),
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

    // The real runtime behind the real server.
    let app = runner::app::App::open(demo.home.path()).await.unwrap();
    let orchestrator = runner::runtime::local(app).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = runner::grpc::ServerConfig {
        token: Some(TOKEN.into()),
        ..Default::default()
    };
    let server = tokio::spawn(runner::grpc::run(listener, orchestrator, config, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut changes = ChangeServiceClient::new(channel.clone());
    // Everything the API answers, as text, to look through at the end.
    let mut answers = String::new();

    let change = changes
        .create_change(authed(pb::CreateChangeRequest {
            project: "demo".into(),
            environment: "dev".into(),
            git_rev: "main".into(),
            action: "canary".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    answers += &format!("{change:?}");
    let watch = {
        let mut changes = changes.clone();
        let id = change.id.clone();
        tokio::spawn(async move {
            let mut stream = changes
                .watch_change(authed(pb::WatchChangeRequest {
                    id,
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            let mut seen = Vec::new();
            while let Some(event) = stream.message().await.unwrap() {
                seen.push(event);
            }
            seen
        })
    };

    // The step container while it runs: its inspect shows no secret (they travel on its stdin).
    let docker = docker().await;
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("runner.change={}", change.id)],
    )]);
    let mut inspected = 0;
    for _ in 0..1200 {
        let containers = docker
            .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .unwrap();
        for c in &containers {
            if let Ok(inspect) = docker
                .inspect_container(c.id.as_deref().unwrap(), None)
                .await
            {
                assert_absent(
                    "docker inspect of a step container",
                    serde_json::to_string(&inspect).unwrap().as_bytes(),
                );
                inspected += 1;
            }
        }
        if inspected > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(inspected > 0, "the step container was never seen");

    let events = tokio::time::timeout(Duration::from_secs(300), watch)
        .await
        .expect("the change ends")
        .unwrap();
    let streamed = format!("{events:?}");
    answers += &streamed;
    let detail = changes
        .get_change(authed(pb::GetChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    answers += &format!("{detail:?}");
    let step = detail
        .steps
        .iter()
        .find(|s| s.action == "canary")
        .expect("the canary step")
        .clone();
    answers += &format!(
        "{:?}",
        changes
            .get_step(authed(pb::GetStepRequest {
                id: step.id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
    );
    answers += &format!(
        "{:?}",
        changes
            .list_changes(authed(pb::ListChangesRequest::default()))
            .await
            .unwrap()
            .into_inner()
    );
    let history = changes
        .watch_change(authed(pb::WatchChangeRequest {
            id: change.id.clone(),
            history_only: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut history = history;
    while let Some(event) = history.message().await.unwrap() {
        answers += &format!("{event:?}");
    }

    // The step printed them: its streamed log shows `***` where they were.
    assert!(streamed.contains("runner ***"), "{streamed}");
    assert!(
        streamed.contains("pem follows") && streamed.contains("pem done"),
        "{streamed}"
    );
    // Its reason (a malformed child list quoting the runner secret) is stored masked.
    assert_eq!(
        detail.change.as_ref().unwrap().state(),
        pb::ChangeState::Error,
        "{detail:?}"
    );
    assert!(step.reason.contains("***"), "{}", step.reason);

    // RunStep of the same action: its stream and result.
    let mut steps = StepRunnerServiceClient::new(channel.clone());
    let context = json!({
        "project": {"properties": {"opschain": {"env:runner_secrets": ["opschain-runner-env", "pem"]}}},
        "environment": {"properties": {"opschain": {"env": {"UNIQUE": unique}}}}
    });
    let mut stream = steps
        .run_step(authed(pb::RunStepRequest {
            git_remote: demo.repo.to_string_lossy().into_owned(),
            git_rev: "main".into(),
            action: "canary".into(),
            step_context_json: context.to_string(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut run_step_events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(300), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        run_step_events.push(event.event.unwrap());
    }
    let run_step_text = format!("{run_step_events:?}");
    assert!(run_step_text.contains("runner ***"), "{run_step_text}");
    let Some(R::Result(result)) = run_step_events.last() else {
        panic!("RunStep gave no result: {run_step_text}")
    };
    assert!(
        result.step_result_json.contains("***"),
        "{}",
        result.step_result_json
    );
    answers += &run_step_text;

    assert_absent("the gRPC answers and streams", answers.as_bytes());

    // The step image: every layer as saved (uncompressed), its history and its config.
    let image = step.image.clone();
    assert!(!image.is_empty(), "{step:?}");
    let mut saved = Vec::new();
    {
        use futures::StreamExt;
        let mut export = docker.export_image(&image);
        while let Some(chunk) = export.next().await {
            saved.extend_from_slice(&chunk.unwrap());
        }
    }
    let mut layers = 0;
    let mut archive = tar::Archive::new(saved.as_slice());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        assert!(
            !bytes.starts_with(&[0x1f, 0x8b]),
            "a compressed layer could hide the secret from this search"
        );
        if entry.path().unwrap().to_string_lossy().ends_with(".tar") {
            layers += 1;
        }
        assert_absent(&format!("image entry {:?}", entry.path().unwrap()), &bytes);
    }
    assert!(layers > 1, "the saved image holds its layers");
    let history = docker.image_history(&image).await.unwrap();
    assert_absent(
        "docker history",
        serde_json::to_string(&history).unwrap().as_bytes(),
    );
    let config = docker.inspect_image(&image).await.unwrap();
    assert_absent(
        "the image config",
        serde_json::to_string(&config).unwrap().as_bytes(),
    );

    // Stored logs, through the CLI.
    let logs = demo.ok(&["change", "show-logs", &change.id]);
    assert!(logs.contains("runner ***"), "{logs}");
    let pem_block = logs
        .split_once("pem follows")
        .and_then(|(_, rest)| rest.split_once("pem done"))
        .map(|(block, _)| block)
        .unwrap_or_else(|| panic!("the PEM block is missing from the log: {logs}"));
    assert!(
        pem_block.contains("***"),
        "the PEM printed shows as ***: {pem_block}"
    );
    assert_absent("runner change show-logs", logs.as_bytes());

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    // The store, byte for byte, including its write-ahead log.
    for file in ["runner.db", "runner.db-wal", "runner.db-shm"] {
        let bytes = std::fs::read(demo.home.path().join(file)).unwrap_or_default();
        assert_absent(file, &bytes);
    }
    let mut logs_dir = Vec::new();
    if let Ok(entries) = std::fs::read_dir(demo.home.path().join("logs")) {
        for entry in entries.flatten() {
            logs_dir.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
    }
    assert_absent("the logs directory", &logs_dir);
}
