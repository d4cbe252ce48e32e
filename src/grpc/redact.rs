//! The one place gRPC answers that did not come from the (already masked) event log are masked: RunStep's
//! `step_result_json`, and error messages. Every secret value the server holds becomes `***`, whatever the
//! caller was granted. Only [`Redactor::text`] calls the masker, so swapping the masker changes one line.

use serde_json::Value;
use tonic::Status;

use crate::app::App;
use crate::mask::Masker;

/// Masks secret values out of what the API returns.
#[derive(Debug, Clone)]
pub struct Redactor {
    masker: Masker,
}

impl Redactor {
    /// A redactor for every secret in the data directory. If the secrets cannot be read, the caller must not
    /// answer with unmasked text: see [`Redactor::unavailable`].
    pub fn for_app(app: &App) -> Result<Redactor, crate::secrets::SecretError> {
        let mut values = Vec::new();
        for (name, _) in app.secrets.list()? {
            values.extend(app.secrets.get(&name)?.0.into_values());
        }
        Ok(Redactor::new(values.iter().map(String::as_str)))
    }

    /// Masks each value (and each line of a multi-line one: see [`Masker`]).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Redactor {
        Redactor {
            masker: Masker::new(values),
        }
    }

    /// What to answer when the secrets could not be read to mask with.
    pub fn unavailable(e: &crate::secrets::SecretError) -> Status {
        Status::internal(format!(
            "the answer could not be checked for secrets ({}), so it is withheld",
            crate::error::error_text(e)
        ))
    }

    pub fn text(&self, text: &str) -> String {
        self.masker.mask(text)
    }

    /// Masks every string and every object key inside `value`.
    pub fn json(&self, value: &Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.text(s)),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.json(v)).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (self.text(k), self.json(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// The same status with its message masked. Its error details are kept when they held nothing to mask;
    /// otherwise only the `ErrorInfo` reason survives (details are opaque bytes here, so none is masked in place).
    pub fn status(&self, status: Status) -> Status {
        use tonic_types::{ErrorDetails, StatusExt};
        let message = self.text(status.message());
        let details = status.get_error_details();
        let clean = message == status.message()
            && self.text(&format!("{details:?}")) == format!("{details:?}");
        if clean {
            return Status::with_details_and_metadata(
                status.code(),
                message,
                status.details().to_vec().into(),
                status.metadata().clone(),
            );
        }
        match details.error_info() {
            Some(info) => super::status::with_reason(
                status.code(),
                &info.reason,
                message,
                &[],
                ErrorDetails::new(),
            ),
            None => Status::new(status.code(), message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_keys_and_each_line_of_a_multiline_secret_are_masked() {
        let pem = "-----BEGIN KEY-----\nQUJDREVGR0hJSktMTU5PUFFS\n-----END KEY-----";
        let r = Redactor::new(["s3cret", pem]);
        assert_eq!(
            r.json(&json!({"a": "x s3cret y", "s3cret": [1, "s3cret"], "k": pem})),
            json!({"a": "x *** y", "***": [1, "***"], "k": "***"})
        );
        assert_eq!(r.text("line: QUJDREVGR0hJSktMTU5PUFFS"), "line: ***");
        let status = r.status(Status::invalid_argument("bad s3cret"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "bad ***");
    }
}
