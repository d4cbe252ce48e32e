//! Parsing and applying RFC 6902 patches, with errors that say which operation and which path failed.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

use super::Patch;

/// A JSON document that could not be read; `line`/`column` point at the problem.
#[derive(Debug, thiserror::Error)]
#[error("{what}, line {line}, column {column}: {message}")]
pub struct DocumentError {
    pub what: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl DocumentError {
    fn from_serde(what: &str, err: &serde_json::Error) -> Self {
        // serde_json appends " at line L column C" to its messages; we report those separately.
        let full = err.to_string();
        let detail = match full.rfind(" at line ") {
            Some(at) => full[..at].to_owned(),
            None => full,
        };
        let message = match err.classify() {
            serde_json::error::Category::Data => detail,
            _ => format!("invalid JSON: {detail}"),
        };
        DocumentError {
            what: what.to_owned(),
            line: err.line(),
            column: err.column(),
            message,
        }
    }
}

/// Why a patch could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error(transparent)]
    Syntax(#[from] DocumentError),
    #[error("{what}: operation {index} is malformed: {message}")]
    Malformed {
        what: String,
        index: usize,
        message: String,
    },
    #[error("operation {index} ({op} {path}) does not apply: {reason}")]
    DoesNotApply {
        index: usize,
        op: String,
        path: String,
        reason: String,
    },
}

/// Parses a JSON document, naming `what` (e.g. the file) in the error.
pub fn parse_document(what: &str, text: &str) -> Result<Value, DocumentError> {
    serde_json::from_str(text).map_err(|e| DocumentError::from_serde(what, &e))
}

/// Parses an RFC 6902 patch from its text. Stricter than plain deserialisation: an operation object that repeats a
/// member (e.g. two `op`s) is rejected, as RFC 6902 §4 requires, which a map-based parse would silently collapse.
pub fn parse_patch(what: &str, text: &str) -> Result<Patch, PatchError> {
    let ops: Vec<StrictObject> = serde_json::from_str(text).map_err(|e| {
        let mut err = DocumentError::from_serde(what, &e);
        if e.is_data() {
            err.message = format!(
                "not an RFC 6902 patch (a JSON array of operations): {}",
                err.message
            );
        }
        err
    })?;
    let mut parsed = Vec::with_capacity(ops.len());
    for (index, StrictObject(object)) in ops.into_iter().enumerate() {
        if let Some(Value::Null) = object.get("path") {
            return Err(PatchError::Malformed {
                what: what.to_owned(),
                index,
                message: "`path` must be a JSON pointer string, not null".into(),
            });
        }
        let op =
            serde_json::from_value(Value::Object(object)).map_err(|e| PatchError::Malformed {
                what: what.to_owned(),
                index,
                message: e.to_string(),
            })?;
        parsed.push(op);
    }
    Ok(json_patch::Patch(parsed))
}

/// Applies `patch` to a copy of `doc`; all operations apply or none do.
pub fn apply_patch(doc: &Value, patch: &Patch) -> Result<Value, PatchError> {
    let mut out = doc.clone();
    json_patch::patch(&mut out, patch).map_err(|e| {
        let op = &patch.0[e.operation];
        PatchError::DoesNotApply {
            index: e.operation,
            op: op_name(op).to_owned(),
            path: op.path().to_string(),
            reason: reason(&e.kind),
        }
    })?;
    Ok(out)
}

fn reason(kind: &json_patch::PatchErrorKind) -> String {
    use json_patch::PatchErrorKind::*;
    match kind {
        TestFailed => "the `test` value does not match the document".into(),
        InvalidFromPointer => "the `from` location does not exist in the document".into(),
        InvalidPointer => {
            "the path does not exist in the document (or its parent does not, or an array index is out of range)"
                .into()
        }
        CannotMoveInsideItself => "a value cannot be moved inside itself".into(),
        other => other.to_string(),
    }
}

/// The RFC 6902 patch that turns `before` into `after`.
pub fn diff(before: &Value, after: &Value) -> Patch {
    json_patch::diff(before, after)
}

pub(crate) fn op_name(op: &json_patch::PatchOperation) -> &'static str {
    use json_patch::PatchOperation::*;
    match op {
        Add(_) => "add",
        Remove(_) => "remove",
        Replace(_) => "replace",
        Move(_) => "move",
        Copy(_) => "copy",
        Test(_) => "test",
    }
}

/// A JSON object that refuses duplicate member names.
struct StrictObject(Map<String, Value>);

impl<'de> de::Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a patch operation object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
                let mut map = Map::new();
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if map.contains_key(&key) {
                        return Err(de::Error::custom(format!(
                            "operation has two `{key}` members"
                        )));
                    }
                    map.insert(key, value);
                }
                Ok(StrictObject(map))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<StrictObject, A::Error> {
                Err(de::Error::custom(
                    "expected an operation object, found an array",
                ))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicate_member_is_rejected() {
        let err =
            parse_patch("p", r#"[{"op":"add","path":"/a","op":"remove","value":1}]"#).unwrap_err();
        assert!(err.to_string().contains("two `op` members"), "{err}");
    }

    #[test]
    fn failed_apply_names_operation_and_path_and_leaves_doc() {
        let doc = json!({"a": 1});
        let patch = parse_patch(
            "p",
            r#"[{"op":"add","path":"/b","value":2},{"op":"remove","path":"/nope"}]"#,
        )
        .unwrap();
        let err = apply_patch(&doc, &patch).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("operation 1 (remove /nope)"), "{text}");
        assert_eq!(doc, json!({"a": 1}));
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = parse_document("props.json", "{\n  \"a\": 1,\n}").unwrap_err();
        assert_eq!((err.line, err.column), (3, 1));
        assert!(err
            .to_string()
            .starts_with("props.json, line 3, column 1: invalid JSON: trailing comma"));
    }

    #[test]
    fn diff_round_trips() {
        let a = json!({"x": {"y": [1, 2]}, "k": "v"});
        let b = json!({"x": {"y": [1, 3], "z": true}});
        assert_eq!(apply_patch(&a, &diff(&a, &b)).unwrap(), b);
    }
}
