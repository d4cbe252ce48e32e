//! The HTML pages, one file each: the changes list, one change, one step, properties, projects and environments.

pub mod change;
pub mod changes;
pub mod diff;
pub mod projects;
pub mod properties;
pub mod step;

use crate::app::App;
use crate::error::error_text;
use crate::mask::Masker;

use super::error::PageError;

/// Every secret value the server holds, to mask what a page shows (properties, reasons, log lines already are).
/// If the secrets cannot be read, the page is withheld rather than shown unmasked.
pub fn masker(app: &App) -> Result<Masker, PageError> {
    let withheld = |e: crate::secrets::SecretError| PageError::Withheld(error_text(&e));
    let mut values = Vec::new();
    for (name, _) in app.secrets.list().map_err(withheld)? {
        values.extend(app.secrets.get(&name).map_err(withheld)?.0.into_values());
    }
    Ok(Masker::new(values))
}

/// A JSON value with every secret masked: every string and key, walked (so a value with quotes or line breaks is
/// caught as it is, not as JSON escapes it).
pub fn masked_json(masker: &Masker, value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    if masker.is_empty() {
        return value.clone();
    }
    match value {
        Value::String(s) => Value::String(masker.mask(s)),
        Value::Array(items) => Value::Array(items.iter().map(|v| masked_json(masker, v)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (masker.mask(k), masked_json(masker, v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_strings_and_keys_of_json() {
        let masker = Masker::new(["hunter2", "say \"hi\""]);
        let value = serde_json::json!({"a": ["x hunter2 y", {"hunter2": 1}], "b": "say \"hi\""});
        let text = masked_json(&masker, &value).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("x *** y") && !text.contains("hi"), "{text}");
    }
}
