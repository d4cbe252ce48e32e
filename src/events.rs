//! Typed events: what happens to a change, its steps, their builds and their output. The core emits these and
//! never prints; the store keeps them (so a late watcher replays everything), the CLI renders them and the gRPC
//! layer streams them.

use serde::{Deserialize, Serialize};

use crate::executor::Stream;

/// Masking lives in [`crate::mask`]; re-exported for callers that knew it here.
pub use crate::mask::Masker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeState {
    Pending,
    Queued,
    Running,
    Success,
    Error,
    Cancelled,
}

impl ChangeState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ChangeState::Success | ChangeState::Error | ChangeState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not its turn yet.
    Pending,
    /// Its turn has come: any eligible worker may claim it.
    Ready,
    Running,
    Success,
    Error,
    Cancelled,
    /// Not run because an earlier sibling failed in a sequential group.
    Aborted,
}

impl StepState {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            StepState::Pending | StepState::Ready | StepState::Running
        )
    }
}

macro_rules! text_enum {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($s => Some(<$t>::$v),)* _ => None }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(ChangeState { Pending => "pending", Queued => "queued", Running => "running", Success => "success", Error => "error", Cancelled => "cancelled" });
text_enum!(StepState { Pending => "pending", Ready => "ready", Running => "running", Success => "success", Error => "error", Cancelled => "cancelled", Aborted => "aborted" });

/// The phases of a step that the log reports (seed 003: started, initialising, completing, finished).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    BuildStarted,
    BuildFinished,
    RunStarted,
    Initialising,
    Completing,
    RunFinished,
}

/// One vertex of an image build changing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Started,
    Cached,
    Completed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    ChangeState {
        state: ChangeState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    StepState {
        step_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_id: Option<String>,
        action: String,
        state: StepState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Phase {
        step_id: String,
        phase: Phase,
        message: String,
    },
    Build {
        step_id: String,
        vertex: String,
        status: BuildStatus,
    },
    Log {
        step_id: String,
        stream: Stream,
        line: String,
    },
}

/// How a step's log keeps a line of one of its services: `[service NAME] LINE` (on stderr).
pub fn service_line(service: &str, line: &str) -> String {
    format!("[service {service}] {line}")
}

/// The service a step's log line came from (see [`service_line`]); `None` for the step's own output. Read from the
/// line's prefix, so a step that prints such a line itself is taken for that service.
pub fn service_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("[service ")?;
    let (name, _) = rest.split_once("] ")?;
    (!name.is_empty()).then_some(name)
}

/// An event as stored: numbered per change from 1, without gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub change_id: String,
    pub seq: i64,
    pub at: String,
    pub event: Event,
    /// The change's attempt the event belongs to (1 from creation, one more per retry).
    #[serde(default = "first_attempt")]
    pub attempt: i64,
}

fn first_attempt() -> i64 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_a_type_tag() {
        let e = Event::ChangeState {
            state: ChangeState::Running,
            reason: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"change_state","state":"running"}"#
        );
        assert_eq!(StepState::parse("aborted"), Some(StepState::Aborted));
    }

    #[test]
    fn a_service_line_names_its_service_and_the_steps_own_lines_none() {
        assert_eq!(
            service_of(&service_line("web", "listening on 80")),
            Some("web")
        );
        assert_eq!(service_of(&service_line("db", "")), Some("db"));
        for own in [
            "hello",
            "[service web]no space",
            "[service ] x",
            "[services web] x",
            "",
        ] {
            assert_eq!(service_of(own), None, "{own:?}");
        }
        assert!(ChangeState::Cancelled.is_final() && !ChangeState::Queued.is_final());
    }
}
