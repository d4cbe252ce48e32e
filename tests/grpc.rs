//! A real tonic client against `grpc::run` on loopback. Steps run on the fake executor here; the container paths
//! are covered by the end-to-end tests.

#[path = "support/grpc_server.rs"]
mod grpc_server;
mod support;

use grpc_server::{fake_orchestrator, Options, Server};
use runner::app::App;
use runner::grpc::pb::change_event::Event as E;
use runner::grpc::pb::project_service_client::ProjectServiceClient;
use runner::grpc::pb::{self, Scope};
use runner::grpc::{run, ServerConfig};
use runner::orchestrator::Orchestrator;
use serde_json::json;
use std::time::Duration;
use support::fakes::Script;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "s3cr3t-token";

async fn start(scripts: Vec<(&str, Script)>) -> Server {
    start_with_grace(scripts, Duration::from_secs(5)).await
}

async fn start_with_grace(scripts: Vec<(&str, Script)>, grace: Duration) -> Server {
    Options::new(json!({"actions": {
        "deploy": {"steps": ["a", "b"]}, "a": {"run": "a"}, "b": {"run": "b"}, "slow": {"run": "slow"}
    }}))
    .token(TOKEN)
    .grace(grace)
    .scripts(scripts)
    .start()
    .await
}

impl Server {
    async fn watch(&self, id: &str) -> Vec<pb::ChangeEvent> {
        let mut stream = self
            .changes()
            .watch_change(self.authed(pb::WatchChangeRequest {
                id: id.into(),
                after_seq: 0,
                history_only: false,
            }))
            .await
            .unwrap()
            .into_inner();
        let mut events = vec![];
        while let Some(event) = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("stream stalled")
            .unwrap()
        {
            events.push(event);
        }
        events
    }
}

fn change_states(events: &[pb::ChangeEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(E::ChangeState(s)) => Some(s.state().as_str_name().to_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn create_watch_success_in_order_and_late_watchers_get_the_history() {
    let server = start(vec![(
        "a",
        Script {
            output: vec!["from a".into()],
            ..Default::default()
        },
    )])
    .await;
    let change = server.create_change("deploy").await.unwrap();
    assert_eq!(change.git_sha, "sha-main");
    let events = server.watch(&change.id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as i64).collect::<Vec<_>>(),
        "in order, none lost or repeated"
    );
    assert_eq!(
        change_states(&events),
        [
            "CHANGE_STATE_PENDING",
            "CHANGE_STATE_QUEUED",
            "CHANGE_STATE_RUNNING",
            "CHANGE_STATE_SUCCESS"
        ]
    );
    assert!(events
        .iter()
        .any(|e| matches!(&e.event, Some(E::Log(l)) if l.line == "from a")));
    let step_states: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(E::StepState(s)) => Some((s.action.clone(), s.state().as_str_name().to_owned())),
            _ => None,
        })
        .collect();
    assert_eq!(
        step_states.first().unwrap(),
        &("deploy".to_string(), "STEP_STATE_RUNNING".to_string())
    );
    assert_eq!(
        step_states.last().unwrap(),
        &("deploy".to_string(), "STEP_STATE_SUCCESS".to_string())
    );
    // A watcher that connects after the end receives exactly the same history.
    let late = server.watch(&change.id).await;
    assert_eq!(late, events);
    let detail = server
        .changes()
        .get_change(server.authed(pb::GetChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detail.change.unwrap().state(), pb::ChangeState::Success);
    assert_eq!(detail.steps.len(), 3);
    let list = server
        .changes()
        .list_changes(server.authed(pb::ListChangesRequest {
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.changes.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn cancel_over_grpc_stops_a_running_change() {
    let server = start(vec![("slow", Script::sleeping(Duration::from_secs(30)))]).await;
    let change = server.create_change("slow").await.unwrap();
    let watcher = {
        let mut client = server.changes();
        let request = server.authed(pb::WatchChangeRequest {
            id: change.id.clone(),
            after_seq: 0,
            history_only: false,
        });
        tokio::spawn(async move {
            let mut stream = client.watch_change(request).await.unwrap().into_inner();
            let mut events = vec![];
            while let Some(e) = stream.message().await.unwrap() {
                events.push(e);
            }
            events
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server
        .changes()
        .cancel_change(server.authed(pb::CancelChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        change_states(&events).last().unwrap(),
        "CHANGE_STATE_CANCELLED"
    );
    server.stop().await;
}

#[tokio::test]
async fn errors_map_to_status_codes() {
    let server = start(vec![]).await;
    let scope = || {
        Some(Scope {
            project: "demo".into(),
            environment: "dev".into(),
        })
    };
    let mut projects = server.projects();
    let set = pb::SetPropertiesRequest {
        scope: scope(),
        document_json: r#"{"a": 1}"#.into(),
        if_version: None,
        ..Default::default()
    };
    assert_eq!(
        projects
            .set_properties(server.authed(set))
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );
    let stale = pb::PatchPropertiesRequest {
        scope: scope(),
        patch_json: r#"[{"op":"add","path":"/b","value":1}]"#.into(),
        if_version: Some(1),
        ..Default::default()
    };
    let err = projects
        .patch_properties(server.authed(stale))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err
        .message()
        .contains("expected version 1, but the current version is 2"));
    let unknown = pb::GetPropertiesRequest {
        scope: Some(Scope {
            project: "nope".into(),
            environment: String::new(),
        }),
        version: 0,
    };
    let err = projects
        .get_properties(server.authed(unknown))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let bad = pb::SetPropertiesRequest {
        scope: scope(),
        document_json: "{".into(),
        if_version: None,
        ..Default::default()
    };
    assert_eq!(
        projects
            .set_properties(server.authed(bad))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let exists = pb::CreateProjectRequest {
        code: "demo".into(),
        name: "x".into(),
        git_remote: String::new(),
        git_credential: String::new(),
        ..Default::default()
    };
    assert_eq!(
        projects
            .create_project(server.authed(exists))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let no_action = pb::CreateChangeRequest {
        project: "demo".into(),
        environment: "dev".into(),
        git_rev: "main".into(),
        action: "zz".into(),
        ..Default::default()
    };
    assert_eq!(
        server
            .changes()
            .create_change(server.authed(no_action))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let err = server
        .changes()
        .watch_change(server.authed(pb::WatchChangeRequest {
            id: "nope".into(),
            after_seq: 0,
            history_only: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn token_is_required_except_for_health_and_health_flips_to_serving() {
    let server = start(vec![]).await;
    let err = server
        .projects()
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = Request::new(pb::ListProjectsRequest::default());
    wrong
        .metadata_mut()
        .insert("authorization", MetadataValue::from_static("Bearer wrong"));
    assert_eq!(
        server
            .projects()
            .list_projects(wrong)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        server
            .projects()
            .list_projects(server.authed(pb::ListProjectsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .projects
            .len(),
        1
    );

    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    let mut serving = false;
    for _ in 0..50 {
        let check = tonic_health::pb::HealthCheckRequest {
            service: "runner.v1.ChangeService".into(),
        };
        if health.check(check).await.unwrap().into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "health never reported SERVING");
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let server = start(vec![]).await;
    let mut client = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(server.authed(tokio_stream::iter([request])))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "runner.v1.ProjectService",
        "runner.v1.ChangeService",
        "runner.v1.StepRunnerService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected.to_string()), "{names:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn refuses_a_public_address_without_a_token() {
    let home = tempfile::tempdir().unwrap();
    let app = App::open(home.path()).await.unwrap();
    let orchestrator = bare_orchestrator(app);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = run(listener, orchestrator, ServerConfig::default(), async {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("refusing to listen on 0.0.0.0"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_serves_trusting_clients_only() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    let home = tempfile::tempdir().unwrap();
    let app = App::open(home.path()).await.unwrap();
    app.create_project("tls", "TLS", None).await.unwrap();
    let orchestrator = bare_orchestrator(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServerConfig {
        tls: Some(runner::grpc::TlsIdentity {
            cert_pem: cert_pem.clone().into_bytes(),
            key_pem: key_pem.into_bytes(),
        }),
        ..Default::default()
    };
    let handle = tokio::spawn(run(listener, orchestrator, config, async {
        let _ = stopped.await;
    }));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let projects = ProjectServiceClient::new(channel)
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(projects.projects[0].code, "tls");
    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    assert!(ProjectServiceClient::new(plain)
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .is_err());
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bad_tls_identity_is_refused_at_start() {
    let home = tempfile::tempdir().unwrap();
    let orchestrator = bare_orchestrator(App::open(home.path()).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ServerConfig {
        tls: Some(runner::grpc::TlsIdentity {
            cert_pem: b"not a certificate".to_vec(),
            key_pem: b"nor a key".to_vec(),
        }),
        ..Default::default()
    };
    let err = run(listener, orchestrator, config, async {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid TLS certificate or key"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_lets_running_changes_finish_within_the_grace_period() {
    let slow = Script::sleeping(Duration::from_millis(500));
    let server = start(vec![("slow", slow)]).await;
    let change = server.create_change("slow").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let home = server.stop().await;
    let app = App::open(home.path()).await.unwrap();
    assert_eq!(
        app.store.change(&change.id).await.unwrap().state,
        runner::events::ChangeState::Success
    );
}

#[tokio::test]
async fn shutdown_cancels_what_outlives_the_grace_period() {
    let endless = Script::sleeping(Duration::from_secs(60));
    let server = start_with_grace(vec![("slow", endless)], Duration::from_millis(200)).await;
    let change = server.create_change("slow").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let home = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("shutdown does not wait past the grace period");
    let app = App::open(home.path()).await.unwrap();
    assert_eq!(
        app.store.change(&change.id).await.unwrap().state,
        runner::events::ChangeState::Cancelled
    );
}

/// An orchestrator with no actions, for tests of the server itself.
fn bare_orchestrator(app: App) -> Orchestrator {
    fake_orchestrator(app, json!({"actions": {}}), Default::default())
}

#[tokio::test]
async fn a_ten_megabyte_line_reaches_a_watcher_whole_in_pieces_under_the_message_limit() {
    let line: String = (0..10 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let server = start(vec![(
        "a",
        Script {
            output: vec![line.clone()],
            ..Default::default()
        },
    )])
    .await;
    let change = server.create_change("a").await.unwrap();
    // Default tonic clients refuse any message over 4 MiB: receiving at all proves every piece fits.
    let events = server.watch(&change.id).await;
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(E::Log(l)) => Some(l.line.as_str()),
            _ => None,
        })
        .collect();
    assert!(pieces.len() >= 10, "split into pieces: {}", pieces.len());
    assert!(pieces.iter().all(|p| p.len() <= 1024 * 1024 + 64));
    let marker = runner::logs::LINE_CONTINUES;
    let joined: String = pieces
        .iter()
        .map(|p| p.strip_suffix(marker).unwrap_or(p))
        .collect();
    assert_eq!(joined.len(), line.len(), "nothing lost");
    assert!(joined == line, "the pieces put back together are the line");
    server.stop().await;
}
