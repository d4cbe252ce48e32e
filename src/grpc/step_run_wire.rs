//! Step runs on the wire: the stored run as a `StepRun`, its events as `RunStepEvent`s, a finished step as a
//! typed `RunStepResult` (outcome, duration, patches, children), and `step_context_json`'s documented shape.

use base64::Engine;
use serde_json::Value;
use std::time::Duration;
use tonic::Status;

use super::redact::Redactor;
use super::status::bad_field;
use super::{convert, pb};
use crate::executor::Ended;
use crate::orchestrator::SingleStepOutcome;
use crate::store::{StepRunEvent, StepRunOutcome, StepRunRecord};

pub fn outcome(o: StepRunOutcome) -> pb::StepRunOutcome {
    match o {
        StepRunOutcome::Succeeded => pb::StepRunOutcome::Succeeded,
        StepRunOutcome::Failed => pb::StepRunOutcome::Failed,
        StepRunOutcome::TimedOut => pb::StepRunOutcome::TimedOut,
        StepRunOutcome::Cancelled => pb::StepRunOutcome::Cancelled,
    }
}

/// How a step that ran to its end ended.
pub fn outcome_of(step: &SingleStepOutcome) -> StepRunOutcome {
    match step.ended {
        Ended::TimedOut => StepRunOutcome::TimedOut,
        Ended::Cancelled => StepRunOutcome::Cancelled,
        Ended::Exited if step.exit_code == 0 => StepRunOutcome::Succeeded,
        Ended::Exited => StepRunOutcome::Failed,
    }
}

pub fn timestamp(rfc3339: &str) -> Option<prost_types::Timestamp> {
    let at = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
    Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    })
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn children(result: &Value) -> Option<pb::ChildSteps> {
    let actions: Vec<String> = result
        .pointer("/steps/children")?
        .as_array()?
        .iter()
        .filter_map(|c| c.get("action")?.as_str().map(str::to_owned))
        .collect();
    let strategy = match result
        .pointer("/steps/child_execution_strategy")
        .and_then(Value::as_str)
    {
        Some("sequential") => pb::ChildrenStrategy::Sequential,
        Some("parallel") => pb::ChildrenStrategy::Parallel,
        _ => pb::ChildrenStrategy::Unspecified,
    };
    Some(pb::ChildSteps {
        strategy: strategy as i32,
        actions,
    })
}

/// The typed result of a step that ran to its end (its document masked).
pub fn result(step: &SingleStepOutcome, took: Duration, redactor: &Redactor) -> pb::RunStepResult {
    let document = step.result.as_ref().map(|r| redactor.json(r));
    let mut patches = vec![];
    if let Some(Ok(found)) = document
        .as_ref()
        .map(crate::orchestrator::patches::patches_from_result)
    {
        for (scope, patch) in [
            (pb::PatchScope::Project, found.project),
            (pb::PatchScope::Environment, found.environment),
        ] {
            if !patch.0.is_empty() {
                patches.push(pb::PropertiesPatch {
                    scope: scope as i32,
                    patch_json: serde_json::to_string(&patch).unwrap_or_default(),
                });
            }
        }
    }
    pb::RunStepResult {
        exit_code: step.exit_code,
        git_sha: step.git_sha.clone(),
        image: step.image.clone(),
        image_cached: step.image_cached,
        step_result_json: document.as_ref().map(|d| d.to_string()).unwrap_or_default(),
        outcome: outcome(outcome_of(step)) as i32,
        duration: Some(duration(took)),
        patches,
        children: document.as_ref().and_then(children),
    }
}

/// A result as stored with its run.
pub fn encode_result(result: &pb::RunStepResult) -> String {
    base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(result))
}

pub fn decode_result(text: &str) -> Option<pb::RunStepResult> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    prost::Message::decode(bytes.as_slice()).ok()
}

pub fn step_run(run: &StepRunRecord, last_seq: i64) -> pb::StepRun {
    let state = if run.ended {
        pb::StepRunState::Ended
    } else if run.cancel_requested {
        pb::StepRunState::Cancelling
    } else {
        pb::StepRunState::Running
    };
    let (error_reason, error_message) = run
        .error
        .as_ref()
        .map(|(_, reason, message)| (reason.clone(), message.clone()))
        .unwrap_or_default();
    pb::StepRun {
        step_run_id: run.id.clone(),
        state: state as i32,
        outcome: run.outcome.map(outcome).unwrap_or_default() as i32,
        git_remote: run.git_remote.clone(),
        git_rev: run.git_rev.clone(),
        action: run.action.clone(),
        labels: run.labels.clone().into_iter().collect(),
        create_time: timestamp(&run.created_at),
        end_time: run.ended_at.as_deref().and_then(timestamp),
        duration: run
            .duration_ms
            .map(|ms| duration(Duration::from_millis(ms.max(0) as u64))),
        result: run.result.as_deref().and_then(decode_result),
        error_reason,
        error_message,
        last_seq,
    }
}

/// A stored event on the wire (state events do not occur in step runs).
pub fn event(run_id: &str, stored: &StepRunEvent) -> Option<pb::RunStepEvent> {
    use pb::change_event::Event as C;
    use pb::run_step_event::Event as R;
    let event = match convert::event(&stored.event) {
        C::Phase(p) => R::Phase(p),
        C::Build(b) => R::Build(b),
        C::Log(l) => R::Log(l),
        C::ChangeState(_) | C::StepState(_) => return None,
    };
    Some(pb::RunStepEvent {
        event: Some(event),
        step_run_id: run_id.to_owned(),
        seq: stored.seq,
        at: stored.at.clone(),
    })
}

/// `step_context_json`: empty, or a JSON object with only `context`, `project` and `environment`, each an object,
/// and `project.properties` / `environment.properties` objects when present.
pub fn step_context(text: &str) -> Result<Value, Status> {
    let invalid = |why: String| {
        bad_field(
            "INVALID_STEP_CONTEXT",
            "step_context_json",
            format!("step_context_json {why}"),
        )
    };
    if text.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("is not JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(invalid(
            "must be a JSON object {context, project, environment}".into(),
        ));
    };
    for (key, part) in map {
        if !matches!(key.as_str(), "context" | "project" | "environment") {
            return Err(invalid(format!(
                "has an unknown key {key:?}: only context, project and environment"
            )));
        }
        if !part.is_object() {
            return Err(invalid(format!("{key} must be an object")));
        }
        if key != "context" {
            if let Some(props) = part.get("properties") {
                if !props.is_object() {
                    return Err(invalid(format!("{key}.properties must be an object")));
                }
            }
        }
    }
    Ok(value)
}
