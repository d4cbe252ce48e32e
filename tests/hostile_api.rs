//! Hostile and malformed inputs from token holders and from repositories, against a real gRPC server (steps on
//! the fake executor) and the real `runner` binary: each gets a clear error with the right status or exit code,
//! and nothing is applied, leaked or left running.

#[path = "support/grpc_server.rs"]
mod grpc_server;
mod support;

use grpc_server::{fake_orchestrator, Options, Server};
use runner::app::App;
use runner::grpc::pb::{self, run_step_event::Event as R, Scope};
use runner::grpc::{run, ServerConfig};
use runner::secrets::SecretValues;
use serde_json::{json, Value};
use std::time::Duration;
use support::fakes::Script;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Status};

const TOKEN: &str = "hostile-test-token";
/// Secret values the server holds: none may ever appear in an answer.
const DB_PASSWORD: &str = "db-canary-7c41e2";
const CI_TOKEN: &str = "ci-canary-5b9f03";

fn manifest() -> Value {
    json!({"actions": {
        "deploy": {"steps": ["a", "b"]},
        "a": {"run": "a"},
        "b": {"run": "b"},
        "socket": {"run": "docker ps", "docker": "socket"},
        "dind": {"run": "docker ps", "docker": "dind"},
        "privileged": {"run": "x", "services": {"vpn": {"image": "local/vpn:1", "privileged": true}}}
    }})
}

/// A server whose operator wrote `policy`; the secrets `db` and `ci` exist.
async fn start(policy: &str, scripts: Vec<(&str, Script)>) -> Server {
    Options::new(manifest())
        .token(TOKEN)
        .policy(policy)
        .secret("db", "DB_PASSWORD", DB_PASSWORD)
        .secret("ci", "CI_TOKEN", CI_TOKEN)
        .scripts(scripts)
        .start()
        .await
}

fn env_scope() -> Option<Scope> {
    Some(Scope {
        project: "demo".into(),
        environment: "dev".into(),
    })
}

fn project_scope() -> Option<Scope> {
    Some(Scope {
        project: "demo".into(),
        environment: String::new(),
    })
}

impl Server {
    async fn changes_stored(&self) -> usize {
        self.app
            .store
            .list_changes(&runner::store::ChangeFilter {
                project: Some("demo".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .len()
    }

    /// Waits for the change to end; returns it with its steps.
    async fn finished(&self, id: &str) -> pb::ChangeDetail {
        for _ in 0..500 {
            let detail = self
                .changes()
                .get_change(self.authed(pb::GetChangeRequest {
                    id: id.into(),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            let state = detail.change.as_ref().unwrap().state();
            if [
                pb::ChangeState::Success,
                pb::ChangeState::Error,
                pb::ChangeState::Cancelled,
            ]
            .contains(&state)
            {
                return detail;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("change {id} did not end");
    }

    async fn versions(&self) -> (i64, i64) {
        let get = |scope| {
            let mut client = self.projects();
            let request = self.authed(pb::GetPropertiesRequest { scope, version: 0 });
            async move { client.get_properties(request).await.unwrap().into_inner() }
        };
        (
            get(project_scope()).await.version,
            get(env_scope()).await.version,
        )
    }

    async fn set_env_properties(&self, document: Value) -> Result<pb::PropertiesVersion, Status> {
        self.projects()
            .set_properties(self.authed(pb::SetPropertiesRequest {
                scope: env_scope(),
                document_json: document.to_string(),
                if_version: None,
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner())
    }

    /// RunStep: the call's own refusal, or the stream's events (an error in it last).
    async fn run_step(
        &self,
        remote: &str,
        action: &str,
        context: Value,
    ) -> Result<Vec<Result<R, Status>>, Status> {
        let request = pb::RunStepRequest {
            git_remote: remote.into(),
            git_rev: "main".into(),
            action: action.into(),
            step_context_json: context.to_string(),
            ..Default::default()
        };
        let mut stream = self
            .steps()
            .run_step(self.authed(request))
            .await?
            .into_inner();
        let mut events = vec![];
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .expect("RunStep answers")
            {
                Ok(Some(event)) => events.push(Ok(event.event.unwrap())),
                Ok(None) => return Ok(events),
                Err(status) => {
                    events.push(Err(status));
                    return Ok(events);
                }
            }
        }
    }

    fn ran(&self) -> usize {
        self.executor.runs.lock().unwrap().len()
    }

    /// Every secret value handed to any step run so far.
    fn secrets_handed_out(&self) -> Vec<String> {
        self.executor
            .runs
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.secrets.values().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }
}

fn with_token<T>(message: T, header: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", MetadataValue::try_from(header).unwrap());
    request
}

fn assert_no_secret(text: &str) {
    for value in [DB_PASSWORD, CI_TOKEN] {
        assert!(!text.contains(value), "a secret value leaked: {text}");
    }
}

fn denied(status: &Status, needle: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(needle), "{}", status.message());
    assert_no_secret(status.message());
}

fn patch_result(project: Value, environment: Value) -> Script {
    Script {
        result: Some(json!({
            "project": {"properties_diff": project},
            "environment": {"properties_diff": environment}
        })),
        ..Default::default()
    }
}

// ---- RunStep ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn run_step_naming_env_runner_secrets_is_permission_denied_and_runs_nothing() {
    let s = start("", vec![]).await;
    let context = json!({"project": {"properties": {"opschain": {"env:runner_secrets": ["db"]}}}});
    let status = s
        .run_step("https://git.example.com/a.git", "a", context)
        .await
        .unwrap_err();
    denied(&status, "secret \"db\" is not granted to RunStep callers");
    assert!(status.message().contains("`secrets` of [run_step]"));
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn run_step_naming_env_build_secrets_in_environment_properties_is_permission_denied() {
    let s = start("[run_step]\nsecrets = [\"ci\"]\n", vec![]).await;
    let context =
        json!({"environment": {"properties": {"opschain": {"env:build_secrets": ["ci", "db"]}}}});
    let status = s
        .run_step("https://git.example.com/a.git", "a", context)
        .await
        .unwrap_err();
    denied(&status, "secret \"db\" is not granted to RunStep callers");
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn run_step_gets_no_default_secret_unless_run_step_grants_it() {
    let s = start("", vec![("a", Script::default())]).await;
    s.app
        .secrets
        .set(
            "opschain-runner-env",
            SecretValues([("DEFAULT".into(), "default-canary-31".into())].into()),
        )
        .unwrap();
    let events = s
        .run_step("https://git.example.com/a.git", "a", json!({}))
        .await
        .unwrap();
    assert!(matches!(events.last(), Some(Ok(R::Result(r))) if r.exit_code == 0));
    assert!(
        s.secrets_handed_out().is_empty(),
        "RunStep callers get nothing [run_step] does not grant"
    );
    s.stop().await;
}

#[tokio::test]
async fn run_step_with_a_granted_secret_gets_it_and_its_result_is_masked() {
    let leaky = Script {
        result: Some(
            json!({"step": {"properties": {"echo": format!("token {CI_TOKEN}"), CI_TOKEN: DB_PASSWORD}}}),
        ),
        ..Default::default()
    };
    let s = start("[run_step]\nsecrets = [\"ci\"]\n", vec![("a", leaky)]).await;
    let context = json!({"project": {"properties": {"opschain": {"env:runner_secrets": ["ci"]}}}});
    let events = s
        .run_step("https://git.example.com/a.git", "a", context)
        .await
        .unwrap();
    let Some(Ok(R::Result(result))) = events.last() else {
        panic!("no result: {events:?}")
    };
    assert_eq!(s.secrets_handed_out(), [CI_TOKEN]);
    assert_no_secret(&result.step_result_json);
    let returned: Value = serde_json::from_str(&result.step_result_json).unwrap();
    assert_eq!(returned["step"]["properties"]["echo"], "token ***");
    assert_eq!(returned["step"]["properties"]["***"], "***");
    s.stop().await;
}

#[tokio::test]
async fn run_step_from_a_server_path_is_refused_unless_the_operator_allows_file_remotes() {
    let s = start("", vec![]).await;
    for remote in ["/etc", "../other-project", "file:///srv/git/secret.git"] {
        let status = s.run_step(remote, "a", json!({})).await.unwrap_err();
        denied(&status, "add `allow_file_remotes = true` to [run_step]");
        assert!(status.message().contains(&format!("{remote:?}")));
    }
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn run_step_with_a_transport_command_remote_is_refused() {
    let s = start("[run_step]\nallow_file_remotes = true\n", vec![]).await;
    for remote in ["ext::sh -c touch% /tmp/pwned", "fd::17", "ftp://host/x"] {
        let status = s.run_step(remote, "a", json!({})).await.unwrap_err();
        denied(&status, "use an https://, http://, ssh:// or git:// URL");
    }
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn run_step_from_a_host_outside_the_allowed_prefixes_is_refused() {
    let s = start(
        "[run_step]\nremotes = [\"https://git.example.com\"]\n",
        vec![("a", Script::default())],
    )
    .await;
    let status = s
        .run_step("https://git.example.com.evil.org/a.git", "a", json!({}))
        .await
        .unwrap_err();
    denied(&status, "add one to `remotes` in [run_step]");
    assert_eq!(s.ran(), 0);
    let ok = s
        .run_step("https://git.example.com/team/a.git", "a", json!({}))
        .await
        .unwrap();
    assert!(matches!(ok.last(), Some(Ok(R::Result(_)))), "{ok:?}");
    s.stop().await;
}

#[tokio::test]
async fn run_step_of_a_docker_socket_action_is_refused_in_its_stream_before_it_runs() {
    let s = start("", vec![]).await;
    let events = s
        .run_step("https://git.example.com/a.git", "socket", json!({}))
        .await
        .unwrap();
    let Some(Err(status)) = events.last() else {
        panic!("not refused: {events:?}")
    };
    denied(status, "docker: socket is not allowed for RunStep callers");
    assert!(status
        .message()
        .contains("add `docker_socket = true` to [run_step]"));
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn run_step_with_a_malformed_step_context_is_invalid_argument() {
    let s = start("", vec![]).await;
    let request = pb::RunStepRequest {
        git_remote: "https://git.example.com/a.git".into(),
        git_rev: "main".into(),
        action: "a".into(),
        step_context_json: "{\"project\": ".into(),
        ..Default::default()
    };
    let status = s
        .steps()
        .run_step(s.authed(request))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("step_context_json"),
        "{}",
        status.message()
    );
    let context = json!({"project": {"properties": {"opschain": {"env:runner_secrets": "db"}}}});
    let status = s
        .run_step("https://git.example.com/a.git", "a", context)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("must be a list of secret names"));
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

// ---- Changes: privileged features and secrets need the operator's grant ------------------------------------

#[tokio::test]
async fn a_docker_dind_change_is_refused_at_creation_naming_the_setting() {
    let s = start("", vec![]).await;
    let status = s.create_change("dind").await.unwrap_err();
    denied(
        &status,
        "docker: dind is not allowed for project demo environment dev",
    );
    assert!(status
        .message()
        .contains("add `docker_dind = true` to a [[grant]] for it in"));
    assert!(status.message().contains("policy.toml"));
    assert_eq!(s.changes_stored().await, 0, "no change was created");
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_docker_socket_change_is_refused_at_creation_naming_the_setting() {
    let s = start(
        "[[grant]]\nproject = \"demo\"\nenvironment = \"prod\"\ndocker_socket = true\n",
        vec![],
    )
    .await;
    let status = s.create_change("socket").await.unwrap_err();
    denied(&status, "add `docker_socket = true` to a [[grant]]");
    assert_eq!(s.changes_stored().await, 0);
    s.stop().await;
}

#[tokio::test]
async fn a_privileged_service_is_refused_at_creation_naming_the_service() {
    let s = start("", vec![]).await;
    let status = s.create_change("privileged").await.unwrap_err();
    denied(&status, "a privileged service (\"vpn\") is not allowed");
    assert!(status.message().contains("`privileged_services = true`"));
    assert_eq!(s.changes_stored().await, 0);
    s.stop().await;
}

#[tokio::test]
async fn a_granted_privileged_feature_runs() {
    let s = start(
        "[[grant]]\nproject = \"demo\"\nenvironment = \"dev\"\ndocker_dind = true\n",
        vec![("dind", Script::default())],
    )
    .await;
    let change = s.create_change("dind").await.unwrap();
    let detail = s.finished(&change.id).await;
    assert_eq!(detail.change.unwrap().state(), pb::ChangeState::Success);
    assert_eq!(s.ran(), 1);
    s.stop().await;
}

#[tokio::test]
async fn an_environment_naming_an_ungranted_secret_gets_no_change() {
    let s = start("", vec![]).await;
    s.set_env_properties(json!({"opschain": {"env:runner_secrets": ["db"]}}))
        .await
        .unwrap();
    let status = s.create_change("a").await.unwrap_err();
    denied(
        &status,
        "secret \"db\" (named in opschain.env:runner_secrets) is not granted to project demo environment dev",
    );
    assert!(status
        .message()
        .contains("adding \"db\" to `secrets` of a [[grant]]"));
    assert_eq!(s.changes_stored().await, 0);
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_secret_granted_to_another_environment_is_refused() {
    let s = start(
        "[[grant]]\nproject = \"demo\"\nenvironment = \"prod\"\nsecrets = [\"db\"]\n",
        vec![],
    )
    .await;
    s.set_env_properties(json!({"opschain": {"env:build_secrets": ["db"]}}))
        .await
        .unwrap();
    let status = s.create_change("a").await.unwrap_err();
    denied(
        &status,
        "secret \"db\" (named in opschain.env:build_secrets)",
    );
    assert_eq!(s.changes_stored().await, 0);
    s.stop().await;
}

#[tokio::test]
async fn a_secret_named_after_creation_fails_the_step_before_it_runs() {
    let s = start(
        "",
        vec![("a", Script::sleeping(Duration::from_millis(500)))],
    )
    .await;
    // Created while nothing ungranted is named, then an admin names one before the step starts: the change is
    // queued behind a slow one so the write lands first.
    let blocker = s.create_change("a").await.unwrap();
    let change = s.create_change("b").await.unwrap();
    s.set_env_properties(json!({"opschain": {"env:runner_secrets": ["db"]}}))
        .await
        .unwrap();
    s.finished(&blocker.id).await;
    let detail = s.finished(&change.id).await;
    assert_eq!(
        detail.change.as_ref().unwrap().state(),
        pb::ChangeState::Error
    );
    let reason = &detail.steps[0].reason;
    assert!(reason.contains("secret \"db\""), "{reason}");
    assert!(!s.secrets_handed_out().contains(&DB_PASSWORD.to_owned()));
    s.stop().await;
}

// ---- Step patches: checked like a CLI/API write, secret lists stay the admins' -----------------------------

#[tokio::test]
async fn a_step_patch_writing_runner_secrets_fails_the_step_and_applies_nothing() {
    let evil = patch_result(
        json!([{"op": "add", "path": "/stolen", "value": true}]),
        json!([{"op": "add", "path": "/opschain", "value": {"env:runner_secrets": ["db", "ci"]}}]),
    );
    let s = start("", vec![("a", evil), ("b", Script::default())]).await;
    let before = s.versions().await;
    let change = s.create_change("deploy").await.unwrap();
    let detail = s.finished(&change.id).await;
    assert_eq!(
        detail.change.as_ref().unwrap().state(),
        pb::ChangeState::Error
    );
    let a = detail.steps.iter().find(|st| st.action == "a").unwrap();
    assert!(
        a.reason
            .contains("changes `opschain.env:runner_secrets` of the environment")
            && a.reason.contains("only a project admin may set")
            && a.reason.ends_with("nothing was applied"),
        "{}",
        a.reason
    );
    assert_eq!(s.versions().await, before, "neither document changed");
    assert_eq!(s.ran(), 1, "the next step did not run");
    assert!(s
        .secrets_handed_out()
        .iter()
        .all(|v| v != DB_PASSWORD && v != CI_TOKEN));
    s.stop().await;
}

#[tokio::test]
async fn a_step_patch_removing_the_admins_secret_list_applies_nothing() {
    let evil = patch_result(json!([]), json!([{"op": "remove", "path": "/opschain"}]));
    let s = start(
        "[[grant]]\nproject = \"demo\"\nsecrets = [\"ci\"]\n",
        vec![("a", evil)],
    )
    .await;
    s.set_env_properties(json!({"opschain": {"env:runner_secrets": ["ci"]}}))
        .await
        .unwrap();
    let before = s.versions().await;
    let change = s.create_change("a").await.unwrap();
    let detail = s.finished(&change.id).await;
    assert!(
        detail.steps[0].reason.contains("env:runner_secrets"),
        "{}",
        detail.steps[0].reason
    );
    assert_eq!(s.versions().await, before);
    s.stop().await;
}

/// Step patches a step may not make: each fails its step, says why, and applies neither document.
#[tokio::test]
async fn step_patches_a_step_may_not_make_fail_it_and_apply_nothing() {
    // (case, the step's project patch, its environment patch, what the step's reason says)
    let cases = [
        (
            "build secrets of the project",
            json!([{"op": "add", "path": "/opschain", "value": {"env:build_secrets": ["db"]}}]),
            json!([{"op": "add", "path": "/fine", "value": 1}]),
            "changes `opschain.env:build_secrets` of the project",
        ),
        (
            "project properties turned into a list",
            json!([{"op": "replace", "path": "", "value": [1, 2]}]),
            json!([]),
            "properties must be a JSON object",
        ),
        (
            "environment properties turned into null",
            json!([]),
            json!([{"op": "replace", "path": "", "value": null}]),
            "properties must be a JSON object",
        ),
        (
            "an invalid opschain section",
            json!([{"op": "add", "path": "/ok", "value": 1}]),
            json!([{"op": "add", "path": "/opschain", "value": {"env": {"PORT": 8080}}}]),
            "`opschain.env.PORT` must be a string",
        ),
    ];
    let cases =
        cases.map(|(case, project, environment, reason)| (case, (project, environment, reason)));
    support::each_case_async(cases, |(project, environment, expected)| async move {
        let s = start("", vec![("a", patch_result(project, environment))]).await;
        let before = s.versions().await;
        let change = s.create_change("a").await.unwrap();
        let detail = s.finished(&change.id).await;
        assert_eq!(
            detail.change.as_ref().unwrap().state(),
            pb::ChangeState::Error
        );
        let reason = &detail.steps[0].reason;
        assert!(
            reason.contains(expected) && reason.contains("nothing was applied"),
            "{reason}"
        );
        assert_eq!(s.versions().await, before, "neither document changed");
        s.stop().await;
    })
    .await;
}

// ---- Properties writes from token holders ------------------------------------------------------------------

#[tokio::test]
async fn set_properties_to_a_list_or_null_is_invalid_argument_and_keeps_the_document() {
    let s = start("", vec![]).await;
    let before = s.versions().await;
    for document in [json!([1, 2]), json!(null), json!("text")] {
        let status = s.set_env_properties(document).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status
            .message()
            .contains("properties must be a JSON object"));
    }
    let status = s
        .projects()
        .patch_properties(s.authed(pb::PatchPropertiesRequest {
            scope: project_scope(),
            patch_json: json!([{"op": "replace", "path": "", "value": [1, 2]}]).to_string(),
            if_version: None,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(s.versions().await, before);
    s.stop().await;
}

// ---- Authentication ------------------------------------------------------------------------------------------

#[tokio::test]
async fn empty_blank_and_wrong_bearer_tokens_are_unauthenticated() {
    let s = start("", vec![]).await;
    for header in [
        "Bearer ",
        "Bearer    ",
        "Bearer hostile-test-toke",
        "Bearer hostile-test-token2",
        "hostile-test-token",
    ] {
        let status = s
            .projects()
            .list_projects(with_token(pb::ListProjectsRequest::default(), header))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{header:?}");
    }
    let status = s
        .steps()
        .run_step(with_token(
            pb::RunStepRequest {
                git_remote: "https://git.example.com/a.git".into(),
                action: "a".into(),
                ..Default::default()
            },
            "Bearer ",
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(s.ran(), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_blank_token_in_the_server_config_is_refused_before_serving() {
    for token in ["", "  ", "\n"] {
        let home = tempfile::tempdir().unwrap();
        let app = App::open(home.path()).await.unwrap();
        let orchestrator = fake_orchestrator(app, manifest(), Default::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServerConfig {
            token: Some(token.into()),
            ..Default::default()
        };
        let err = run(listener, orchestrator, config, async {})
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("an empty or blank token is refused"),
            "{err}"
        );
    }
}

// ---- The binary ----------------------------------------------------------------------------------------------

fn runner(home: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.env("RUNNER_HOME", home)
        .env_remove("RUNNER_TOKEN")
        .env_remove("RUNNER_TOKEN_FILE")
        .env_remove("RUNNER_SERVER")
        .env_remove("RUNNER_POLICY");
    cmd
}

const BLANK_TOKEN: &str = "an empty or blank token is refused";

/// Runs `cmd` (which must end by itself); returns (exit code, stdout, stderr).
fn outcome(cmd: &mut std::process::Command) -> (Option<i32>, String, String) {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runner runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_empty_or_blank_token_file_is_refused_off_loopback_before_serving() {
    let home = tempfile::tempdir().unwrap();
    for content in ["", "   \n", "\t\r\n"] {
        let file = home.path().join("token");
        std::fs::write(&file, content).unwrap();
        for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
            let (code, stdout, stderr) = outcome(runner(home.path()).args([
                "serve",
                "--listen",
                listen,
                "--token-file",
                file.to_str().unwrap(),
            ]));
            assert_eq!(code, Some(1), "{listen} {content:?}: {stderr}");
            assert!(stderr.contains(BLANK_TOKEN), "{stderr}");
            assert!(
                !stderr.contains("serving"),
                "announced before refusing: {stderr}"
            );
            assert!(stdout.is_empty());
        }
    }
}

#[test]
fn a_blank_runner_token_is_refused_with_the_same_message_on_both_sides() {
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = outcome(
        runner(home.path())
            .args(["serve", "--listen", "0.0.0.0:0"])
            .env("RUNNER_TOKEN", "  "),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(BLANK_TOKEN), "{stderr}");
    assert!(!stderr.contains("serving"), "{stderr}");
    // The client side: a blank token is not quietly sent as "no token".
    let (code, _, stderr) = outcome(runner(home.path()).args([
        "--server",
        "http://127.0.0.1:9",
        "--token",
        " ",
        "project",
        "list",
    ]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(BLANK_TOKEN), "{stderr}");
}

#[test]
fn serving_off_loopback_without_a_token_is_refused_before_serving() {
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = outcome(runner(home.path()).args(["serve", "--listen", "0.0.0.0:0"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without a token"),
        "{stderr}"
    );
    assert!(!stderr.contains("serving the runner API"), "{stderr}");
}

#[test]
fn a_malformed_policy_file_is_refused_naming_the_setting_and_its_line() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("policy.toml"),
        "[[grant]]\nproject = \"demo\"\ndocker_sokcet = true\n",
    )
    .unwrap();
    let (code, _, stderr) = outcome(runner(home.path()).args(["project", "list"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid policy file")
            && stderr.contains("unknown field `docker_sokcet`")
            && stderr.contains("line 3"),
        "{stderr}"
    );
    std::fs::write(
        home.path().join("policy.toml"),
        "[steps]\nmemory = \"8GiB\"\nmax_memory = \"1GiB\"\n",
    )
    .unwrap();
    let (code, _, stderr) = outcome(runner(home.path()).args(["project", "list"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("steps.memory: the default 8GiB is above max_memory 1GiB"),
        "{stderr}"
    );
}

#[test]
fn a_named_policy_file_that_does_not_exist_is_an_error_not_the_defaults() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("nope.toml");
    let (code, _, stderr) = outcome(
        runner(home.path())
            .args(["project", "list"])
            .env("RUNNER_POLICY", &missing),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "failed to read the policy file {}",
            missing.display()
        )),
        "{stderr}"
    );
    let (code, _, stderr) = outcome(runner(home.path()).args([
        "--policy",
        missing.to_str().unwrap(),
        "project",
        "list",
    ]));
    assert_eq!(code, Some(1), "{stderr}");
}

#[test]
fn properties_that_are_not_an_object_are_refused_by_the_cli() {
    let home = tempfile::tempdir().unwrap();
    let ok = |args: &[&str]| {
        let (code, _, stderr) = outcome(runner(home.path()).args(args));
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    };
    ok(&["project", "create", "--code", "demo", "--name", "Demo"]);
    for document in ["[1,2]", "null"] {
        let file = home.path().join("doc.json");
        std::fs::write(&file, document).unwrap();
        let (code, _, stderr) = outcome(runner(home.path()).args([
            "project",
            "set-properties",
            "--project",
            "demo",
            "--file",
            file.to_str().unwrap(),
        ]));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains("properties must be a JSON object"),
            "{stderr}"
        );
    }
    let (_, stdout, _) =
        outcome(runner(home.path()).args(["project", "show-properties", "--project", "demo"]));
    assert_eq!(stdout.trim(), "{}");
}

#[test]
fn the_home_data_stays_untouched_by_refusals() {
    // A refused serve neither creates the store nor leaves a process: the command returned (above) and the
    // data directory holds no database.
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let (code, _, _) = outcome(
        runner(&data)
            .args(["serve", "--listen", "0.0.0.0:0"])
            .env("RUNNER_TOKEN", ""),
    );
    assert_eq!(code, Some(1));
    assert!(
        !data.join("runner.db").exists(),
        "nothing was opened for a refused serve"
    );
}
