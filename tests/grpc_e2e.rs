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
        ..Default::default()
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
        .any(|e| matches!(e, R::Phase(p) if p.phase() == pb::Phase::RunFinished)));
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

/// A Docker socket the test switches on and off: while up it relays every connection to the real daemon; down, its
/// socket file is gone and every relayed connection is cut, as when dockerd stops.
struct DaemonSwitch {
    path: std::path::PathBuf,
    up: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<Vec<std::os::unix::net::UnixStream>>,
    )>,
}

impl DaemonSwitch {
    fn new(path: std::path::PathBuf) -> DaemonSwitch {
        DaemonSwitch { path, up: None }
    }

    fn up(&mut self) {
        use std::os::unix::net::{UnixListener, UnixStream};
        let listener = UnixListener::bind(&self.path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let daemon = support::docker_socket();
        let relay = std::thread::spawn(move || {
            let mut open = vec![];
            while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = UnixStream::connect(&daemon).unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
                open.extend([client, server]);
            }
            open
        });
        self.up = Some((stop, relay));
    }

    fn down(&mut self) {
        let (stop, relay) = self.up.take().expect("the switch is up");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in relay.join().unwrap() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        std::fs::remove_file(&self.path).unwrap();
    }
}

/// Polls health until it says `want`; returns how long that took.
async fn health_becomes(address: &str, want: i32, within: Duration) -> Duration {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let start = std::time::Instant::now();
    let mut last = None;
    while start.elapsed() < within {
        if let Ok(channel) = tonic::transport::Channel::from_shared(address.to_owned())
            .unwrap()
            .connect()
            .await
        {
            let check = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            last = Some(check.map(|c| c.into_inner().status));
            if matches!(last, Some(Ok(status)) if status == want) {
                return start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("health never became {want} within {within:?}; last answer {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_without_docker_and_health_follows_the_daemon() {
    use tonic_health::pb::health_check_response::ServingStatus;
    if !support::docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = DaemonSwitch::new(dir.path().join("docker.sock"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUNNER_HOME", dir.path().join("home"))
        .env("DOCKER_HOST", format!("unix://{}", daemon.path.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    let (serving, not_serving) = (
        ServingStatus::Serving as i32,
        ServingStatus::NotServing as i32,
    );

    // No daemon: the server is up all the same, and says it cannot serve.
    health_becomes(&address, not_serving, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    health_becomes(&address, not_serving, Duration::from_millis(1)).await;

    daemon.up();
    health_becomes(&address, serving, Duration::from_secs(15)).await;
    daemon.down();
    health_becomes(&address, not_serving, Duration::from_secs(15)).await;
    daemon.up();
    health_becomes(&address, serving, Duration::from_secs(15)).await;

    server.start_kill().unwrap();
    let _ = server.wait().await;
    daemon.down();
}
