//! Bearer tokens: one rule for every source (`--token-file`, `RUNNER_TOKEN`, the client's `--token`) — an empty or
//! blank token is refused with the same message, never taken as "no authentication" — and a constant-time check
//! of what callers send.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("an empty or blank token is refused: use a non-blank token (e.g. `openssl rand -hex 32`) in the --token-file, RUNNER_TOKEN or --token")]
    Blank,
    #[error("the token holds a character that cannot travel in an HTTP header: use visible ASCII characters only (e.g. `openssl rand -hex 32`)")]
    NotVisibleAscii,
}

/// A bearer token that is neither empty nor blank, trimmed (a token file's final newline is not part of it).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    pub fn new(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Blank);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotVisibleAscii);
        }
        Ok(Token(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this token, in time independent of where they differ (and of their lengths: both are
    /// hashed first).
    pub fn matches(&self, given: &str) -> bool {
        let expected = Sha256::digest(self.0.as_bytes());
        let given = Sha256::digest(given.as_bytes());
        expected.ct_eq(&given).into()
    }
}

/// Checks `authorization: Bearer <token>` on every call it guards.
#[derive(Clone)]
pub struct Auth {
    pub expected: Option<Token>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        if expected.matches(given) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the bearer token is not valid for this server",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn empty_and_blank_tokens_are_refused_with_one_message() {
        for blank in ["", " ", "\n", "\t \r\n"] {
            assert_eq!(Token::new(blank), Err(TokenError::Blank), "{blank:?}");
        }
        assert_eq!(Token::new("a b"), Err(TokenError::NotVisibleAscii));
        assert_eq!(Token::new("tökén"), Err(TokenError::NotVisibleAscii));
        assert_eq!(Token::new(" s3cret\n").unwrap().as_str(), "s3cret");
        assert_eq!(format!("{:?}", Token::new("s3cret").unwrap()), "Token(…)");
    }

    #[test]
    fn only_the_exact_token_passes() {
        let token = Token::new("s3cret").unwrap();
        assert!(token.matches("s3cret"));
        for wrong in ["", "s3cre", "s3cret2", "S3CRET", "x"] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
        let mut auth = Auth {
            expected: Some(token),
        };
        let call = |auth: &mut Auth, header: Option<&str>| {
            let mut request = Request::new(());
            if let Some(h) = header {
                request
                    .metadata_mut()
                    .insert("authorization", h.parse().unwrap());
            }
            auth.call(request).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        for bad in [
            None,
            Some("Bearer "),
            Some("Bearer  "),
            Some("Bearer nope"),
            Some("s3cret"),
        ] {
            assert_eq!(
                call(&mut auth, bad),
                Err(tonic::Code::Unauthenticated),
                "{bad:?}"
            );
        }
    }
}
