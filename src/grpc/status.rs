//! The one place core errors become gRPC statuses, with messages a person can act on.

use tonic::{Code, Status};

use crate::error::{error_text, Error, ErrorKind};

pub fn status(err: &Error) -> Status {
    let code = match err.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidInput => Code::InvalidArgument,
        ErrorKind::Conflict => Code::FailedPrecondition,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, error_text(err))
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        status(&err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn kinds_map_to_codes() {
        let conflict: Error = StoreError::VersionConflict {
            owner: "project \"p\"".into(),
            expected: 1,
            current: 2,
        }
        .into();
        assert_eq!(status(&conflict).code(), Code::FailedPrecondition);
        assert!(status(&conflict).message().contains("expected version 1"));
        let missing: Error = StoreError::NotFound {
            what: "project",
            code: "x".into(),
            hint: String::new(),
        }
        .into();
        assert_eq!(status(&missing).code(), Code::NotFound);
        let bad = Error::InvalidArgument {
            what: "w",
            value: "v".into(),
            expected: "e",
        };
        assert_eq!(status(&bad).code(), Code::InvalidArgument);
        let down: Error = crate::executor::ExecutorError::Unavailable("no daemon".into()).into();
        assert_eq!(status(&down).code(), Code::Unavailable);
    }
}
