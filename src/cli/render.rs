//! How the CLI shows results: plain text tables for people, `--output json` for programs.

use serde::Serialize;

use std::collections::HashMap;

use super::Output;
use crate::events::{BuildStatus, Event, EventRecord, Phase};
use crate::store::{Change, Environment, Project, PropertiesVersion, Step, WrittenBy};

pub fn json<T: Serialize + ?Sized>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("values serialise")
    );
}

pub fn created<T: Serialize>(out: Output, what: &str, code: &str, value: &T) {
    match out {
        Output::Json => json(value),
        Output::Text => println!("{what} {code} saved"),
    }
}

pub fn projects(out: Output, projects: &[Project]) {
    if out == Output::Json {
        return json(projects);
    }
    println!("{:<20} {:<30} GIT REMOTE", "CODE", "NAME");
    for p in projects {
        println!(
            "{:<20} {:<30} {}",
            p.code,
            p.name,
            p.git_remote.as_deref().unwrap_or("-")
        );
    }
}

pub fn fetched(out: Output, report: &crate::app::FetchReport) {
    match out {
        Output::Json => json(report),
        Output::Text => println!(
            "project {} fetched from {}: {} branches and tags",
            report.project, report.git_remote, report.refs
        ),
    }
}

pub fn environments(out: Output, environments: &[Environment]) {
    if out == Output::Json {
        return json(environments);
    }
    println!("{:<20} NAME", "CODE");
    for e in environments {
        println!("{:<20} {}", e.code, e.name);
    }
}

pub fn version_written(out: Output, written: &PropertiesVersion) {
    match out {
        Output::Json => json(&serde_json::json!({ "version": written.version })),
        Output::Text => println!("properties saved as version {}", written.version),
    }
}

fn written_by(by: &WrittenBy) -> String {
    match by {
        WrittenBy::Cli => "cli".into(),
        WrittenBy::Api => "api".into(),
        WrittenBy::Change { change_id, step_id } => format!("change {change_id} step {step_id}"),
    }
}

pub fn history(out: Output, versions: &[PropertiesVersion]) {
    if out == Output::Json {
        return json(versions);
    }
    println!("{:<8} {:<26} WRITTEN BY", "VERSION", "WRITTEN AT");
    for v in versions {
        println!(
            "{:<8} {:<26} {}",
            v.version,
            v.written_at,
            written_by(&v.written_by)
        );
    }
}

fn seconds_between(start: Option<&str>, end: Option<&str>) -> Option<f64> {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    let start = parse(start?)?;
    let end = match end {
        Some(end) => parse(end)?,
        None => chrono::Utc::now().into(),
    };
    Some((end - start).num_milliseconds() as f64 / 1000.0)
}

fn duration_text(start: Option<&str>, end: Option<&str>) -> String {
    seconds_between(start, end)
        .map(|s| format!("{s:.1}s"))
        .unwrap_or_else(|| "-".into())
}

pub fn changes(out: Output, changes: &[Change]) {
    if out == Output::Json {
        return json(changes);
    }
    println!(
        "{:<36} {:<10} {:<20} {:<16} {:<12} CREATED",
        "ID", "STATE", "PROJECT/ENV", "ACTION", "SHA"
    );
    for c in changes {
        println!(
            "{:<36} {:<10} {:<20} {:<16} {:<12} {}",
            c.id,
            c.state,
            format!("{}/{}", c.project, c.environment),
            c.action,
            &c.git_sha[..c.git_sha.len().min(12)],
            c.created_at
        );
    }
}

/// A change with its steps as a tree, in the attempt `change.attempt` of `attempts`.
pub fn change(out: Output, change: &Change, steps: &[Step], attempts: i64) {
    if out == Output::Json {
        return json(
            &serde_json::json!({ "change": change, "steps": steps, "attempts": attempts }),
        );
    }
    println!("change      {}", change.id);
    if attempts > 1 {
        let others = if change.attempt == attempts {
            "earlier ones: --attempt N"
        } else {
            "not the current one"
        };
        println!("attempt     {} of {attempts} ({others})", change.attempt);
    }
    println!("state       {}", change.state);
    if let Some(reason) = &change.reason {
        println!("reason      {}", reason.lines().next().unwrap_or_default());
    }
    println!(
        "project     {} / environment {}",
        change.project, change.environment
    );
    println!("action      {}", change.action);
    println!("revision    {} ({})", change.git_sha, change.git_rev);
    println!(
        "duration    {}",
        duration_text(change.started_at.as_deref(), change.finished_at.as_deref())
    );
    println!("steps");
    fn walk(steps: &[Step], parent: Option<&str>, depth: usize) {
        for step in steps.iter().filter(|s| s.parent_id.as_deref() == parent) {
            let name = format!("{}{}", "  ".repeat(depth + 1), step.action);
            println!(
                "{:<32} {:<10} {:>8}  {}",
                name,
                step.state,
                duration_text(step.started_at.as_deref(), step.finished_at.as_deref()),
                step.id
            );
            walk(steps, Some(&step.id), depth + 1);
        }
    }
    walk(steps, None, 0);
}

pub fn step(out: Output, step: &Step) {
    if out == Output::Json {
        return json(step);
    }
    println!("step        {}", step.id);
    println!("change      {}", step.change_id);
    println!("action      {}", step.action);
    println!("state       {}", step.state);
    if let Some(reason) = &step.reason {
        println!("reason      {reason}");
    }
    if let Some(code) = step.exit_code {
        println!("exit code   {code}");
    }
    if let Some(image) = &step.image_id {
        let cached = if step.image_cached == Some(true) {
            " (cached)"
        } else {
            ""
        };
        println!("image       {image}{cached}");
    }
    if let (Some(p), Some(e)) = (step.project_version, step.environment_version) {
        println!("started at  project properties v{p}, environment properties v{e}");
    }
    println!(
        "duration    {}",
        duration_text(step.started_at.as_deref(), step.finished_at.as_deref())
    );
    if let Some(props) = &step.properties {
        println!("properties");
        println!(
            "{}",
            serde_json::to_string_pretty(props).expect("values serialise")
        );
    }
}

/// Renders a change's events as they come: one line each, and a spinner for image builds on a terminal.
pub struct EventRenderer {
    out: Output,
    actions: HashMap<String, String>,
    spinners: HashMap<String, indicatif::ProgressBar>,
    tty: bool,
}

impl EventRenderer {
    pub fn new(out: Output, tty: bool) -> EventRenderer {
        EventRenderer {
            out,
            actions: HashMap::new(),
            spinners: HashMap::new(),
            tty,
        }
    }

    fn action(&self, step_id: &str) -> String {
        self.actions
            .get(step_id)
            .cloned()
            .unwrap_or_else(|| step_id.chars().take(8).collect())
    }

    /// Remembers what a filtered-out event says about step names, so later lines carry the action's name.
    pub fn learn(&mut self, record: &EventRecord) {
        if let Event::StepState {
            step_id, action, ..
        } = &record.event
        {
            self.actions.insert(step_id.clone(), action.clone());
        }
    }

    pub fn show(&mut self, record: &EventRecord) {
        if self.out == Output::Json {
            println!(
                "{}",
                serde_json::to_string(record).expect("events serialise")
            );
            return;
        }
        match &record.event {
            Event::ChangeState { state, reason } => match reason {
                Some(reason) => println!("change {}: {state}: {reason}", record.change_id),
                None => println!("change {}: {state}", record.change_id),
            },
            Event::StepState {
                step_id,
                action,
                state,
                reason,
                ..
            } => {
                self.actions.insert(step_id.clone(), action.clone());
                match reason {
                    Some(reason) => println!("[{action}] {state}: {reason}"),
                    None => println!("[{action}] {state}"),
                }
            }
            Event::Phase {
                step_id,
                phase,
                message,
            } => {
                if *phase == Phase::BuildFinished {
                    if let Some(bar) = self.spinners.remove(step_id) {
                        bar.finish_and_clear();
                    }
                }
                println!("[{}] {message}", self.action(step_id));
            }
            Event::Build {
                step_id,
                vertex,
                status,
            } => {
                if self.tty {
                    let bar = self.spinners.entry(step_id.clone()).or_insert_with(|| {
                        let bar = indicatif::ProgressBar::new_spinner();
                        bar.enable_steady_tick(std::time::Duration::from_millis(120));
                        bar
                    });
                    bar.set_message(format!("building: {vertex} ({status:?})").to_lowercase());
                } else if matches!(
                    status,
                    BuildStatus::Completed | BuildStatus::Cached | BuildStatus::Failed
                ) {
                    println!(
                        "[{}] build: {vertex} {}",
                        self.action(step_id),
                        format!("{status:?}").to_lowercase()
                    );
                }
            }
            Event::Log { step_id, line, .. } => println!("[{}] {line}", self.action(step_id)),
        }
    }
}

/// `runner image list`: one line per base runner image (every name it has), newest first.
pub fn base_images(out: Output, images: &[crate::image::layered::BaseImageEntry]) {
    if out == Output::Json {
        return json(images);
    }
    let now = chrono::Utc::now().timestamp();
    println!(
        "{:<48} {:<32} {:<19} {:>9} AGE",
        "NAME", "FROM", "IMAGE ID", "SIZE"
    );
    for image in images {
        let short = |id: &str| {
            let hex = id.trim_start_matches("sha256:");
            hex[..hex.len().min(12)].to_owned()
        };
        let from = match &image.from_id {
            Some(id) => format!("{} ({})", image.from, short(id)),
            None => image.from.clone(),
        };
        let names = if image.names.is_empty() {
            vec!["<untagged>".to_owned()]
        } else {
            image.names.clone()
        };
        for name in names {
            println!(
                "{:<48} {:<32} {:<19} {:>9} {}",
                name,
                from,
                format!("sha256:{}", short(&image.id)),
                size_text(image.size_bytes),
                age_text(now - image.created)
            );
        }
    }
}

fn size_text(bytes: i64) -> String {
    let bytes = bytes.max(0) as f64;
    match bytes {
        b if b >= 1e9 => format!("{:.1}GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1}MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1}kB", b / 1e3),
        b => format!("{b}B"),
    }
}

fn age_text(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The base runner image of a project or environment and where it comes from.
pub fn base_image(out: Output, base: &crate::app::BaseImage) {
    use crate::store::BaseImageSource;
    match out {
        Output::Json => json(base),
        Output::Text => {
            let from = match base.source {
                BaseImageSource::Environment => "set on the environment",
                BaseImageSource::Project => "set on the project",
                BaseImageSource::Operator => "the operator's default",
            };
            println!("{} ({from})", base.image);
        }
    }
}
