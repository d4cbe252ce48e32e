//! Conflict detection for parallel steps: two siblings start from the same properties version; the second one to
//! finish must not overwrite what the first changed.

use json_patch::PatchOperation;
use serde_json::Value;

use super::Patch;

/// A new patch touches a location an already-applied patch changed since the common base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Pairs of (location the new patch touches, location changed since the base) that overlap.
    pub overlaps: Vec<(String, String)>,
}

/// The locations an operation writes (and, for `test`/`copy`/`move`, reads), as JSON pointers.
///
/// Array element paths are widened to the array itself: inserting at index 0 shifts every other element, so
/// "different indexes" is no guarantee of independence.
pub fn touched_paths(base: &Value, op: &PatchOperation) -> Vec<String> {
    use PatchOperation::*;
    let raw: Vec<String> = match op {
        Add(o) => vec![o.path.to_string()],
        Remove(o) => vec![o.path.to_string()],
        Replace(o) => vec![o.path.to_string()],
        Move(o) => vec![o.from.to_string(), o.path.to_string()],
        Copy(o) => vec![o.from.to_string(), o.path.to_string()],
        Test(o) => vec![o.path.to_string()],
    };
    raw.into_iter()
        .map(|p| widen_array_paths(base, &p))
        .collect()
}

fn tokens(pointer: &str) -> Vec<&str> {
    if pointer.is_empty() {
        vec![]
    } else {
        pointer[1..].split('/').collect()
    }
}

/// Cuts a pointer at the first array it passes through in `base` (or at `-`, or a numeric token whose
/// container does not exist yet).
fn widen_array_paths(base: &Value, pointer: &str) -> String {
    let mut current = Some(base);
    let mut kept = String::new();
    for token in tokens(pointer) {
        if matches!(current, Some(Value::Array(_))) || token == "-" {
            return kept;
        }
        kept.push('/');
        kept.push_str(token);
        let key = token.replace("~1", "/").replace("~0", "~");
        current = current.and_then(|v| v.get(key.as_str()));
    }
    kept
}

fn overlaps(a: &str, b: &str) -> bool {
    let (a, b) = (tokens(a), tokens(b));
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// Whether `new_patch`, computed against `base`, touches anything `applied` (patches applied since `base`,
/// in order) changed. `None` means it can be applied on top of them safely.
pub fn detect_conflict(base: &Value, applied: &[Patch], new_patch: &Patch) -> Option<Conflict> {
    let changed: Vec<String> = applied
        .iter()
        .flat_map(|p| p.0.iter())
        .filter(|op| !matches!(op, PatchOperation::Test(_)))
        .flat_map(|op| touched_paths(base, op))
        .collect();
    let mut found = vec![];
    for new in new_patch.0.iter().flat_map(|op| touched_paths(base, op)) {
        for old in changed.iter().filter(|old| overlaps(&new, old)) {
            found.push((new.clone(), old.clone()));
        }
    }
    let overlaps = found;
    (!overlaps.is_empty()).then_some(Conflict { overlaps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(v: Value) -> Patch {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn disjoint_keys_do_not_conflict() {
        let base = json!({"a": {"x": 1}, "b": {"y": 1}});
        let applied = [patch(
            json!([{"op": "replace", "path": "/a/x", "value": 2}]),
        )];
        let new = patch(json!([{"op": "add", "path": "/b/z", "value": 3}]));
        assert_eq!(detect_conflict(&base, &applied, &new), None);
    }

    #[test]
    fn same_key_parent_or_child_conflicts() {
        let base = json!({"a": {"x": 1}});
        let applied = [patch(
            json!([{"op": "replace", "path": "/a/x", "value": 2}]),
        )];
        for path in ["/a/x", "/a", "/a/x/deeper"] {
            let new = patch(json!([{"op": "add", "path": path, "value": 3}]));
            let c = detect_conflict(&base, &applied, &new).expect(path);
            assert_eq!(c.overlaps[0].1, "/a/x");
        }
    }

    #[test]
    fn array_elements_conflict_with_any_change_of_that_array() {
        let base = json!({"list": [1, 2, 3]});
        let applied = [patch(json!([{"op": "add", "path": "/list/0", "value": 0}]))];
        let new = patch(json!([{"op": "replace", "path": "/list/2", "value": 9}]));
        assert!(detect_conflict(&base, &applied, &new).is_some());
        let new_list = patch(json!([{"op": "add", "path": "/other/-", "value": 9}]));
        assert!(detect_conflict(&base, &applied, &new_list).is_none());
    }

    #[test]
    fn move_source_counts_as_changed() {
        let base = json!({"a": 1, "b": 2});
        let applied = [patch(json!([{"op": "move", "from": "/a", "path": "/c"}]))];
        let new = patch(json!([{"op": "test", "path": "/a", "value": 1}]));
        assert!(detect_conflict(&base, &applied, &new).is_some());
    }
}
