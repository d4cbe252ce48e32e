//! The rules every properties write obeys, whoever writes: a CLI or API write by a project admin and a step's
//! patch are checked by the same [`validate_document`]. On top, [`step_may_write`] keeps the keys that choose
//! secrets out of a step's reach: repository code must never grant itself secrets.

use serde_json::Value;

use super::opschain::{validate_opschain, OpschainError, SecretKind};

#[derive(Debug, thiserror::Error)]
pub enum DocumentRuleError {
    #[error("properties must be a JSON object, found {found}")]
    NotAnObject { found: String },
    #[error(transparent)]
    Opschain(#[from] OpschainError),
}

/// A storable properties document: a JSON object whose `opschain` section is valid.
pub fn validate_document(document: &Value) -> Result<(), DocumentRuleError> {
    if !document.is_object() {
        return Err(DocumentRuleError::NotAnObject {
            found: excerpt(document),
        });
    }
    validate_opschain(document)?;
    Ok(())
}

/// The `opschain` keys only a project admin may write (never a step's patch): the secret lists.
pub const ADMIN_ONLY_KEYS: [&str; 2] = [SecretKind::Build.key(), SecretKind::Runner.key()];

/// `Err(key)` when `after` differs from `before` in a key a step may not change (`opschain.env:build_secrets`,
/// `opschain.env:runner_secrets`), however the patch got there (`add`, `replace`, `remove`, `move`, `copy`, or
/// replacing `/opschain` or the whole document).
pub fn step_may_write(before: &Value, after: &Value) -> Result<(), &'static str> {
    for key in ADMIN_ONLY_KEYS {
        let pointer = format!("/opschain/{key}");
        if before.pointer(&pointer) != after.pointer(&pointer) {
            return Err(key);
        }
    }
    Ok(())
}

/// The first characters of a JSON value, for error messages.
pub fn excerpt(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_must_be_objects_with_a_valid_opschain_section() {
        assert!(validate_document(&json!({"a": 1})).is_ok());
        for bad in [json!([1, 2]), json!(null), json!("x"), json!(3)] {
            let e = validate_document(&bad).unwrap_err();
            assert!(matches!(e, DocumentRuleError::NotAnObject { .. }), "{bad}");
            assert!(e
                .to_string()
                .starts_with("properties must be a JSON object, found"));
        }
        let e = validate_document(&json!({"opschain": {"env:runner_secrets": "all"}})).unwrap_err();
        assert!(matches!(e, DocumentRuleError::Opschain(_)), "{e}");
        assert_eq!(excerpt(&json!("x".repeat(100))).chars().count(), 61);
    }

    #[test]
    fn a_step_may_not_change_the_secret_lists_by_any_route() {
        let before = json!({"a": 1, "opschain": {"env:runner_secrets": ["ok"], "env": {"A": "1"}}});
        let same = json!({"a": 2, "opschain": {"env:runner_secrets": ["ok"], "env": {"A": "2"}}});
        assert!(step_may_write(&before, &same).is_ok());
        let added = json!({"a": 1, "opschain": {"env:runner_secrets": ["ok", "db"]}});
        assert_eq!(step_may_write(&before, &added), Err("env:runner_secrets"));
        let removed = json!({"a": 1, "opschain": {}});
        assert_eq!(step_may_write(&before, &removed), Err("env:runner_secrets"));
        let build =
            json!({"a": 1, "opschain": {"env:runner_secrets": ["ok"], "env:build_secrets": []}});
        assert_eq!(step_may_write(&before, &build), Err("env:build_secrets"));
        assert_eq!(
            step_may_write(&before, &json!({})),
            Err("env:runner_secrets")
        );
        assert!(step_may_write(&json!({}), &json!({"opschain": {"env": {}}})).is_ok());
    }
}
