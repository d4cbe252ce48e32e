//! The crate's error type, and the one classification both the CLI (exit codes) and the gRPC layer (status codes)
//! map from.

use std::path::PathBuf;

use crate::actions::ManifestError;
use crate::buildkit::BuildError;
use crate::context::ContextError;
use crate::executor::ExecutorError;
use crate::image::base::BaseImageError;
use crate::policy::PolicyError;
use crate::properties::{DocumentError, OpschainError, PatchError};
use crate::secrets::SecretError;
use crate::snapshot::{PathError, SnapshotError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Boxed: refusals carry several names and a path.
    #[error(transparent)]
    Policy(Box<PolicyError>),
    #[error(transparent)]
    Token(#[from] crate::grpc::auth::TokenError),
    /// A configuration that would be unsafe to run with (e.g. serving off loopback without a token).
    #[error("{message}")]
    Refused { message: String },
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error(transparent)]
    LogLimits(#[from] crate::logs::limits::LimitError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("invalid properties for the {owner}: {source}")]
    InvalidProperties {
        owner: String,
        #[source]
        source: OpschainError,
    },
    #[error("failed to read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} {value:?}: {expected}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A path from the repository that cannot be opened inside its snapshot.
    #[error(transparent)]
    RepositoryPath(#[from] PathError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Prune(#[from] crate::cache::prune::PruneError),
    #[error(transparent)]
    BuildKit(#[from] BuildError),
    #[error(transparent)]
    BaseImage(#[from] BaseImageError),
    #[error("{message}")]
    Build { message: String },
    #[error("the server failed: {message}")]
    Server { message: String },
    /// A call to `runner serve` failed; the server's message says why.
    #[error("{message}")]
    Remote { code: tonic::Code, message: String },
    /// A change is not in a state that allows what was asked (it runs, or ran, elsewhere).
    #[error("change {id} is {state}: {hint}")]
    ChangeBusy {
        id: String,
        state: String,
        hint: String,
    },
    /// Only a change that ended in error or was cancelled runs again.
    #[error("change {id} ended {state}: only a change that ended in error or was cancelled can be retried")]
    NotRetryable { id: String, state: String },
    #[error("change {id} ended {state}: {reason}")]
    ChangeFailed {
        id: String,
        state: String,
        reason: String,
    },
    #[error("failed to prepare the data directory {path}: {source}")]
    Home {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<PolicyError> for Error {
    fn from(e: PolicyError) -> Error {
        Error::Policy(Box::new(e))
    }
}

/// What kind of failure, independent of where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named thing does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The input is wrong; retrying it unchanged will fail again.
    InvalidInput,
    /// The operator's policy does not allow it; the message names the setting that would.
    PermissionDenied,
    /// The state moved on (e.g. a properties version); re-read and retry.
    Conflict,
    /// A dependency (Docker daemon, store) does not answer.
    Unavailable,
    /// A bug or an unexpected environment failure.
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind::*;
        match self {
            Error::Store(StoreError::NotFound { .. }) => NotFound,
            Error::Store(StoreError::AlreadyExists { .. }) => AlreadyExists,
            Error::Store(StoreError::VersionConflict { .. }) => Conflict,
            Error::Store(StoreError::Open { .. } | StoreError::Connect { .. }) => Unavailable,
            Error::Store(StoreError::BadUrl { .. }) => InvalidInput,
            Error::Store(StoreError::TooLarge { .. }) => InvalidInput,
            Error::Store(StoreError::InUse { .. }) => Conflict,
            Error::Store(_) => Internal,
            Error::Secret(SecretError::NotFound { .. }) => NotFound,
            Error::Secret(SecretError::Io { .. } | SecretError::Corrupt { .. }) => Internal,
            Error::Secret(_) => InvalidInput,
            Error::Policy(e) if e.is_refusal() => PermissionDenied,
            Error::Policy(_) => InvalidInput,
            Error::Token(_) | Error::Refused { .. } => InvalidInput,
            Error::Patch(_) | Error::Document(_) | Error::InvalidProperties { .. } => InvalidInput,
            Error::ReadFile { .. } | Error::InvalidArgument { .. } => InvalidInput,
            Error::LogLimits(_) => InvalidInput,
            Error::Home { .. } => Unavailable,
            Error::Manifest(_) => InvalidInput,
            Error::ChangeFailed { .. } => Internal,
            Error::ChangeBusy { .. } | Error::NotRetryable { .. } => Conflict,
            Error::Snapshot(
                SnapshotError::UnknownRev { .. }
                | SnapshotError::NoRemote { .. }
                | SnapshotError::Malformed { .. }
                | SnapshotError::Symlink { .. },
            ) => InvalidInput,
            Error::Snapshot(SnapshotError::Fetch { problem, .. }) if problem.is_transient() => {
                Unavailable
            }
            Error::Snapshot(SnapshotError::Fetch { .. } | SnapshotError::Remote(_)) => InvalidInput,
            Error::Snapshot(_) => Internal,
            Error::RepositoryPath(PathError::Io { .. }) => Internal,
            Error::RepositoryPath(_) => InvalidInput,
            Error::Context(
                ContextError::Exists { .. } | ContextError::Env(_) | ContextError::User { .. },
            ) => InvalidInput,
            Error::Context(_) => Internal,
            Error::Prune(crate::cache::prune::PruneError::Docker { .. }) => Unavailable,
            Error::Prune(_) => Internal,
            Error::BuildKit(BuildError::DaemonUnreachable { .. })
            | Error::BaseImage(BaseImageError::Docker(_)) => Unavailable,
            Error::BuildKit(BuildError::Cancelled) => Internal,
            Error::BuildKit(_) | Error::Build { .. } => InvalidInput,
            Error::BaseImage(BaseImageError::Build {
                source: BuildError::DaemonUnreachable { .. },
                ..
            }) => Unavailable,
            Error::BaseImage(BaseImageError::SourceMissing { .. }) => NotFound,
            Error::BaseImage(_) => InvalidInput,
            Error::Server { .. } => Unavailable,
            Error::Remote { code, .. } => match code {
                tonic::Code::NotFound => NotFound,
                tonic::Code::AlreadyExists => AlreadyExists,
                tonic::Code::InvalidArgument => InvalidInput,
                tonic::Code::FailedPrecondition => Conflict,
                tonic::Code::PermissionDenied => PermissionDenied,
                tonic::Code::Unavailable | tonic::Code::Unauthenticated => Unavailable,
                _ => Internal,
            },
            Error::Executor(ExecutorError::Unavailable(_)) => Unavailable,
            Error::Executor(_) => Internal,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, skipping causes whose text the message already contains.
pub fn error_text(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl From<crate::snapshot::RemoteError> for Error {
    fn from(e: crate::snapshot::RemoteError) -> Error {
        Error::Snapshot(SnapshotError::Remote(e))
    }
}
