//! The one place errors become gRPC statuses: a code that means what standard retry policies assume, a message a
//! person can act on (no CLI hints, no server paths), and the rich error model (`google.rpc.ErrorInfo` with a
//! stable `reason` in the `runner.v1` domain, `BadRequest` field violations, `PreconditionFailure` with what the
//! current state is).
//!
//! Codes: NOT_FOUND (the named resource does not exist), ALREADY_EXISTS, INVALID_ARGUMENT (the request is wrong:
//! retrying it unchanged fails again), FAILED_PRECONDITION (the state does not allow it: a version moved on, a
//! change that succeeded is retried, a remote is missing), PERMISSION_DENIED (the operator's policy), ABORTED (the
//! same request_id is being served right now: retry later), OUT_OF_RANGE (a cursor past the end), UNAVAILABLE
//! (transient: the Docker daemon, the network, a server shutting down; retry with backoff), INTERNAL.

use std::collections::HashMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{error_text, Error, ErrorKind};
use crate::snapshot::{FetchProblem, SnapshotError, Transport};
use crate::store::StoreError;

/// The `ErrorInfo.domain` of every error this API returns.
pub const DOMAIN: &str = "runner.v1";

/// A status with an `ErrorInfo{reason, domain: runner.v1, metadata}` and, optionally, more details.
pub fn with_reason(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: &[(&str, String)],
    mut details: ErrorDetails,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    details.set_error_info(reason, DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// INVALID_ARGUMENT with a `BadRequest` violation of `field`.
pub fn bad_field(reason: &str, field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let details = ErrorDetails::with_bad_request_violation(field, message.clone());
    with_reason(
        Code::InvalidArgument,
        reason,
        message,
        &[("field", field.to_owned())],
        details,
    )
}

/// INVALID_ARGUMENT for a required field left empty.
pub fn required(field: &str) -> Status {
    bad_field(
        "FIELD_REQUIRED",
        field,
        format!("{field} is required and was empty"),
    )
}

/// UNAVAILABLE for a stream the server ends because it shuts down: reconnect (to it or another) and resume.
pub fn shutting_down() -> Status {
    with_reason(
        Code::Unavailable,
        "SERVER_SHUTTING_DOWN",
        "the server is shutting down: reconnect and resume from the last sequence number received",
        &[],
        ErrorDetails::new(),
    )
}

fn code(err: &Error) -> Code {
    match err {
        Error::NotRetryable { .. } | Error::ChangeBusy { .. } => Code::FailedPrecondition,
        Error::Snapshot(SnapshotError::NoRemote { .. }) => Code::FailedPrecondition,
        // A local remote that cannot be read will not appear by retrying.
        Error::Snapshot(SnapshotError::Fetch { transport, .. })
            if *transport == Transport::Local =>
        {
            Code::FailedPrecondition
        }
        _ => match err.kind() {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::InvalidInput => Code::InvalidArgument,
            ErrorKind::Conflict => Code::FailedPrecondition,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        },
    }
}

fn fetch_problem(problem: &FetchProblem) -> &'static str {
    match problem {
        FetchProblem::NoCredential | FetchProblem::AuthRejected { .. } => "authentication",
        FetchProblem::UnknownHost { .. }
        | FetchProblem::HostKeyChanged { .. }
        | FetchProblem::HostKeyRevoked { .. } => "host key",
        FetchProblem::UntrustedCertificate { .. } => "TLS certificate",
        FetchProblem::Timeout { .. } => "timeout",
        FetchProblem::Cancelled => "cancelled",
        FetchProblem::Network { .. } => "network",
        FetchProblem::Git { .. } => "git",
    }
}

/// Reason, API message, metadata and details of an error.
fn describe(err: &Error) -> (String, String, Vec<(&'static str, String)>, ErrorDetails) {
    let none = ErrorDetails::new;
    match err {
        Error::Store(StoreError::NotFound { what, code, hint }) => (
            format!("{}_NOT_FOUND", what.to_ascii_uppercase().replace(' ', "_")),
            // The hint's where ("in project …") stays, its CLI advice (after ": ") goes.
            format!(
                "{what} {code:?} does not exist{}",
                hint.split(": ").next().unwrap_or_default()
            ),
            vec![("resource_type", (*what).to_owned()), ("name", code.clone())],
            none(),
        ),
        Error::Store(StoreError::AlreadyExists { what, code }) => (
            format!("{}_ALREADY_EXISTS", what.to_ascii_uppercase().replace(' ', "_")),
            format!("{what} {code:?} already exists"),
            vec![("resource_type", (*what).to_owned()), ("name", code.clone())],
            none(),
        ),
        Error::Store(StoreError::InUse { what, code, by }) => (
            format!("{}_IN_USE", what.to_ascii_uppercase()),
            error_text(err),
            vec![("resource_type", (*what).to_owned()), ("name", code.clone())],
            ErrorDetails::with_precondition_failure_violation(
                "IN_USE",
                code.clone(),
                format!("still used by {by}"),
            ),
        ),
        Error::Store(StoreError::VersionConflict {
            owner,
            expected,
            current,
        }) => (
            "VERSION_CONFLICT".into(),
            format!(
                "version conflict on the {owner} properties: expected version {expected}, but the current version is {current}; read them again and apply the change on top"
            ),
            vec![
                ("expected_version", expected.to_string()),
                ("current_version", current.to_string()),
            ],
            ErrorDetails::with_precondition_failure_violation(
                "VERSION",
                owner.clone(),
                format!("the current version is {current}"),
            ),
        ),
        Error::Store(StoreError::TooLarge { limit, .. }) => (
            "PROPERTIES_TOO_LARGE".into(),
            error_text(err),
            vec![("limit_bytes", limit.to_string())],
            ErrorDetails::with_bad_request_violation("document_json", error_text(err)),
        ),
        Error::Store(StoreError::Open { .. }) | Error::Home { .. } => (
            "STORE_UNAVAILABLE".into(),
            "the server's store cannot be opened".into(),
            vec![],
            none(),
        ),
        Error::Secret(crate::secrets::SecretError::NotFound { .. }) => {
            ("SECRET_NOT_FOUND".into(), error_text(err), vec![], none())
        }
        Error::Policy(p) if p.is_refusal() => {
            ("POLICY_REFUSED".into(), error_text(err), vec![], none())
        }
        Error::Patch(_) => (
            "INVALID_PATCH".into(),
            error_text(err),
            vec![],
            ErrorDetails::with_bad_request_violation("patch_json", error_text(err)),
        ),
        Error::Document(_) | Error::InvalidProperties { .. } => {
            ("INVALID_DOCUMENT".into(), error_text(err), vec![], none())
        }
        Error::InvalidArgument { what, .. } => (
            "INVALID_ARGUMENT".into(),
            error_text(err),
            vec![("field", (*what).to_owned())],
            ErrorDetails::with_bad_request_violation(*what, error_text(err)),
        ),
        Error::Manifest(crate::actions::ManifestError::UnknownAction { action, known, .. }) => (
            "ACTION_NOT_FOUND".into(),
            format!("action {action:?} is not defined in the repository's manifest; defined actions: {known}"),
            vec![("action", action.clone())],
            ErrorDetails::with_bad_request_violation("action", format!("{action:?} is not defined")),
        ),
        Error::Manifest(_) => ("INVALID_MANIFEST".into(), error_text(err), vec![], none()),
        Error::Snapshot(SnapshotError::UnknownRev { rev, .. }) => (
            "REVISION_NOT_FOUND".into(),
            format!("revision {rev:?} does not exist in the repository: use a branch, tag or commit SHA of it"),
            vec![("git_rev", rev.clone())],
            ErrorDetails::with_bad_request_violation("git_rev", format!("{rev:?} does not exist")),
        ),
        Error::Snapshot(SnapshotError::NoRemote { project }) => (
            "NO_GIT_REMOTE".into(),
            format!("project {project:?} has no git remote: set one with SetGitRemote"),
            vec![("project", project.clone())],
            ErrorDetails::with_precondition_failure_violation(
                "GIT_REMOTE",
                format!("projects/{project}"),
                "the project has no git remote",
            ),
        ),
        Error::Snapshot(SnapshotError::Fetch {
            remote,
            transport,
            problem,
        }) => (
            if *transport == Transport::Local {
                "REMOTE_NOT_READABLE".into()
            } else if problem.is_transient() {
                "REMOTE_UNAVAILABLE".into()
            } else {
                "REMOTE_FETCH_FAILED".into()
            },
            format!(
                "fetching {remote} over {transport} failed ({}); the server's log has the details",
                fetch_problem(problem)
            ),
            vec![
                ("remote", remote.clone()),
                ("problem", fetch_problem(problem).to_owned()),
            ],
            none(),
        ),
        Error::ChangeBusy { id, state, .. } => (
            "CHANGE_BUSY".into(),
            format!("change {id} is {state}: it is already running (another retry or run holds it)"),
            vec![("change", id.clone()), ("state", state.clone())],
            ErrorDetails::with_precondition_failure_violation(
                "STATE",
                format!("changes/{id}"),
                format!("the change is {state}"),
            ),
        ),
        Error::NotRetryable { id, state } => (
            "CHANGE_NOT_RETRYABLE".into(),
            error_text(err),
            vec![("change", id.clone()), ("state", state.clone())],
            ErrorDetails::with_precondition_failure_violation(
                "STATE",
                format!("changes/{id}"),
                format!("the change ended {state}; only error or cancelled can be retried"),
            ),
        ),
        Error::ReadFile { .. } => (
            "READ_FAILED".into(),
            "the server failed to read a file it needs; its log has the details".into(),
            vec![],
            none(),
        ),
        Error::Executor(crate::executor::ExecutorError::Unavailable(_))
        | Error::BuildKit(crate::buildkit::BuildError::DaemonUnreachable { .. }) => (
            "DOCKER_UNAVAILABLE".into(),
            "the Docker daemon does not answer; retry later".into(),
            vec![],
            none(),
        ),
        _ => {
            let reason = match err.kind() {
                ErrorKind::NotFound => "NOT_FOUND",
                ErrorKind::AlreadyExists => "ALREADY_EXISTS",
                ErrorKind::InvalidInput => "INVALID_ARGUMENT",
                ErrorKind::Conflict => "FAILED_PRECONDITION",
                ErrorKind::PermissionDenied => "PERMISSION_DENIED",
                ErrorKind::Unavailable => "UNAVAILABLE",
                ErrorKind::Internal => "INTERNAL",
            };
            (reason.into(), error_text(err), vec![], none())
        }
    }
}

pub fn status(err: &Error) -> Status {
    let (reason, message, metadata, details) = describe(err);
    with_reason(code(err), &reason, message, &metadata, details)
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        status(&err)
    }
}

/// The `ErrorInfo.reason` of a status (empty when it has none), for clients and tests.
pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_codes_and_reasons() {
        let conflict: Error = StoreError::VersionConflict {
            owner: "project \"p\"".into(),
            expected: 1,
            current: 2,
        }
        .into();
        let s = status(&conflict);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("expected version 1"));
        assert_eq!(reason(&s), "VERSION_CONFLICT");
        let details = s.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.domain, "runner.v1");
        assert_eq!(info.metadata["current_version"], "2");
        let violation = &details.precondition_failure().unwrap().violations[0];
        assert_eq!(violation.description, "the current version is 2");

        let missing: Error = StoreError::NotFound {
            what: "project",
            code: "x".into(),
            hint: ": list projects with `runner project list`".into(),
        }
        .into();
        let s = status(&missing);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(reason(&s), "PROJECT_NOT_FOUND");
        assert!(!s.message().contains("runner "), "{}", s.message());

        let bad = Error::InvalidArgument {
            what: "w",
            value: "v".into(),
            expected: "e",
        };
        let s = status(&bad);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.get_error_details()
                .bad_request()
                .unwrap()
                .field_violations[0]
                .field,
            "w"
        );

        let down: Error = crate::executor::ExecutorError::Unavailable("no daemon".into()).into();
        assert_eq!(status(&down).code(), Code::Unavailable);
        assert_eq!(reason(&status(&down)), "DOCKER_UNAVAILABLE");

        let no_remote: Error = SnapshotError::NoRemote {
            project: "p".into(),
        }
        .into();
        assert_eq!(status(&no_remote).code(), Code::FailedPrecondition);
        // A local remote that cannot be read is not transient: standard retry policies must not retry it.
        let unreadable: Error = SnapshotError::Fetch {
            remote: "/srv/git/missing.git".into(),
            transport: Transport::Local,
            problem: Box::new(FetchProblem::Network {
                message: "failed to resolve path".into(),
            }),
        }
        .into();
        assert_eq!(status(&unreadable).code(), Code::FailedPrecondition);
        assert_eq!(reason(&status(&unreadable)), "REMOTE_NOT_READABLE");
        let away: Error = SnapshotError::Fetch {
            remote: "https://git.example.com/a.git".into(),
            transport: Transport::Https,
            problem: Box::new(FetchProblem::Network {
                message: "connection refused".into(),
            }),
        }
        .into();
        assert_eq!(status(&away).code(), Code::Unavailable);
        let done = Error::NotRetryable {
            id: "c".into(),
            state: "success".into(),
        };
        assert_eq!(status(&done).code(), Code::FailedPrecondition);
        assert_eq!(reason(&status(&done)), "CHANGE_NOT_RETRYABLE");
    }
}
