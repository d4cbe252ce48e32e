//! The one place the web's failures become HTTP answers: a status from the error's kind and a page that says
//! what is wrong and what to do. Nothing here panics; every message is masked by the caller's masker upstream
//! (store and core errors carry no secret values).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::layout;
use crate::error::{error_text, Error, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Core(#[from] Error),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    /// The secrets could not be read to mask the answer with, so it is withheld.
    #[error("the page could not be checked for secrets ({0}), so it is withheld")]
    Withheld(String),
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        PageError::Core(e.into())
    }
}

impl PageError {
    pub fn status(&self) -> StatusCode {
        match self {
            PageError::Core(e) => match e.kind() {
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::AlreadyExists | ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
                ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
                ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
            PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PageError::Forbidden(_) => StatusCode::FORBIDDEN,
            PageError::Withheld(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %error_text(&self), "web request failed");
        }
        (status, layout::error_page(status, &error_text(&self))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_statuses() {
        let missing: Error = crate::store::StoreError::NotFound {
            what: "change",
            code: "x".into(),
            hint: String::new(),
        }
        .into();
        assert_eq!(PageError::Core(missing).status(), StatusCode::NOT_FOUND);
        let busy = Error::ChangeBusy {
            id: "c".into(),
            state: "running".into(),
            hint: String::new(),
        };
        assert_eq!(PageError::Core(busy).status(), StatusCode::CONFLICT);
        assert_eq!(
            PageError::BadRequest("x".into()).status(),
            StatusCode::BAD_REQUEST
        );
    }
}
