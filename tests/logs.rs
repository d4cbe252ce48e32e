//! Logs at scale, without a daemon: the fake executor plays each step's output (as whole lines or raw pieces), the
//! real store keeps it. Masking across pieces and lines, reasons stored masked, caps and their notices, chunked
//! storage that reads back in order, and pruning that frees space but keeps the changes.

mod support;

use runner::app::App;
use runner::events::{ChangeState, Event, EventRecord, StepState};
use runner::executor::Stream;
use runner::logs::LogLimits;
use runner::orchestrator::{CreateChange, Orchestrator, Settings};
use runner::secrets::SecretValues;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use support::fakes::{FakeExecutor, FakeImages, FakeSources, Script};
use tokio_util::sync::CancellationToken;

const PEM: &str = "-----BEGIN TEST PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END TEST PRIVATE KEY-----\n";
const TOKEN: &str = "tok-8c1f2e77d0a94b5e";

struct World {
    home: tempfile::TempDir,
    orchestrator: Orchestrator,
}

fn manifest() -> Value {
    json!({"actions": {
        "print": {"run": "print"},
        "bad_child": {"run": "bad_child"},
        "a": {"run": "a"}, "b": {"run": "b"},
        "both": {"steps": ["a", "b"], "run_as": "parallel"}
    }})
}

async fn world(scripts: Vec<(&str, Script)>, secrets: &[(&str, &str)], logs: LogLimits) -> World {
    let home = tempfile::tempdir().unwrap();
    let app = App::open(home.path()).await.unwrap();
    app.create_project("demo", "Demo", Some("/nowhere"))
        .await
        .unwrap();
    app.create_environment("demo", "dev", "Dev").await.unwrap();
    for (name, value) in secrets {
        let values = SecretValues(BTreeMap::from([("VALUE".to_owned(), value.to_string())]));
        app.secrets.set(name, values).unwrap();
    }
    let executor = Arc::new(FakeExecutor {
        scripts: scripts
            .into_iter()
            .map(|(a, s)| (a.to_owned(), s))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    });
    let sources = Arc::new(FakeSources {
        manifest: manifest(),
        properties: json!({}),
    });
    let settings = Settings {
        poll: Duration::from_millis(20),
        logs,
        ..Default::default()
    };
    let orchestrator = Orchestrator::new(app, sources, Arc::new(FakeImages), executor, settings);
    World { home, orchestrator }
}

impl World {
    async fn run(&self, action: &str) -> (String, ChangeState) {
        let request = CreateChange {
            project: "demo".into(),
            environment: "dev".into(),
            git_rev: "main".into(),
            action: action.into(),
        };
        let id = self.orchestrator.create_change(&request).await.unwrap().id;
        let change = self
            .orchestrator
            .run_change(&id, CancellationToken::new())
            .await
            .unwrap();
        (id, change.state)
    }

    async fn records(&self, id: &str) -> Vec<EventRecord> {
        self.orchestrator
            .app()
            .store
            .events_after(id, 0)
            .await
            .unwrap()
    }

    async fn lines(&self, id: &str) -> Vec<String> {
        self.records(id)
            .await
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Log { line, .. } => Some(line),
                _ => None,
            })
            .collect()
    }

    /// Everything the store file holds, as text (for "is this value anywhere in it").
    fn store_bytes(&self) -> Vec<u8> {
        let mut all = vec![];
        for name in ["runner.db", "runner.db-wal"] {
            if let Ok(bytes) = std::fs::read(self.home.path().join(name)) {
                all.extend(bytes);
            }
        }
        all
    }
}

fn raw(pieces: &[&[u8]]) -> Script {
    Script {
        raw: pieces
            .iter()
            .map(|p| (Stream::Stdout, p.to_vec()))
            .collect(),
        ..Default::default()
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_secret_split_across_two_output_chunks_is_masked_in_the_stored_log() {
    let (head, tail) = TOKEN.split_at(7);
    let script = raw(&[
        format!("token is {head}").as_bytes(),
        format!("{tail} and done\n").as_bytes(),
    ]);
    let w = world(
        vec![("print", script)],
        &[("api", TOKEN)],
        LogLimits::default(),
    )
    .await;
    let (id, state) = w.run("print").await;
    assert_eq!(state, ChangeState::Success);
    assert_eq!(w.lines(&id).await, ["token is *** and done"]);
    assert!(!contains(&w.store_bytes(), TOKEN));
}

#[tokio::test]
async fn every_line_of_a_multi_line_secret_is_masked_in_the_stored_log() {
    // The key printed whole (cut through its lines by the reads), then one of its lines alone.
    let printed = format!("key:\n{PEM}line two alone: MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n");
    let pieces: Vec<&[u8]> = printed.as_bytes().chunks(13).collect();
    let w = world(
        vec![("print", raw(&pieces))],
        &[("tls", PEM)],
        LogLimits::default(),
    )
    .await;
    let (id, _) = w.run("print").await;
    let lines = w.lines(&id).await;
    assert_eq!(lines, ["key:", "***", "line two alone: ***"]);
    let stored = w.store_bytes();
    for line in PEM.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!contains(&stored, line), "{line} is in runner.db");
    }
}

#[tokio::test]
async fn step_and_change_reasons_are_stored_masked() {
    // A child action named after the secret: the failure reason quotes it.
    let script = Script {
        result: Some(json!({"steps": {"children": [{"action": TOKEN}]}})),
        ..Default::default()
    };
    let w = world(
        vec![("bad_child", script)],
        &[("api", TOKEN)],
        LogLimits::default(),
    )
    .await;
    let (id, state) = w.run("bad_child").await;
    assert_eq!(state, ChangeState::Error);
    let store = &w.orchestrator.app().store;
    let step = store.steps(&id).await.unwrap().remove(0);
    let reason = step.reason.unwrap();
    assert!(
        reason.contains("names an unknown action") && reason.contains("***"),
        "{reason}"
    );
    let change_reason = store.change(&id).await.unwrap().reason.unwrap();
    assert!(change_reason.contains("***"), "{change_reason}");
    for text in [&reason, &change_reason] {
        assert!(!text.contains(TOKEN));
    }
    assert!(!contains(&w.store_bytes(), TOKEN));
}

#[tokio::test]
async fn a_secret_equal_to_an_event_field_name_leaves_events_intact_and_recording_goes_on() {
    let script = Script {
        output: vec!["run the log".into(), "error: none".into()],
        ..Default::default()
    };
    let secrets = [
        ("a", "run"),
        ("b", "log"),
        ("c", "error"),
        ("d", "type"),
        ("e", "stdout"),
    ];
    let w = world(vec![("print", script)], &secrets, LogLimits::default()).await;
    let (id, state) = w.run("print").await;
    assert_eq!(state, ChangeState::Success);
    let records = w.records(&id).await;
    assert_eq!(w.lines(&id).await, ["*** the ***", "***: none"]);
    // Every event is there, in order, and the last one is the change's end.
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=records.len() as i64).collect::<Vec<_>>());
    assert!(matches!(
        records.last().unwrap().event,
        Event::ChangeState {
            state: ChangeState::Success,
            ..
        }
    ));
    assert!(records.iter().any(|r| matches!(
        &r.event,
        Event::StepState { action, state: StepState::Success, .. } if action == "print"
    )));
}

#[tokio::test]
async fn past_the_step_cap_the_log_keeps_a_truncation_notice_and_a_count() {
    let script = Script {
        output: (0..100).map(|i| format!("line {i:05}")).collect(),
        ..Default::default()
    };
    let limits = LogLimits {
        step_max: 1100,
        ..LogLimits::default()
    };
    let w = world(vec![("print", script)], &[], limits).await;
    let (id, state) = w.run("print").await;
    assert_eq!(
        state,
        ChangeState::Success,
        "a capped log does not fail the step"
    );
    let lines = w.lines(&id).await;
    let kept = lines.iter().filter(|l| l.starts_with("line ")).count();
    assert_eq!(kept, 100, "1100 bytes hold 100 lines of 11 bytes");
    let script = Script {
        output: (0..300).map(|i| format!("line {i:05}")).collect(),
        ..Default::default()
    };
    let w = world(vec![("print", script)], &[], limits).await;
    let (id, _) = w.run("print").await;
    let lines = w.lines(&id).await;
    assert_eq!(lines.iter().filter(|l| l.starts_with("line ")).count(), 100);
    assert_eq!(lines[99], "line 00099");
    assert!(
        lines[100].contains("log truncated") && lines[100].contains("RUNNER_LOG_STEP_MAX"),
        "{}",
        lines[100]
    );
    assert!(lines[101].contains("200 more lines"), "{}", lines[101]);
}

#[tokio::test]
async fn a_verbose_step_is_stored_in_few_chunks_and_reads_back_in_order() {
    let count = 20_000;
    let script = Script {
        output: (0..count)
            .map(|i| format!("compiling unit {i} of {count}"))
            .collect(),
        ..Default::default()
    };
    let w = world(vec![("print", script)], &[], LogLimits::default()).await;
    // What the schema and its migrations already take (the WAL holds their pages too) is not the log's.
    let before = w.store_bytes().len();
    let (id, _) = w.run("print").await;
    let records = w.records(&id).await;
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=records.len() as i64).collect::<Vec<_>>(),
        "one sequence, no gaps"
    );
    let lines = w.lines(&id).await;
    assert_eq!(lines.len(), count);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| *l == format!("compiling unit {i} of {count}")));
    // The lines sit between the step's run phases.
    let position =
        |pred: &dyn Fn(&Event) -> bool| records.iter().position(|r| pred(&r.event)).unwrap();
    let first_line = position(&|e| matches!(e, Event::Log { .. }));
    let run_started = position(&|e| {
        matches!(
            e,
            Event::Phase {
                phase: runner::events::Phase::RunStarted,
                ..
            }
        )
    });
    let run_finished = position(&|e| {
        matches!(
            e,
            Event::Phase {
                phase: runner::events::Phase::RunFinished,
                ..
            }
        )
    });
    assert!(run_started < first_line && first_line + count <= run_finished);
    // Stored as a few compressed chunks, not a row per line: far smaller than the text.
    let text: usize = lines.iter().map(|l| l.len() + 1).sum();
    let stored = w.store_bytes().len().saturating_sub(before);
    assert!(
        stored < text,
        "the store grew {stored} bytes for {text} bytes of text"
    );
}

#[tokio::test]
async fn parallel_steps_keep_their_own_lines() {
    let lines = |tag: &str| Script {
        output: (0..500).map(|i| format!("{tag} {i}")).collect(),
        ..Default::default()
    };
    let w = world(
        vec![("a", lines("a")), ("b", lines("b"))],
        &[],
        LogLimits::default(),
    )
    .await;
    let (id, _) = w.run("both").await;
    let steps = w.orchestrator.app().store.steps(&id).await.unwrap();
    let step_of = |action: &str| {
        steps
            .iter()
            .find(|s| s.action == action)
            .unwrap()
            .id
            .clone()
    };
    let (a, b) = (step_of("a"), step_of("b"));
    let mut by_step: HashMap<String, Vec<String>> = HashMap::new();
    for r in w.records(&id).await {
        if let Event::Log { step_id, line, .. } = r.event {
            by_step.entry(step_id).or_default().push(line);
        }
    }
    assert_eq!(
        by_step[&a],
        (0..500).map(|i| format!("a {i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        by_step[&b],
        (0..500).map(|i| format!("b {i}")).collect::<Vec<_>>()
    );
}

/// Lines that do not compress to nothing: a cheap pseudo-random generator, hex-encoded.
fn noisy_lines(count: usize) -> Vec<String> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|i| {
            let words: Vec<String> = (0..6)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    format!("{:016x}", state)
                })
                .collect();
            format!("{i:06} {}", words.join(" "))
        })
        .collect()
}

#[tokio::test]
async fn prune_frees_space_and_keeps_the_change_records() {
    let script = Script {
        output: noisy_lines(30_000),
        ..Default::default()
    };
    let w = world(vec![("print", script)], &[], LogLimits::default()).await;
    let (id, state) = w.run("print").await;
    let store = &w.orchestrator.app().store;
    let events_before: Vec<EventRecord> = w
        .records(&id)
        .await
        .into_iter()
        .filter(|r| !matches!(r.event, Event::Log { .. }))
        .collect();
    let steps_before = store.steps(&id).await.unwrap();
    let before = store.file_bytes();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // A change younger than the cut-off keeps its lines.
    let kept = runner::logs::retention::prune_older_than(store, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(kept.chunks, 0);
    assert_eq!(w.lines(&id).await.len(), 30_000);

    let pruned = runner::logs::retention::prune_older_than(store, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pruned.changes, 1);
    assert!(pruned.text_bytes > 3_000_000, "{pruned:?}");
    let after = store.file_bytes();
    assert!(
        after + 1_000_000 < before,
        "the store should shrink by the pruned chunks: {before} -> {after} bytes"
    );
    // The change, its steps and its other events are untouched; only the lines are gone.
    assert!(w.lines(&id).await.is_empty());
    let change = store.change(&id).await.unwrap();
    assert_eq!(change.state, state);
    assert_eq!(store.steps(&id).await.unwrap(), steps_before);
    assert_eq!(w.records(&id).await, events_before);
}

/// Runs the `runner` binary against the world's data directory.
fn cli(w: &World, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("--home")
        .arg(w.home.path())
        .args(args)
        .output()
        .unwrap()
}

fn stdout_lines(output: &std::process::Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn show_logs_tail_since_grep_and_json_select_the_right_lines() {
    let script = Script {
        output: (0..1000).map(|i| format!("unit {i:04} done")).collect(),
        ..Default::default()
    };
    let w = world(vec![("print", script)], &[], LogLimits::default()).await;
    let (id, _) = w.run("print").await;
    let show = |extra: &[&str]| {
        let mut args = vec!["change", "show-logs", id.as_str()];
        args.extend_from_slice(extra);
        cli(&w, &args)
    };

    assert_eq!(
        stdout_lines(&show(&["--tail", "3"])),
        [
            "[print] unit 0997 done",
            "[print] unit 0998 done",
            "[print] unit 0999 done"
        ]
    );
    let grepped = stdout_lines(&show(&["--grep", "unit 09[0-9]5 "]));
    assert_eq!(grepped.len(), 10, "{grepped:?}");
    assert!(grepped
        .iter()
        .all(|l| l.ends_with("5 done") && l.contains("unit 09")));
    assert_eq!(
        stdout_lines(&show(&["--grep", "done$", "--tail", "1"])),
        ["[print] unit 0999 done"]
    );
    // Everything happened in the last hour; nothing after a time to come.
    let recent = stdout_lines(&show(&["--since", "1h"]));
    assert_eq!(recent.iter().filter(|l| l.contains("unit ")).count(), 1000);
    assert!(
        recent.iter().any(|l| l.contains("success")),
        "events are shown too"
    );
    assert!(stdout_lines(&show(&["--since", "2999-01-01T00:00:00Z"])).is_empty());

    let stamped = stdout_lines(&show(&["--tail", "1", "--timestamps"]));
    let (time, rest) = stamped[0].split_once(' ').unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
    assert_eq!(rest, "[print] unit 0999 done");

    let json = stdout_lines(&show(&["--output", "json", "--tail", "2"]));
    assert_eq!(json.len(), 2);
    let last: Value = serde_json::from_str(&json[1]).unwrap();
    assert_eq!(last["change"], id.as_str());
    assert_eq!(last["action"], "print");
    assert_eq!(last["stream"], "stdout");
    assert_eq!(last["line"], "unit 0999 done");
    assert!(last["step"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(chrono::DateTime::parse_from_rfc3339(last["time"].as_str().unwrap()).is_ok());
    // Every log line is one JSON object, and only log lines are.
    let all = stdout_lines(&show(&["--output", "json"]));
    assert_eq!(all.len(), 1000);
}

#[tokio::test]
async fn show_logs_refuses_a_bad_pattern_or_time_with_a_clear_error() {
    let w = world(
        vec![("print", Script::default())],
        &[],
        LogLimits::default(),
    )
    .await;
    let (id, _) = w.run("print").await;
    for (flag, value, expected) in [
        ("--grep", "(unclosed", "not a valid regular expression"),
        ("--since", "last tuesday", "neither a duration"),
    ] {
        let out = cli(&w, &["change", "show-logs", &id, flag, value]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn logs_prune_through_the_cli_reports_what_it_freed() {
    let script = Script {
        output: noisy_lines(5_000),
        ..Default::default()
    };
    let w = world(vec![("print", script)], &[], LogLimits::default()).await;
    let (id, _) = w.run("print").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let out = cli(
        &w,
        &["--output", "json", "logs", "prune", "--older-than", "0s"],
    );
    let report: Value = serde_json::from_str(&stdout_lines(&out).join("\n")).unwrap();
    assert_eq!(report["changes"], 1);
    assert!(report["log_bytes"].as_u64().unwrap() > 500_000, "{report}");
    assert!(w.lines(&id).await.is_empty());
    let bad = cli(&w, &["logs", "prune", "--older-than", "soon"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--older-than"));
}
