//! The one place that turns what stopped a step — an error at some stage of its work, or how its container
//! ended — into the step's final state and reason, telling a cancel from a failure. Pure.

use std::time::Duration;

use crate::events::StepState;
use crate::executor::Ended;

/// Where in a step's work an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading properties, resolving secrets, recording progress.
    Prepare,
    /// Building the step's image.
    Build,
    /// Building its services' images or its Docker daemon.
    Beside,
    /// Running its container.
    Run,
    /// Reading its `step_result.json` (patches, children).
    Result,
    /// Applying its patches.
    Patches,
}

/// What stopped a step.
#[derive(Debug, Clone, Copy)]
pub enum Stopped<'a> {
    Error {
        stage: Stage,
        error: &'a str,
    },
    Ended {
        ended: Ended,
        exit_code: i64,
        timeout: Option<Duration>,
        /// A resource limit the container hit (e.g. its memory), if the executor saw one.
        limit: Option<&'a str>,
    },
}

/// The final state and reason of step `action` that `stopped`; `cancelled` says whether its change was cancelled
/// meanwhile (an error while cancelling is the cancel's doing, not a failure of the step).
pub fn step_outcome(action: &str, stopped: Stopped, cancelled: bool) -> (StepState, String) {
    match stopped {
        Stopped::Ended {
            ended: Ended::Cancelled,
            ..
        } => (StepState::Cancelled, "cancelled".into()),
        Stopped::Ended {
            ended: Ended::TimedOut,
            timeout,
            ..
        } => (
            StepState::Error,
            format!(
                "step {action} timed out after {}",
                timeout
                    .map(crate::actions::format_duration)
                    .unwrap_or_default()
            ),
        ),
        Stopped::Ended {
            ended: Ended::Exited,
            exit_code,
            limit,
            ..
        } => (
            StepState::Error,
            match limit {
                Some(limit) => format!("step {action} exited with code {exit_code}: {limit}"),
                None => format!("step {action} exited with code {exit_code}"),
            },
        ),
        Stopped::Error { stage, error } if cancelled && stage_obeys_cancel(stage) => {
            let doing = match stage {
                Stage::Build | Stage::Beside => "building",
                Stage::Run => "running",
                _ => "preparing",
            };
            (
                StepState::Cancelled,
                format!("cancelled while {doing}: {error}"),
            )
        }
        Stopped::Error { stage, error } => (
            StepState::Error,
            match stage {
                Stage::Build => format!("failed to build runner image for step {action}: {error}"),
                Stage::Result => format!("step {action} left an invalid step_result.json: {error}"),
                Stage::Prepare | Stage::Beside | Stage::Run | Stage::Patches => error.to_owned(),
            },
        ),
    }
}

/// A cancel interrupts these stages; a bad result or a refused patch is the step's own failure either way.
fn stage_obeys_cancel(stage: Stage) -> bool {
    matches!(
        stage,
        Stage::Prepare | Stage::Build | Stage::Beside | Stage::Run
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(stage: Stage) -> Stopped<'static> {
        Stopped::Error {
            stage,
            error: "boom",
        }
    }

    #[test]
    fn an_error_during_a_cancel_is_a_cancel() {
        assert_eq!(
            step_outcome("deploy", error(Stage::Build), true),
            (
                StepState::Cancelled,
                "cancelled while building: boom".into()
            )
        );
        assert_eq!(
            step_outcome("deploy", error(Stage::Run), true).0,
            StepState::Cancelled
        );
    }

    #[test]
    fn an_error_without_a_cancel_fails_the_step_naming_it() {
        assert_eq!(
            step_outcome("deploy", error(Stage::Build), false),
            (
                StepState::Error,
                "failed to build runner image for step deploy: boom".into()
            )
        );
        let (state, reason) = step_outcome("deploy", error(Stage::Result), true);
        assert_eq!(state, StepState::Error, "a bad result is no cancel's doing");
        assert!(reason.contains("invalid step_result.json"));
        assert_eq!(
            step_outcome("deploy", error(Stage::Patches), true).0,
            StepState::Error
        );
    }

    #[test]
    fn how_the_container_ended_names_the_outcome() {
        let ended = |ended, exit_code| Stopped::Ended {
            ended,
            exit_code,
            timeout: Some(Duration::from_millis(50)),
            limit: None,
        };
        assert_eq!(
            step_outcome("a", ended(Ended::Cancelled, 143), false).0,
            StepState::Cancelled
        );
        assert_eq!(
            step_outcome("a", ended(Ended::TimedOut, 137), false).1,
            "step a timed out after 50ms"
        );
        assert_eq!(
            step_outcome("a", ended(Ended::Exited, 3), false).1,
            "step a exited with code 3"
        );
        let killed = Stopped::Ended {
            ended: Ended::Exited,
            exit_code: 137,
            timeout: None,
            limit: Some("it ran out of memory (limit 64 MiB)"),
        };
        assert_eq!(
            step_outcome("a", killed, false).1,
            "step a exited with code 137: it ran out of memory (limit 64 MiB)"
        );
    }
}
