//! Conversions between the core's records and the wire messages.

use super::pb;
use crate::events::{BuildStatus, ChangeState, Event, EventRecord, Phase, StepState};
use crate::executor::Stream;
use crate::store::{Change, Environment, Project, PropertiesVersion, Step, WrittenBy};

pub fn project(p: Project) -> pb::Project {
    pb::Project {
        code: p.code,
        name: p.name,
        git_remote: p.git_remote.unwrap_or_default(),
        git_credential: p.git_credential.unwrap_or_default(),
        create_time: timestamp(&p.created_at),
    }
}

pub fn environment(e: Environment) -> pb::Environment {
    pb::Environment {
        project: e.project_code,
        code: e.code,
        name: e.name,
        create_time: timestamp(&e.created_at),
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
        write_time: timestamp(&v.written_at),
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
            pb::ChangeState::Cancelling as i32
        } else {
            change_state(c.state) as i32
        },
        reason: c.reason.unwrap_or_default(),
        create_time: timestamp(&c.created_at),
        start_time: c.started_at.as_deref().and_then(timestamp),
        end_time: c.finished_at.as_deref().and_then(timestamp),
        labels: Default::default(),
        attempt: c.attempt,
    }
}

pub fn step(s: Step) -> pb::Step {
    pb::Step {
        id: s.id,
        parent_id: s.parent_id.unwrap_or_default(),
        action: s.action,
        state: step_state(s.state) as i32,
        reason: s.reason.unwrap_or_default(),
        exit_code: s.exit_code,
        image: s.image_id.unwrap_or_default(),
        image_cached: s.image_cached.unwrap_or_default(),
        properties_json: s.properties.map(|p| p.to_string()).unwrap_or_default(),
        start_time: s.started_at.as_deref().and_then(timestamp),
        end_time: s.finished_at.as_deref().and_then(timestamp),
        change_id: s.change_id,
        project_version: s.project_version,
        environment_version: s.environment_version,
        children_strategy: s.children_strategy.unwrap_or_default(),
        attempt: s.attempt,
    }
}

use super::step_run_wire::timestamp;

/// A wire Timestamp back to the store's text (RFC 3339, milliseconds, UTC), as local mode shows it.
fn rfc3339(at: Option<prost_types::Timestamp>) -> Option<String> {
    let at = at?;
    let at = chrono::DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).ok()?)?;
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn change_state(state: ChangeState) -> pb::ChangeState {
    match state {
        ChangeState::Pending => pb::ChangeState::Pending,
        ChangeState::Queued => pb::ChangeState::Queued,
        ChangeState::Running => pb::ChangeState::Running,
        ChangeState::Success => pb::ChangeState::Success,
        ChangeState::Error => pb::ChangeState::Error,
        ChangeState::Cancelled => pb::ChangeState::Cancelled,
    }
}

fn change_state_from(state: pb::ChangeState) -> Option<ChangeState> {
    Some(match state {
        pb::ChangeState::Unspecified => return None,
        pb::ChangeState::Pending => ChangeState::Pending,
        pb::ChangeState::Queued => ChangeState::Queued,
        pb::ChangeState::Running | pb::ChangeState::Cancelling => ChangeState::Running,
        pb::ChangeState::Success => ChangeState::Success,
        pb::ChangeState::Error => ChangeState::Error,
        pb::ChangeState::Cancelled => ChangeState::Cancelled,
    })
}

fn step_state(state: StepState) -> pb::StepState {
    match state {
        // The API's clients see a step whose turn came but that no worker took yet as pending.
        StepState::Pending | StepState::Ready => pb::StepState::Pending,
        StepState::Running => pb::StepState::Running,
        StepState::Success => pb::StepState::Success,
        StepState::Error => pb::StepState::Error,
        StepState::Cancelled => pb::StepState::Cancelled,
        StepState::Aborted => pb::StepState::Aborted,
    }
}

fn step_state_from(state: pb::StepState) -> Option<StepState> {
    Some(match state {
        pb::StepState::Unspecified => return None,
        pb::StepState::Pending => StepState::Pending,
        pb::StepState::Running => StepState::Running,
        pb::StepState::Success => StepState::Success,
        pb::StepState::Error => StepState::Error,
        pb::StepState::Cancelled => StepState::Cancelled,
        pb::StepState::Aborted => StepState::Aborted,
    })
}

fn phase(phase: Phase) -> pb::Phase {
    match phase {
        Phase::BuildStarted => pb::Phase::BuildStarted,
        Phase::BuildFinished => pb::Phase::BuildFinished,
        Phase::RunStarted => pb::Phase::RunStarted,
        Phase::Initialising => pb::Phase::Initialising,
        Phase::Completing => pb::Phase::Completing,
        Phase::RunFinished => pb::Phase::RunFinished,
    }
}

fn phase_from(phase: pb::Phase) -> Option<Phase> {
    Some(match phase {
        pb::Phase::Unspecified => return None,
        pb::Phase::BuildStarted => Phase::BuildStarted,
        pb::Phase::BuildFinished => Phase::BuildFinished,
        pb::Phase::RunStarted => Phase::RunStarted,
        pb::Phase::Initialising => Phase::Initialising,
        pb::Phase::Completing => Phase::Completing,
        pb::Phase::RunFinished => Phase::RunFinished,
    })
}

fn build_status(status: BuildStatus) -> pb::BuildStatus {
    match status {
        BuildStatus::Started => pb::BuildStatus::Started,
        BuildStatus::Cached => pb::BuildStatus::Cached,
        BuildStatus::Completed => pb::BuildStatus::Completed,
        BuildStatus::Failed => pb::BuildStatus::Failed,
    }
}

fn build_status_from(status: pb::BuildStatus) -> Option<BuildStatus> {
    Some(match status {
        pb::BuildStatus::Unspecified => return None,
        pb::BuildStatus::Started => BuildStatus::Started,
        pb::BuildStatus::Cached => BuildStatus::Cached,
        pb::BuildStatus::Completed => BuildStatus::Completed,
        pb::BuildStatus::Failed => BuildStatus::Failed,
    })
}

fn stream(stream: Stream) -> pb::LogStream {
    match stream {
        Stream::Stdout => pb::LogStream::Stdout,
        Stream::Stderr => pb::LogStream::Stderr,
    }
}

fn stream_from(stream: pb::LogStream) -> Option<Stream> {
    match stream {
        pb::LogStream::Unspecified => None,
        pb::LogStream::Stdout => Some(Stream::Stdout),
        pb::LogStream::Stderr => Some(Stream::Stderr),
    }
}

/// The event part shared by change events and RunStep events.
pub fn event(event: &Event) -> pb::change_event::Event {
    use pb::change_event::Event as E;
    match event {
        Event::ChangeState { state, reason } => E::ChangeState(pb::ChangeStateChanged {
            state: change_state(*state) as i32,
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
            state: step_state(*state) as i32,
            reason: reason.clone().unwrap_or_default(),
        }),
        Event::Phase {
            step_id,
            phase,
            message,
        } => E::Phase(pb::StepPhase {
            step_id: step_id.clone(),
            phase: self::phase(*phase) as i32,
            message: message.clone(),
        }),
        Event::Build {
            step_id,
            vertex,
            status,
        } => E::Build(pb::BuildProgress {
            step_id: step_id.clone(),
            vertex: vertex.clone(),
            status: build_status(*status) as i32,
        }),
        Event::Log {
            step_id,
            stream,
            line,
        } => E::Log(pb::LogLine {
            step_id: step_id.clone(),
            stream: self::stream(*stream) as i32,
            line: line.clone(),
            service: crate::events::service_of(line)
                .unwrap_or_default()
                .to_owned(),
        }),
    }
}

pub fn change_event(record: &EventRecord) -> pb::ChangeEvent {
    pb::ChangeEvent {
        change_id: record.change_id.clone(),
        seq: record.seq,
        time: timestamp(&record.at),
        event: Some(event(&record.event)),
        attempt: record.attempt,
    }
}

// ---- back from the wire, for the CLI's --server mode (which renders exactly what local mode renders)

fn some(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

pub fn project_from(p: pb::Project) -> Project {
    Project {
        id: 0,
        code: p.code,
        name: p.name,
        git_remote: some(p.git_remote),
        git_credential: some(p.git_credential),
        created_at: rfc3339(p.create_time).unwrap_or_default(),
    }
}

pub fn environment_from(e: pb::Environment) -> Environment {
    Environment {
        id: 0,
        project_code: e.project,
        code: e.code,
        name: e.name,
        created_at: rfc3339(e.create_time).unwrap_or_default(),
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
        written_at: rfc3339(v.write_time).unwrap_or_default(),
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
        state: change_state_from(pb::ChangeState::try_from(c.state).unwrap_or_default())
            .unwrap_or(ChangeState::Error),
        reason: some(c.reason),
        owner: None,
        cancel_requested: c.state == pb::ChangeState::Cancelling as i32,
        created_at: rfc3339(c.create_time).unwrap_or_default(),
        started_at: rfc3339(c.start_time),
        finished_at: rfc3339(c.end_time),
        attempt: c.attempt.max(1),
    }
}

pub fn step_from(s: pb::Step) -> Step {
    Step {
        id: s.id,
        change_id: s.change_id,
        parent_id: some(s.parent_id),
        position: 0,
        action: s.action,
        state: step_state_from(pb::StepState::try_from(s.state).unwrap_or_default())
            .unwrap_or(StepState::Error),
        reason: some(s.reason),
        exit_code: s.exit_code,
        image_cached: (!s.image.is_empty()).then_some(s.image_cached),
        image_id: some(s.image),
        properties: serde_json::from_str(&s.properties_json).ok(),
        project_version: s.project_version,
        environment_version: s.environment_version,
        children_strategy: some(s.children_strategy),
        started_at: rfc3339(s.start_time),
        finished_at: rfc3339(s.end_time),
        attempt: s.attempt.max(1),
        // Which worker ran a step is the store's business, not the API's.
        worker: None,
        ignore_failure: false,
        retry_on_worker_loss: false,
    }
}

pub fn record_from(e: pb::ChangeEvent) -> Option<EventRecord> {
    use pb::change_event::Event as E;
    let event = match e.event? {
        E::ChangeState(c) => Event::ChangeState {
            state: change_state_from(pb::ChangeState::try_from(c.state).unwrap_or_default())?,
            reason: some(c.reason),
        },
        E::StepState(s) => Event::StepState {
            step_id: s.step_id,
            parent_id: some(s.parent_id),
            action: s.action,
            state: step_state_from(pb::StepState::try_from(s.state).unwrap_or_default())?,
            reason: some(s.reason),
        },
        E::Phase(p) => Event::Phase {
            step_id: p.step_id,
            phase: phase_from(pb::Phase::try_from(p.phase).unwrap_or_default())?,
            message: p.message,
        },
        E::Build(b) => Event::Build {
            step_id: b.step_id,
            vertex: b.vertex,
            status: build_status_from(pb::BuildStatus::try_from(b.status).unwrap_or_default())?,
        },
        E::Log(l) => Event::Log {
            step_id: l.step_id,
            stream: stream_from(pb::LogStream::try_from(l.stream).unwrap_or_default())?,
            line: l.line,
        },
    };
    Some(EventRecord {
        change_id: e.change_id,
        attempt: e.attempt.max(1),
        seq: e.seq,
        at: rfc3339(e.time).unwrap_or_default(),
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
