//! Conversions between the core's records and the wire messages.

use super::pb;
use crate::events::{Event, EventRecord};
use crate::store::{Change, Environment, Project, PropertiesVersion, Step, WrittenBy};

pub fn project(p: Project) -> pb::Project {
    pb::Project {
        code: p.code,
        name: p.name,
        git_remote: p.git_remote.unwrap_or_default(),
        git_credential: p.git_credential.unwrap_or_default(),
        created_at: p.created_at,
    }
}

pub fn environment(e: Environment) -> pb::Environment {
    pb::Environment {
        project: e.project_code,
        code: e.code,
        name: e.name,
        created_at: e.created_at,
    }
}

pub fn properties(v: PropertiesVersion) -> pb::PropertiesVersion {
    let written_by = match v.written_by {
        WrittenBy::Cli => "cli".to_owned(),
        WrittenBy::Api => "api".to_owned(),
        WrittenBy::Change { change_id, step_id } => format!("change {change_id} step {step_id}"),
    };
    pb::PropertiesVersion {
        version: v.version,
        document_json: v.document.to_string(),
        written_at: v.written_at,
        written_by,
    }
}

pub fn change(c: Change) -> pb::Change {
    pb::Change {
        id: c.id,
        project: c.project,
        environment: c.environment,
        action: c.action,
        git_rev: c.git_rev,
        git_sha: c.git_sha,
        // A cancel that was asked for and has not landed yet: the change will end cancelled.
        state: if c.cancel_requested && !c.state.is_final() {
            "cancelling".to_owned()
        } else {
            c.state.to_string()
        },
        reason: c.reason.unwrap_or_default(),
        created_at: c.created_at,
        started_at: c.started_at.unwrap_or_default(),
        finished_at: c.finished_at.unwrap_or_default(),
        labels: Default::default(),
    }
}

pub fn step(s: Step) -> pb::Step {
    pb::Step {
        id: s.id,
        parent_id: s.parent_id.unwrap_or_default(),
        action: s.action,
        state: s.state.to_string(),
        reason: s.reason.unwrap_or_default(),
        exit_code: s.exit_code,
        image: s.image_id.unwrap_or_default(),
        image_cached: s.image_cached.unwrap_or_default(),
        properties_json: s.properties.map(|p| p.to_string()).unwrap_or_default(),
        started_at: s.started_at.unwrap_or_default(),
        finished_at: s.finished_at.unwrap_or_default(),
        change_id: s.change_id,
        project_version: s.project_version,
        environment_version: s.environment_version,
        children_strategy: s.children_strategy.unwrap_or_default(),
    }
}

fn lower<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The event part shared by change events and RunStep events.
pub fn event(event: &Event) -> pb::change_event::Event {
    use pb::change_event::Event as E;
    match event {
        Event::ChangeState { state, reason } => E::ChangeState(pb::ChangeStateChanged {
            state: state.to_string(),
            reason: reason.clone().unwrap_or_default(),
        }),
        Event::StepState {
            step_id,
            parent_id,
            action,
            state,
            reason,
        } => E::StepState(pb::StepStateChanged {
            step_id: step_id.clone(),
            parent_id: parent_id.clone().unwrap_or_default(),
            action: action.clone(),
            state: state.to_string(),
            reason: reason.clone().unwrap_or_default(),
        }),
        Event::Phase {
            step_id,
            phase,
            message,
        } => E::Phase(pb::StepPhase {
            step_id: step_id.clone(),
            phase: lower(phase),
            message: message.clone(),
        }),
        Event::Build {
            step_id,
            vertex,
            status,
        } => E::Build(pb::BuildProgress {
            step_id: step_id.clone(),
            vertex: vertex.clone(),
            status: lower(status),
        }),
        Event::Log {
            step_id,
            stream,
            line,
        } => E::Log(pb::LogLine {
            step_id: step_id.clone(),
            stream: lower(stream),
            line: line.clone(),
        }),
    }
}

pub fn change_event(record: &EventRecord) -> pb::ChangeEvent {
    pb::ChangeEvent {
        change_id: record.change_id.clone(),
        seq: record.seq,
        at: record.at.clone(),
        event: Some(event(&record.event)),
    }
}

// ---- back from the wire, for the CLI's --server mode (which renders exactly what local mode renders)

fn some(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

pub fn project_from(p: pb::Project) -> Project {
    Project {
        id: 0,
        code: p.code,
        name: p.name,
        git_remote: some(p.git_remote),
        git_credential: some(p.git_credential),
        created_at: p.created_at,
    }
}

pub fn environment_from(e: pb::Environment) -> Environment {
    Environment {
        id: 0,
        project_code: e.project,
        code: e.code,
        name: e.name,
        created_at: e.created_at,
    }
}

pub fn properties_from(v: pb::PropertiesVersion) -> PropertiesVersion {
    let written_by = match v
        .written_by
        .split_whitespace()
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["change", change, "step", step] => WrittenBy::Change {
            change_id: change.to_string(),
            step_id: step.to_string(),
        },
        ["api"] => WrittenBy::Api,
        _ => WrittenBy::Cli,
    };
    PropertiesVersion {
        version: v.version,
        document: serde_json::from_str(&v.document_json).unwrap_or_default(),
        written_at: v.written_at,
        written_by,
    }
}

pub fn change_from(c: pb::Change) -> Change {
    Change {
        id: c.id,
        project: c.project,
        environment: c.environment,
        action: c.action,
        git_rev: c.git_rev,
        git_sha: c.git_sha,
        state: match c.state.as_str() {
            "cancelling" => crate::events::ChangeState::Running,
            state => crate::events::ChangeState::parse(state)
                .unwrap_or(crate::events::ChangeState::Error),
        },
        reason: some(c.reason),
        owner: None,
        cancel_requested: c.state == "cancelling",
        created_at: c.created_at,
        started_at: some(c.started_at),
        finished_at: some(c.finished_at),
    }
}

pub fn step_from(s: pb::Step) -> Step {
    Step {
        id: s.id,
        change_id: s.change_id,
        parent_id: some(s.parent_id),
        position: 0,
        action: s.action,
        state: crate::events::StepState::parse(&s.state).unwrap_or(crate::events::StepState::Error),
        reason: some(s.reason),
        exit_code: s.exit_code,
        image_cached: (!s.image.is_empty()).then_some(s.image_cached),
        image_id: some(s.image),
        properties: serde_json::from_str(&s.properties_json).ok(),
        project_version: s.project_version,
        environment_version: s.environment_version,
        children_strategy: some(s.children_strategy),
        started_at: some(s.started_at),
        finished_at: some(s.finished_at),
    }
}

pub fn record_from(e: pb::ChangeEvent) -> Option<EventRecord> {
    use crate::events::{ChangeState, StepState};
    use pb::change_event::Event as E;
    let event = match e.event? {
        E::ChangeState(c) => Event::ChangeState {
            state: ChangeState::parse(&c.state)?,
            reason: some(c.reason),
        },
        E::StepState(s) => Event::StepState {
            step_id: s.step_id,
            parent_id: some(s.parent_id),
            action: s.action,
            state: StepState::parse(&s.state)?,
            reason: some(s.reason),
        },
        E::Phase(p) => Event::Phase {
            step_id: p.step_id,
            phase: parse(&p.phase)?,
            message: p.message,
        },
        E::Build(b) => Event::Build {
            step_id: b.step_id,
            vertex: b.vertex,
            status: parse(&b.status)?,
        },
        E::Log(l) => Event::Log {
            step_id: l.step_id,
            stream: parse(&l.stream)?,
            line: l.line,
        },
    };
    Some(EventRecord {
        change_id: e.change_id,
        seq: e.seq,
        at: e.at,
        event,
    })
}

pub fn base_image(base: crate::app::BaseImage) -> pb::BaseImage {
    pb::BaseImage {
        image: base.image,
        source: base.source.as_str().to_owned(),
    }
}

pub fn base_image_from(base: pb::BaseImage) -> crate::app::BaseImage {
    use crate::store::BaseImageSource;
    let source = match base.source.as_str() {
        "environment" => BaseImageSource::Environment,
        "project" => BaseImageSource::Project,
        _ => BaseImageSource::Operator,
    };
    crate::app::BaseImage {
        image: base.image,
        source,
    }
}
