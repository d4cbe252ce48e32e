//! The gRPC server of the API tests: a real `grpc::run` on loopback over a fresh data directory, with project
//! `demo` (environment `dev`, and any others asked for), steps on the fake executor. Each test binary adds the
//! calls it makes (create, watch, …) in its own `impl Server` block.
//!
//! Include it next to `mod support;` with `#[path = "support/grpc_server.rs"] mod grpc_server;`.
#![allow(dead_code)]

use super::support::fakes::{FakeExecutor, FakeImages, FakeSources, Script};
use runner::app::App;
use runner::grpc::pb;
use runner::grpc::pb::change_service_client::ChangeServiceClient;
use runner::grpc::pb::project_service_client::ProjectServiceClient;
use runner::grpc::pb::step_runner_service_client::StepRunnerServiceClient;
use runner::grpc::{run, ServerConfig, ServerError};
use runner::orchestrator::{Orchestrator, Settings};
use runner::policy::Policy;
use runner::secrets::SecretValues;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// An orchestrator over `app` whose repository serves `manifest` (no repository properties), with fake images.
pub fn fake_orchestrator(app: App, manifest: Value, executor: Arc<FakeExecutor>) -> Orchestrator {
    Orchestrator::new(
        app,
        Arc::new(FakeSources {
            manifest,
            properties: json!({}),
        }),
        Arc::new(FakeImages),
        executor,
        Settings {
            poll: Duration::from_millis(20),
            ..Default::default()
        },
    )
}

/// A lazy plaintext channel to a server on `addr`.
pub fn channel_to(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// A CreateChange of `action` in `demo`/`dev` at `main`.
pub fn change_request(action: &str) -> pb::CreateChangeRequest {
    pb::CreateChangeRequest {
        project: "demo".into(),
        environment: "dev".into(),
        git_rev: "main".into(),
        action: action.into(),
        ..Default::default()
    }
}

/// How to set a server up: `Options::new(manifest)`, then what differs, then `.start().await`.
pub struct Options {
    manifest: Value,
    token: Option<String>,
    grace: Duration,
    scripts: Vec<(String, Script)>,
    environments: Vec<(String, String)>,
    policy: Option<String>,
    secrets: Vec<(String, String, String)>,
    database: Option<String>,
}

impl Options {
    /// No token, a 5 s shutdown grace, no scripts (every step exits 0), project `demo` with environment `dev`.
    pub fn new(manifest: Value) -> Options {
        Options {
            manifest,
            token: None,
            grace: Duration::from_secs(5),
            scripts: vec![],
            environments: vec![],
            policy: None,
            secrets: vec![],
            database: None,
        }
    }

    /// Callers must send `Bearer <token>`; [`Server::authed`] does.
    pub fn token(mut self, token: &str) -> Options {
        self.token = Some(token.to_owned());
        self
    }

    /// How long shutdown lets running changes go on before it cancels them.
    pub fn grace(mut self, grace: Duration) -> Options {
        self.grace = grace;
        self
    }

    /// What the fake executor does for each named action.
    pub fn scripts(mut self, scripts: Vec<(&str, Script)>) -> Options {
        self.scripts = scripts
            .into_iter()
            .map(|(action, script)| (action.to_owned(), script))
            .collect();
        self
    }

    /// Another environment of `demo`, besides `dev`.
    pub fn environment(mut self, code: &str, name: &str) -> Options {
        self.environments.push((code.to_owned(), name.to_owned()));
        self
    }

    /// The operator's `policy.toml`.
    pub fn policy(mut self, toml: &str) -> Options {
        self.policy = Some(toml.to_owned());
        self
    }

    /// A secret `name` holding one `key` = `value`.
    pub fn secret(mut self, name: &str, key: &str, value: &str) -> Options {
        self.secrets
            .push((name.to_owned(), key.to_owned(), value.to_owned()));
        self
    }

    /// The store at this `postgres://` URL instead of SQLite in the data directory.
    pub fn database(mut self, url: &str) -> Options {
        self.database = Some(url.to_owned());
        self
    }

    pub async fn start(self) -> Server {
        let home = tempfile::tempdir().unwrap();
        if let Some(policy) = &self.policy {
            std::fs::write(home.path().join("policy.toml"), policy).unwrap();
        }
        let policy = Policy::load(home.path()).unwrap();
        let app = App::open_with_store(home.path(), policy, self.database.as_deref())
            .await
            .unwrap();
        app.create_project("demo", "Demo", Some("/nowhere"))
            .await
            .unwrap();
        app.create_environment("demo", "dev", "Dev").await.unwrap();
        for (code, name) in &self.environments {
            app.create_environment("demo", code, name).await.unwrap();
        }
        for (name, key, value) in self.secrets {
            app.secrets
                .set(&name, SecretValues([(key, value)].into()))
                .unwrap();
        }
        let executor = Arc::new(FakeExecutor {
            scripts: self.scripts.into_iter().collect(),
            ..Default::default()
        });
        let orchestrator = fake_orchestrator(app.clone(), self.manifest, executor.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = ServerConfig {
            token: self.token.clone(),
            grace: self.grace,
            ..Default::default()
        };
        let handle = tokio::spawn(run(listener, orchestrator, config, async {
            let _ = stopped.await;
        }));
        Server {
            home,
            addr,
            channel: channel_to(addr),
            token: self.token,
            app,
            executor,
            stop: Some(stop),
            handle,
        }
    }
}

/// A running server; [`Server::stop`] shuts it down.
pub struct Server {
    home: tempfile::TempDir,
    pub addr: SocketAddr,
    pub channel: Channel,
    token: Option<String>,
    /// The server's own `App` (same store), for looking behind the API.
    pub app: App,
    /// Every step run the server started.
    pub executor: Arc<FakeExecutor>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Server {
    /// `message` with the server's token as bearer (plain when it has none).
    pub fn authed<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
            );
        }
        request
    }

    pub fn projects(&self) -> ProjectServiceClient<Channel> {
        ProjectServiceClient::new(self.channel.clone())
    }

    pub fn changes(&self) -> ChangeServiceClient<Channel> {
        ChangeServiceClient::new(self.channel.clone())
    }

    pub fn steps(&self) -> StepRunnerServiceClient<Channel> {
        StepRunnerServiceClient::new(self.channel.clone())
    }

    /// CreateChange of `action` in `demo`/`dev` at `main`, with the server's token.
    pub async fn create_change(&self, action: &str) -> Result<pb::Change, Status> {
        self.changes()
            .create_change(self.authed(change_request(action)))
            .await
            .map(|r| r.into_inner())
    }

    /// Stops the server and waits for it to end cleanly; returns its data directory for a look afterwards.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.take().unwrap().send(()).unwrap();
        self.handle.await.unwrap().unwrap();
        self.home
    }
}
