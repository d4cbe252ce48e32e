//! The difference between two versions of a properties document as the paths that changed — exactly those —
//! each with its old and new value.

use maud::{html, Markup};
use serde_json::Value;

/// One changed path.
#[derive(Debug, Clone, PartialEq)]
pub struct Changed {
    /// `add`, `remove` or `replace`.
    pub op: String,
    /// A JSON pointer (RFC 6901).
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// What changed from `left` to `right`, in document order.
pub fn changed_paths(left: &Value, right: &Value) -> Vec<Changed> {
    json_patch::diff(left, right)
        .0
        .iter()
        .filter_map(|op| {
            let op = serde_json::to_value(op).ok()?;
            let path = op.get("path")?.as_str()?.to_owned();
            let kind = op.get("op")?.as_str()?.to_owned();
            Some(Changed {
                old: (kind != "add")
                    .then(|| left.pointer(&path).cloned())
                    .flatten(),
                new: op.get("value").cloned(),
                op: kind,
                path,
            })
        })
        .collect()
}

fn value_text(value: &Option<Value>) -> String {
    value
        .as_ref()
        .map(|v| serde_json::to_string(v).unwrap_or_default())
        .unwrap_or_default()
}

/// The changed paths as a table (`caption` says between what).
pub fn table(caption: &str, changes: &[Changed]) -> Markup {
    html! {
        @if changes.is_empty() {
            p.diff-empty { (caption) ": no change." }
        } @else {
            div.table-wrap {
                table.diff {
                    caption { (caption) }
                    thead { tr { th scope="col" { "Change" } th scope="col" { "Path" } th scope="col" { "Before" } th scope="col" { "After" } } }
                    tbody {
                        @for c in changes {
                            tr data-path=(c.path) {
                                td.op { (c.op) }
                                td.path { code { (c.path) } }
                                td { code { (value_text(&c.old)) } }
                                td { code { (value_text(&c.new)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exactly_the_changed_paths_with_old_and_new_values() {
        let left = json!({"a": 1, "keep": {"x": true}, "gone": "bye", "nested": {"v": "1.0"}});
        let right = json!({"a": 2, "keep": {"x": true}, "nested": {"v": "1.1", "new": [1]}});
        let mut paths: Vec<(String, String)> = changed_paths(&left, &right)
            .into_iter()
            .map(|c| (c.op, c.path))
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                ("add".to_owned(), "/nested/new".to_owned()),
                ("remove".to_owned(), "/gone".to_owned()),
                ("replace".to_owned(), "/a".to_owned()),
                ("replace".to_owned(), "/nested/v".to_owned()),
            ]
        );
        let a = changed_paths(&left, &right)
            .into_iter()
            .find(|c| c.path == "/a")
            .unwrap();
        assert_eq!((a.old, a.new), (Some(json!(1)), Some(json!(2))));
        assert!(changed_paths(&left, &left).is_empty());
    }
}
