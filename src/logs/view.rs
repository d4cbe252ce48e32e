//! Which records a log view shows: a step, a service, a time window, a pattern, the last N lines. Pure, shared by
//! the local and the `--server` paths of `show-logs`.

use crate::events::{Event, EventRecord};
use crate::store::rfc3339_ms;

/// A bad view option.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(
        "--since {0:?} is neither a duration (e.g. 10m, 2h) nor a time (e.g. 2026-01-31T12:00:00Z)"
    )]
    Since(String),
    #[error("--grep {pattern:?} is not a valid regular expression: {message}")]
    Grep { pattern: String, message: String },
}

/// What `show-logs` shows.
#[derive(Debug, Clone, Default)]
pub struct LogView {
    /// Only this step's records.
    pub step: Option<String>,
    /// Only this background service's lines (kept as the step's lines `[service NAME] …`).
    pub service: Option<String>,
    /// Only records at or after this time (RFC 3339, as stored).
    pub since: Option<String>,
    /// Only log lines matching this pattern.
    pub grep: Option<regex::Regex>,
    /// Only the last N log lines.
    pub tail: Option<usize>,
}

impl LogView {
    /// Parses `--since` (a duration back from `now_ms`, or an RFC 3339 time) and `--grep`.
    pub fn parse(
        step: Option<String>,
        service: Option<String>,
        since: Option<&str>,
        grep: Option<&str>,
        tail: Option<usize>,
        now_ms: i64,
    ) -> Result<LogView, ViewError> {
        let since = since
            .map(|text| {
                if let Ok(age) = super::limits::parse_duration(text) {
                    let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                    return Ok(rfc3339_ms(now_ms.saturating_sub(age)));
                }
                chrono::DateTime::parse_from_rfc3339(text.trim())
                    .map(|t| rfc3339_ms(t.timestamp_millis()))
                    .map_err(|_| ViewError::Since(text.to_owned()))
            })
            .transpose()?;
        let grep = grep
            .map(|pattern| {
                regex::Regex::new(pattern).map_err(|e| ViewError::Grep {
                    pattern: pattern.to_owned(),
                    message: e.to_string(),
                })
            })
            .transpose()?;
        Ok(LogView {
            step,
            service,
            since,
            grep,
            tail,
        })
    }

    /// `--grep` and `--tail` are about lines: with either, only log lines are shown.
    pub fn lines_only(&self) -> bool {
        self.grep.is_some() || self.tail.is_some()
    }

    /// Whether a record passes every filter but `--tail`.
    pub fn wants(&self, record: &EventRecord) -> bool {
        let event = &record.event;
        if let Some(step) = &self.step {
            if event_step(event) != Some(step.as_str()) {
                return false;
            }
        }
        if let Some(since) = &self.since {
            if record.at.as_str() < since.as_str() {
                return false;
            }
        }
        match event {
            Event::Log { line, .. } => {
                let service_ok = self
                    .service
                    .as_ref()
                    .is_none_or(|name| crate::events::service_of(line) == Some(name.as_str()));
                service_ok && self.grep.as_ref().is_none_or(|re| re.is_match(line))
            }
            _ => self.service.is_none() && !self.lines_only(),
        }
    }

    /// The records of a batch to show: filtered, then the last `--tail` lines.
    pub fn select<'a>(&self, records: &'a [EventRecord]) -> Vec<&'a EventRecord> {
        let mut shown: Vec<&EventRecord> = records.iter().filter(|r| self.wants(r)).collect();
        if let Some(n) = self.tail {
            let from = shown.len().saturating_sub(n);
            shown.drain(..from);
        }
        shown
    }
}

/// The step an event is about.
pub fn event_step(event: &Event) -> Option<&str> {
    match event {
        Event::StepState { step_id, .. }
        | Event::Phase { step_id, .. }
        | Event::Build { step_id, .. }
        | Event::Log { step_id, .. } => Some(step_id),
        Event::ChangeState { .. } => None,
    }
}

/// A log line as one JSON object (for log shippers): change, step, action, stream, time, line. `None` for other
/// events.
pub fn json_line(record: &EventRecord, action: Option<&str>) -> Option<String> {
    let Event::Log {
        step_id,
        stream,
        line,
    } = &record.event
    else {
        return None;
    };
    let value = serde_json::json!({
        "change": record.change_id,
        "step": step_id,
        "action": action,
        "stream": stream,
        "time": record.at,
        "seq": record.seq,
        "line": line,
    });
    Some(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ChangeState, Phase};
    use crate::executor::Stream;

    fn log(seq: i64, at_ms: i64, step: &str, line: &str) -> EventRecord {
        EventRecord {
            change_id: "c".into(),
            attempt: 1,
            seq,
            at: rfc3339_ms(at_ms),
            event: Event::Log {
                step_id: step.into(),
                stream: Stream::Stdout,
                line: line.into(),
            },
        }
    }

    fn phase(seq: i64, at_ms: i64, step: &str) -> EventRecord {
        EventRecord {
            change_id: "c".into(),
            attempt: 1,
            seq,
            at: rfc3339_ms(at_ms),
            event: Event::Phase {
                step_id: step.into(),
                phase: Phase::RunStarted,
                message: "running".into(),
            },
        }
    }

    fn records() -> Vec<EventRecord> {
        let mut all = vec![phase(1, 1_000, "a")];
        for i in 0..10 {
            all.push(log(
                2 + i,
                1_000 + i * 1_000,
                if i % 2 == 0 { "a" } else { "b" },
                &format!("line {i}"),
            ));
        }
        all.push(EventRecord {
            change_id: "c".into(),
            attempt: 1,
            seq: 12,
            at: rfc3339_ms(20_000),
            event: Event::ChangeState {
                state: ChangeState::Success,
                reason: None,
            },
        });
        all
    }

    fn lines(shown: &[&EventRecord]) -> Vec<String> {
        shown
            .iter()
            .map(|r| match &r.event {
                Event::Log { line, .. } => line.clone(),
                other => format!("{other:?}")
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned(),
            })
            .collect()
    }

    fn view(since: Option<&str>, grep: Option<&str>, tail: Option<usize>) -> LogView {
        LogView::parse(None, None, since, grep, tail, 10_500).unwrap()
    }

    #[test]
    fn tail_keeps_the_last_lines_only() {
        let all = records();
        assert_eq!(
            lines(&view(None, None, Some(3)).select(&all)),
            ["line 7", "line 8", "line 9"]
        );
        assert_eq!(view(None, None, Some(100)).select(&all).len(), 10);
        assert!(view(None, None, Some(0)).select(&all).is_empty());
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let all = records();
        // 10.5 s "now", 3 s back: lines at 8 s and later, and the change's end.
        let shown = view(Some("3s"), None, None).select(&all);
        assert_eq!(lines(&shown), ["line 7", "line 8", "line 9", "ChangeState"]);
        let at = rfc3339_ms(9_000);
        assert_eq!(
            lines(&view(Some(&at), None, None).select(&all)),
            ["line 8", "line 9", "ChangeState"]
        );
        let err = LogView::parse(None, None, Some("yesterday"), None, None, 0).unwrap_err();
        assert!(err.to_string().contains("--since \"yesterday\""), "{err}");
    }

    #[test]
    fn grep_matches_lines_by_regular_expression() {
        let all = records();
        assert_eq!(
            lines(&view(None, Some("line [35]$"), None).select(&all)),
            ["line 3", "line 5"]
        );
        assert_eq!(
            lines(&view(None, Some("[0-9]"), Some(1)).select(&all)),
            ["line 9"]
        );
        let err = LogView::parse(None, None, None, Some("(unclosed"), None, 0).unwrap_err();
        assert!(
            err.to_string().contains("not a valid regular expression"),
            "{err}"
        );
    }

    #[test]
    fn step_keeps_that_steps_records() {
        let all = records();
        let v = LogView::parse(Some("b".into()), None, None, None, None, 0).unwrap();
        assert_eq!(
            lines(&v.select(&all)),
            ["line 1", "line 3", "line 5", "line 7", "line 9"]
        );
    }

    #[test]
    fn json_lines_carry_change_step_stream_and_time() {
        let record = log(7, 1_700_000_000_123, "s1", "hello \"world\"");
        let value: serde_json::Value =
            serde_json::from_str(&json_line(&record, Some("build")).unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"change": "c", "step": "s1", "action": "build", "stream": "stdout",
                "time": "2023-11-14T22:13:20.123Z", "seq": 7, "line": "hello \"world\""})
        );
        assert!(json_line(&phase(1, 0, "s"), None).is_none());
    }
}
