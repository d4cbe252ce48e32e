//! `opschain-properties get|set|delete --scope project|environment POINTER [JSON]`: edits the step's copies of
//! the properties (the files `$RUNNER_PROJECT_PROPERTIES` / `$RUNNER_ENVIRONMENT_PROPERTIES`), which the agent
//! diffs into `step_result.json` when the action ends.

use serde_json::Value;

const USAGE: &str =
    "usage: opschain-properties get|set|delete --scope project|environment POINTER [JSON]";

pub fn main(args: &[String]) -> Result<u8, String> {
    let mut scope = None;
    let mut rest = vec![];
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--scope" => scope = iter.next().cloned(),
            s if s.starts_with("--scope=") => scope = Some(s["--scope=".len()..].to_owned()),
            _ => rest.push(arg.clone()),
        }
    }
    let variable = match scope.as_deref() {
        Some("project") => "RUNNER_PROJECT_PROPERTIES",
        Some("environment") => "RUNNER_ENVIRONMENT_PROPERTIES",
        Some(other) => {
            return Err(format!(
                "unknown scope {other:?}: use project or environment"
            ))
        }
        None => return Err(format!("--scope is required\n{USAGE}")),
    };
    let path = std::env::var(variable)
        .map_err(|_| format!("{variable} is not set: run this inside a step"))?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut doc: Value =
        serde_json::from_str(&text).map_err(|e| format!("{path} is not valid JSON: {e}"))?;
    let (verb, pointer) = match rest.as_slice() {
        [verb, pointer, ..] => (verb.as_str(), pointer.as_str()),
        _ => return Err(USAGE.into()),
    };
    match (verb, rest.get(2)) {
        ("get", None) => {
            let value = doc.pointer(pointer).ok_or_else(|| {
                format!("{pointer} is not set in the {} properties", scope.unwrap())
            })?;
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("a Value serialises")
            );
            return Ok(0);
        }
        ("set", Some(raw)) => {
            // A JSON argument is taken as JSON; anything else as a plain string.
            let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()));
            set(&mut doc, pointer, value)?;
        }
        ("delete", None) => delete(&mut doc, pointer)?,
        _ => return Err(USAGE.into()),
    }
    let bytes = serde_json::to_vec_pretty(&doc).expect("a Value serialises");
    std::fs::write(&path, bytes).map_err(|e| format!("cannot write {path}: {e}"))?;
    Ok(0)
}

fn tokens(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(vec![]);
    }
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| format!("{pointer:?} is not a JSON pointer: start it with /"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// Sets the value at `pointer`, creating missing objects on the way; `-` appends to an array.
pub fn set(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let tokens = tokens(pointer)?;
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    let mut current = doc;
    for token in parents {
        current = match current {
            Value::Object(map) => map
                .entry(token.clone())
                .or_insert_with(|| Value::Object(Default::default())),
            Value::Array(items) => {
                let index: usize = token
                    .parse()
                    .map_err(|_| format!("{token:?} is not an array index in {pointer}"))?;
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("index {index} is out of range in {pointer}"))?
            }
            _ => {
                return Err(format!(
                    "{pointer} goes through a value that is neither object nor array"
                ))
            }
        };
        if current.is_null() {
            *current = Value::Object(Default::default());
        }
    }
    match current {
        Value::Object(map) => {
            map.insert(last.clone(), value);
        }
        Value::Array(items) if last == "-" => items.push(value),
        Value::Array(items) => {
            let index: usize = last
                .parse()
                .map_err(|_| format!("{last:?} is not an array index in {pointer}"))?;
            match index.cmp(&items.len()) {
                std::cmp::Ordering::Less => items[index] = value,
                std::cmp::Ordering::Equal => items.push(value),
                std::cmp::Ordering::Greater => {
                    return Err(format!("index {index} is out of range in {pointer}"))
                }
            }
        }
        _ => {
            return Err(format!(
                "the parent of {pointer} is neither object nor array"
            ))
        }
    }
    Ok(())
}

pub fn delete(doc: &mut Value, pointer: &str) -> Result<(), String> {
    let tokens = tokens(pointer)?;
    let Some((last, parents)) = tokens.split_last() else {
        return Err("cannot delete the whole document".into());
    };
    let parent_pointer: String = parents
        .iter()
        .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
        .collect();
    let missing = || format!("{pointer} is not set");
    match doc.pointer_mut(&parent_pointer).ok_or_else(missing)? {
        Value::Object(map) => map.shift_remove(last).map(|_| ()).ok_or_else(missing),
        Value::Array(items) => {
            let index: usize = last.parse().map_err(|_| missing())?;
            (index < items.len())
                .then(|| items.remove(index))
                .map(|_| ())
                .ok_or_else(missing)
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_creates_parents_and_appends() {
        let mut doc = json!({"list": [1]});
        set(&mut doc, "/a/b/c", json!(1)).unwrap();
        set(&mut doc, "/list/-", json!(2)).unwrap();
        set(&mut doc, "/list/0", json!(0)).unwrap();
        set(&mut doc, "/with~1slash", json!("s")).unwrap();
        assert_eq!(
            doc,
            json!({"list": [0, 2], "a": {"b": {"c": 1}}, "with/slash": "s"})
        );
        assert!(set(&mut doc, "/list/9", json!(1)).is_err());
        assert!(set(&mut doc, "nope", json!(1)).is_err());
    }

    #[test]
    fn delete_removes_or_says_what_is_missing() {
        let mut doc = json!({"a": {"b": 1}, "l": [1, 2]});
        delete(&mut doc, "/a/b").unwrap();
        delete(&mut doc, "/l/0").unwrap();
        assert_eq!(doc, json!({"a": {}, "l": [2]}));
        assert_eq!(delete(&mut doc, "/zz").unwrap_err(), "/zz is not set");
    }
}
