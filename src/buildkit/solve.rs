//! `Control.Solve` with the `dockerfile.v0` frontend and the `moby` exporter, with `Control.Status` streamed into
//! [`BuildProgress`] alongside.

use bollard_buildkit_proto::moby::buildkit::v1::control_client::ControlClient;
use bollard_buildkit_proto::moby::buildkit::v1::{SolveRequest, StatusRequest, StatusResponse};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::conn::{upgrade, ConnError, DockerEndpoint};
use super::session::{self, SessionContent, METHODS};
use super::{mask, BuildError, BuildProgress, BuildRequest, BuiltImage};

/// Log lines kept per vertex for error reports.
const LOG_TAIL: usize = 20;
const MAX_MESSAGE: usize = 64 << 20;

/// Adds the session headers BuildKit routes calls by.
#[derive(Clone)]
struct SessionHeaders {
    session_id: String,
}

impl tonic::service::Interceptor for SessionHeaders {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        metadata.insert(
            "x-docker-expose-session-uuid",
            self.session_id
                .parse()
                .map_err(|_| tonic::Status::internal("bad session id"))?,
        );
        for method in METHODS {
            metadata.append(
                "x-docker-expose-session-grpc-method",
                method.parse().expect("ASCII method names"),
            );
        }
        Ok(request)
    }
}

fn unreachable(endpoint: &DockerEndpoint, e: impl std::fmt::Display) -> BuildError {
    BuildError::DaemonUnreachable {
        endpoint: endpoint.to_string(),
        message: e.to_string(),
    }
}

async fn control(
    endpoint: &DockerEndpoint,
    session_id: &str,
) -> Result<ControlClient<InterceptedService<Channel, SessionHeaders>>, BuildError> {
    let target = endpoint.clone();
    let header = session_id.to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (target, header) = (target.clone(), header.clone());
        async move {
            let io = upgrade(
                &target,
                "/grpc",
                &[("X-Docker-Expose-Session-Uuid", header)],
            )
            .await?;
            Ok::<_, ConnError>(io.into_inner())
        }
    });
    let channel = Endpoint::from_static("http://docker.invalid")
        .connect_with_connector(connector)
        .await
        .map_err(|e| unreachable(endpoint, crate::error::error_text(&e)))?;
    Ok(ControlClient::with_interceptor(
        channel,
        SessionHeaders {
            session_id: session_id.to_owned(),
        },
    )
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE))
}

/// What the status stream learned, for error reports.
#[derive(Default)]
struct Seen {
    names: HashMap<String, String>,
    /// Vertexes already reported started / completed: BuildKit repeats them in later updates.
    started: std::collections::HashSet<String>,
    completed: std::collections::HashSet<String>,
    logs: HashMap<String, VecDeque<String>>,
    failed: Option<(String, String)>,
}

fn absorb(
    status: StatusResponse,
    seen: &mut Seen,
    secrets: &BTreeMap<String, Vec<u8>>,
    progress: &UnboundedSender<BuildProgress>,
) {
    for v in status.vertexes {
        let name = mask(secrets, &v.name);
        seen.names.insert(v.digest.clone(), name.clone());
        if let Some(completed) = v.completed {
            if !seen.completed.insert(v.digest.clone()) {
                continue;
            }
            let started = v
                .started
                .map(|t| t.seconds as f64 + t.nanos as f64 / 1e9)
                .unwrap_or_default();
            let ended = completed.seconds as f64 + completed.nanos as f64 / 1e9;
            let error = (!v.error.is_empty()).then(|| mask(secrets, &v.error));
            if let Some(error) = &error {
                seen.failed.get_or_insert((v.digest.clone(), error.clone()));
            }
            let duration = Duration::from_secs_f64((ended - started).max(0.0));
            let _ = progress.send(BuildProgress::VertexCompleted {
                digest: v.digest,
                name,
                cached: v.cached,
                error,
                duration,
            });
        } else if v.started.is_some() && seen.started.insert(v.digest.clone()) {
            let _ = progress.send(BuildProgress::VertexStarted {
                digest: v.digest,
                name,
            });
        }
    }
    for log in status.logs {
        let text = mask(secrets, &String::from_utf8_lossy(&log.msg));
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let tail = seen.logs.entry(log.vertex.clone()).or_default();
            if tail.len() == LOG_TAIL {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
            let _ = progress.send(BuildProgress::Log {
                digest: log.vertex.clone(),
                line: line.to_owned(),
            });
        }
    }
}

/// Sorts a failed solve into the error a person can act on.
fn classify(message: String, seen: &Seen) -> BuildError {
    let lower = message.to_lowercase();
    let tail = |digest: &str| {
        seen.logs
            .get(digest)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    };
    if lower.contains("dockerfile parse error")
        || lower.contains("unknown instruction")
        || lower.contains("failed to parse")
    {
        return BuildError::Dockerfile {
            message,
            log_tail: vec![],
        };
    }
    if lower.contains("pull access denied")
        || lower.contains("failed to resolve source metadata")
        || lower.contains("failed to do request")
        || (lower.contains("not found") && lower.contains("docker.io"))
    {
        return BuildError::BaseImageMissing { message };
    }
    if let Some((digest, error)) = &seen.failed {
        let vertex = seen.names.get(digest).cloned().unwrap_or_default();
        if vertex.starts_with("[")
            || lower.contains("executor failed")
            || lower.contains("did not complete successfully")
        {
            return BuildError::StepFailed {
                vertex,
                message: error.clone(),
                log_tail: tail(digest),
            };
        }
    }
    if lower.contains("failed to create llb definition")
        || lower.contains("dockerfile") && lower.contains("line")
    {
        return BuildError::Dockerfile {
            message,
            log_tail: vec![],
        };
    }
    let log_tail = seen
        .failed
        .as_ref()
        .map(|(d, _)| tail(d))
        .unwrap_or_default();
    BuildError::Failed { message, log_tail }
}

/// Builds `request` with the daemon's BuildKit, reporting progress as it goes.
pub async fn build(
    endpoint: &DockerEndpoint,
    request: BuildRequest,
    progress: UnboundedSender<BuildProgress>,
    cancel: CancellationToken,
) -> Result<BuiltImage, BuildError> {
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    // A stable shared key per context directory lets BuildKit compare this sync with the previous one.
    let shared_key = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(request.context_dir.key().as_bytes()))
    };
    let content = SessionContent {
        dirs: HashMap::from([
            (
                "context".to_owned(),
                std::sync::Arc::new(request.context_dir.open()?),
            ),
            (
                "dockerfile".to_owned(),
                std::sync::Arc::new(request.dockerfile_dir.open()?),
            ),
        ]),
        secrets: request.secrets.clone(),
    };
    let served = session::start(endpoint, &session_id, &shared_key, content)
        .await
        .map_err(|e| unreachable(endpoint, e))?;
    let mut control = control(endpoint, &session_id).await?;

    let build_ref = uuid::Uuid::new_v4().simple().to_string();
    let mut frontend_attrs =
        HashMap::from([("filename".to_owned(), request.dockerfile_name.clone())]);
    for (key, value) in &request.build_args {
        frontend_attrs.insert(format!("build-arg:{key}"), value.clone());
    }
    for (key, value) in &request.labels {
        frontend_attrs.insert(format!("label:{key}"), value.clone());
    }
    let solve_request = SolveRequest {
        r#ref: build_ref.clone(),
        session: session_id.clone(),
        frontend: "dockerfile.v0".to_owned(),
        frontend_attrs,
        // Engine 20.10's BuildKit knows only the single-exporter fields.
        exporter_deprecated: "moby".to_owned(),
        exporter_attrs_deprecated: HashMap::from([("name".to_owned(), request.tags.join(","))]),
        ..Default::default()
    };

    let mut status_client = control.clone();
    let secrets = request.secrets.clone();
    let status_ref = build_ref.clone();
    let status = tokio::spawn(async move {
        let mut seen = Seen::default();
        if let Ok(response) = status_client
            .status(StatusRequest { r#ref: status_ref })
            .await
        {
            let mut stream = response.into_inner();
            while let Ok(Some(update)) = stream.message().await {
                absorb(update, &mut seen, &secrets, &progress);
            }
        }
        seen
    });

    let solved = tokio::select! {
        solved = control.solve(solve_request) => solved,
        _ = cancel.cancelled() => {
            status.abort();
            served.abort();
            return Err(BuildError::Cancelled);
        }
    };
    // The status stream ends with the build; give it a moment to deliver the last vertexes.
    let seen = tokio::time::timeout(Duration::from_secs(5), status)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    served.abort();
    match solved {
        Ok(response) => {
            let exported = response.into_inner().exporter_response;
            let image_id = exported
                .get("containerimage.digest")
                .or_else(|| exported.get("containerimage.config.digest"))
                .cloned()
                .unwrap_or_default();
            Ok(BuiltImage { image_id })
        }
        Err(status)
            if status.code() == tonic::Code::Unavailable
                || status.code() == tonic::Code::Unknown
                    && status.message().contains("transport") =>
        {
            Err(unreachable(endpoint, status.message()))
        }
        Err(status) => Err(classify(mask(&request.secrets, status.message()), &seen)),
    }
}
