//! The gRPC API with the real runtime: `RunStep` builds and runs a real container.

mod support;

use runner::grpc::pb::{
    self, run_step_event::Event as R, step_runner_service_client::StepRunnerServiceClient,
};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_step_returns_the_step_result_of_a_real_container_run() {
    if !support::docker_available() {
        return;
    }
    let demo = support::Demo::new();
    // The demo repository is a path on this machine: the operator allows such remotes for RunStep.
    demo.set_policy("[run_step]\nallow_file_remotes = true\n");
    let sha = support::git(&demo.repo, &["rev-parse", "HEAD"]);
    let app = runner::app::App::open(demo.home.path()).await.unwrap();
    let orchestrator = runner::runtime::local(app).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(runner::grpc::run(
        listener,
        orchestrator,
        Default::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut client = StepRunnerServiceClient::new(channel);
    let step_context = json!({
        "context": {"project": {"code": "sched", "name": "Scheduler project"}, "environment": {"code": "dev", "name": "Dev"},
                    "change": {"id": "external-1"}, "step": {"id": "external-step-1", "action": "release"}},
        "project": {"properties": {"owner": "scheduler"}},
        "environment": {"properties": {"app": {"replicas": 3}}}
    });
    let request = pb::RunStepRequest {
        git_remote: demo.repo.to_string_lossy().into_owned(),
        git_rev: "main".into(),
        action: "release".into(),
        step_context_json: step_context.to_string(),
    };
    let mut stream = client.run_step(request).await.unwrap().into_inner();
    let mut events = vec![];
    while let Some(event) = tokio::time::timeout(Duration::from_secs(120), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        events.push(event.event.unwrap());
    }
    let Some(R::Result(result)) = events.last() else {
        panic!("no result: {events:?}")
    };
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.git_sha, sha);
    let step_result: Value = serde_json::from_str(&result.step_result_json).unwrap();
    assert_eq!(
        step_result["environment"]["properties_diff"],
        json!([{"op": "add", "path": "/release", "value": {"version": "1.0.0"}}])
    );
    assert_eq!(
        step_result["project"]["properties_diff"],
        json!([{"op": "add", "path": "/last_release", "value": "dev"}])
    );
    assert_eq!(step_result["step"]["properties"]["app"]["replicas"], 3);
    assert!(events
        .iter()
        .any(|e| matches!(e, R::Log(l) if l.line == "released" && l.step_id == "external-step-1")));
    assert!(events
        .iter()
        .any(|e| matches!(e, R::Phase(p) if p.phase == "run_finished")));
    // Patches are the caller's: nothing was stored for this repository.
    let store = runner::app::App::open(demo.home.path())
        .await
        .unwrap()
        .store;
    assert_eq!(
        store.list_changes(&Default::default()).await.unwrap().len(),
        0
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
