//! Runs the public RFC 6902 conformance suite (json-patch/json-patch-tests, vendored in `tests/data/`) against the
//! properties engine.

use runner::properties::{apply_patch, parse_patch};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Record {
    doc: Option<Value>,
    patch: Option<Box<RawValue>>,
    expected: Option<Value>,
    error: Option<String>,
    comment: Option<String>,
    #[serde(default)]
    disabled: bool,
}

fn suite_dir() -> PathBuf {
    // Vendored into the repository (with its licence) so a fresh clone runs it anywhere.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/json-patch-tests")
}

/// Returns (records, passed, disabled) and the failures.
fn run_file(name: &str) -> (usize, usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(suite_dir().join(name)).unwrap();
    let records: Vec<Record> = serde_json::from_str(&text).unwrap();
    let (mut passed, mut disabled, mut failures) = (0, 0, vec![]);
    for (i, record) in records.iter().enumerate() {
        let label = format!(
            "{name}[{i}] {}",
            record.comment.as_deref().unwrap_or("(no comment)")
        );
        if record.disabled {
            disabled += 1;
            continue;
        }
        let (Some(doc), Some(patch)) = (&record.doc, &record.patch) else {
            passed += 1; // a comment-only record: nothing to run
            continue;
        };
        let outcome = parse_patch(&label, patch.get()).and_then(|p| apply_patch(doc, &p));
        let ok = match (&outcome, &record.expected, &record.error) {
            (Err(_), _, Some(_)) => true,
            (Ok(got), _, Some(error)) => {
                failures.push(format!("{label}: expected error {error:?}, got {got}"));
                false
            }
            (Ok(got), Some(expected), None) => {
                let same = got == expected;
                if !same {
                    failures.push(format!("{label}: expected {expected}, got {got}"));
                }
                same
            }
            (Ok(_), None, None) => true,
            (Err(e), _, None) => {
                failures.push(format!("{label}: unexpected error {e}"));
                false
            }
        };
        passed += ok as usize;
    }
    (records.len(), passed, disabled, failures)
}

#[test]
fn rfc6902_conformance_suite() {
    let mut total = (0, 0, 0);
    let mut failures = vec![];
    for file in ["tests.json", "spec_tests.json"] {
        let (records, passed, disabled, f) = run_file(file);
        println!("{file}: {records} records, {passed} passed, {disabled} disabled");
        total = (total.0 + records, total.1 + passed, total.2 + disabled);
        failures.extend(f);
    }
    // Written to the real stderr (not the captured test output), so every test run shows the count.
    let summary = format!(
        "json-patch conformance: {} records, {} passed, {} disabled, {} failed\n",
        total.0,
        total.1,
        total.2,
        failures.len()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes());
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    assert_eq!(total.0, 112, "the suite should hold 112 records");
    assert_eq!(total.1 + total.2, total.0);
}
