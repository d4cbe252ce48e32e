//! Runs one step in one discarded container (or, later, pod). The orchestrator only ever talks to [`Executor`];
//! `docker` is the real backend (the tests drive orchestration with a scripted fake of their own).

pub mod docker;

use futures::future::BoxFuture;
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use crate::actions::Service;
use crate::secrets::SecretValues;
use std::collections::BTreeMap;

/// The labels every container, network and volume the runner creates carries.
pub const LABEL_OWNER: &str = "runner.owner";
pub const LABEL_CHANGE: &str = "runner.change";
pub const LABEL_STEP: &str = "runner.step";
/// Which data directory (store) the owning runner belongs to: runners of other data directories on the same daemon
/// are not ours to judge, so the reaper only looks at its own store's containers.
pub const LABEL_STORE: &str = "runner.store";
/// On a service container: the service's name.
pub const LABEL_SERVICE: &str = "runner.service";

/// Where the step's repository and exchange files live inside the container.
pub const STEP_ROOT: &str = "/opt/opschain";
pub const STEP_CONTEXT_PATH: &str = "/opt/opschain/.opschain/step_context.json";
pub const STEP_RESULT_PATH: &str = "/opt/opschain/.opschain/step_result.json";

/// Everything needed to run one step.
#[derive(Debug, Clone)]
pub struct StepRun {
    pub change_id: String,
    pub step_id: String,
    /// The id of the runner process that owns the container (its lease in the store).
    pub owner: String,
    /// The id of the data directory whose store holds that lease.
    pub store: String,
    /// The step's image, built from the change's commit.
    pub image: String,
    /// Written to [`STEP_CONTEXT_PATH`] before the container starts.
    pub step_context: Value,
    /// Runner secrets: reach the action's environment through the container's stdin, never its configuration.
    pub secrets: SecretValues,
    /// Stop the step after this long.
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL on timeout or cancel.
    pub stop_grace: Duration,
    /// Background services started before the step and removed after it; each has its `image` (services built
    /// from the repository were built before the step was handed over).
    pub services: BTreeMap<String, Service>,
    /// Docker access for the step's action.
    pub docker: Option<StepDocker>,
    /// Memory, CPU and process limits of the step's container (the operator's policy decided them); `None`
    /// runs it without limits.
    pub resources: Option<crate::policy::StepResources>,
}

/// A limit of the step's container that ended its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    /// The kernel killed a process of the step for want of memory.
    Memory { bytes: u64 },
    /// The step tried to start more processes than its limit allows (`max` is the limit as the cgroup says it).
    Pids { max: String },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { bytes } => write!(
                f,
                "out of memory (limit {})",
                crate::policy::format_size(*bytes)
            ),
            LimitHit::Pids { max } => write!(f, "process limit reached (pids {max})"),
        }
    }
}

/// How a step reaches a Docker daemon, with what that needs already prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDocker {
    /// The host's daemon socket, mounted into the step.
    Socket,
    /// A daemon of the step's own, run from `image` as the service [`crate::actions::DIND_SERVICE`], its storage
    /// in a volume of the step's and its socket shared with the step through another.
    Dind { image: String },
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of a step's output as it happens: raw bytes of one stream, of any size (a line may span pieces and a
/// piece may hold many lines). Turning them into masked, capped lines is the log pipeline's job
/// ([`crate::logs`]), so a secret split across two reads is still caught.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: Stream,
    pub bytes: Vec<u8>,
}

impl LogLine {
    /// A whole line (a newline is added).
    pub fn line(stream: Stream, line: &str) -> LogLine {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        LogLine { stream, bytes }
    }
}

/// How many pieces of output may wait between an executor and the log pipeline (which bounds the bytes).
pub const LOG_CHANNEL: usize = 64;

/// How the container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited,
    TimedOut,
    Cancelled,
}

/// What a finished step left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    pub ended: Ended,
    pub exit_code: i64,
    /// `step_result.json`, if the step wrote one.
    pub result: Option<Value>,
    /// The container limit that ended the step, if one did.
    pub limit: Option<LimitHit>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("the Docker daemon is unreachable: {0}")]
    Unavailable(String),
    #[error("failed to {action} the container of step {step_id}: {message}")]
    Container {
        action: &'static str,
        step_id: String,
        message: String,
    },
    #[error("step {step_id} wrote a step_result.json that is not valid JSON: {message}")]
    BadResult { step_id: String, message: String },
    #[error("service {service:?} of step {step_id} {problem}{}", tail(log_tail))]
    Service {
        step_id: String,
        service: String,
        problem: String,
        log_tail: Vec<String>,
    },
}

fn tail(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; its last log lines:\n  {}", lines.join("\n  "))
    }
}

/// What kind of thing was left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftOverKind {
    Container,
    Network,
    Volume,
}

/// A container, network or volume the runner left behind, found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOver {
    pub kind: LeftOverKind,
    pub id: String,
    pub owner: String,
    pub store: String,
    pub change_id: String,
    pub step_id: String,
}

/// The contract every backend keeps:
///
/// - [`run_step`](Executor::run_step) runs exactly one container from `run.image` with the labels
///   [`LABEL_OWNER`], [`LABEL_STORE`], [`LABEL_CHANGE`], [`LABEL_STEP`]; puts `run.step_context` at [`STEP_CONTEXT_PATH`] before
///   the process starts; hands `run.secrets` to the process without them appearing in the container's
///   configuration; sends all output to `logs` as it comes (waiting when the
///   bounded channel is full, which slows the container's output rather than growing memory); and returns the exit code and
///   [`STEP_RESULT_PATH`] if the step wrote it.
/// - On `run.timeout` or `cancel` it sends SIGTERM, then SIGKILL after `run.stop_grace`, and reports
///   [`Ended::TimedOut`] / [`Ended::Cancelled`].
/// - `run.services` (and, for [`StepDocker::Dind`], the step's own daemon) start before the step's container, on a
///   private network of the step's, each reachable by its name; the step starts only once every service with a
///   readiness probe passed it, and fails with the service's last log lines if one never does.
/// - Whatever happens — success, failure, timeout, cancel, an error of its own — the container, its services,
///   their network and volumes are removed before `run_step` returns; service logs go to `logs` first.
/// - [`left_overs`](Executor::left_overs) lists labelled containers, networks and volumes still present, and
///   [`remove`](Executor::remove) removes one; the orchestrator decides which belong to dead runners.
/// - [`available`](Executor::available) says whether the backend answers now (the server's health).
pub trait Executor: Send + Sync {
    fn run_step<'a>(
        &'a self,
        run: &'a StepRun,
        logs: Sender<LogLine>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StepOutcome, ExecutorError>>;

    fn left_overs(&self) -> BoxFuture<'_, Result<Vec<LeftOver>, ExecutorError>>;

    fn remove<'a>(&'a self, left_over: &'a LeftOver) -> BoxFuture<'a, Result<(), ExecutorError>>;

    /// Whether the backend answers now; a backend with nothing to reach always does.
    fn available(&self) -> BoxFuture<'_, Result<(), ExecutorError>> {
        Box::pin(async { Ok(()) })
    }
}
