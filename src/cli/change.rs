//! `runner change …` and `runner step …`: create, follow, inspect, cancel and retry changes.

use clap::Subcommand;
use std::io::IsTerminal;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::logs::LogPrinter;
use super::remote::{status, Remote};
use super::{render, Output};
use crate::app::App;
use crate::error::{Error, Result};
use crate::events::{ChangeState, Event, EventRecord};
use crate::grpc::{convert, pb};
use crate::logs::view::LogView;
use crate::orchestrator::{CreateChange, Orchestrator};
use crate::store::{ChangeFilter, Signal, Woke};

#[derive(Subcommand, Debug)]
pub enum ChangeCommand {
    /// Create a change and follow it to its end (exit 0 only if it succeeded). Against a PostgreSQL store
    /// (--database) the change is queued for the fleet's workers and followed wherever it runs; against the
    /// SQLite store this process runs it.
    Create {
        #[arg(long, env = "RUNNER_PROJECT")]
        project: String,
        #[arg(long, env = "RUNNER_ENVIRONMENT")]
        environment: String,
        /// Branch, tag, SHA or any revision git understands; resolved once, now.
        #[arg(long)]
        git_rev: String,
        /// The action (from .opschain/actions.json) to run.
        #[arg(long)]
        action: String,
        /// Print the change id and return; the change runs in a background process.
        #[arg(long)]
        background: bool,
        /// Leave the change in the store's queue for a worker of the fleet (`runner worker`, or a `runner
        /// serve`, on any host sharing the store) and follow it there to its end; with --background, print its
        /// id and return. Needs no Docker here. Always so against a PostgreSQL store; refused with --server
        /// (the server runs the changes created through it).
        #[arg(long)]
        enqueue: bool,
    },
    /// Show a change and its tree of steps (of its current attempt unless --attempt says otherwise).
    Show {
        id: String,
        /// An earlier attempt to show (1, 2, …): a retry keeps each attempt's steps and reasons.
        #[arg(long, default_value_t = 0)]
        attempt: i64,
    },
    /// List changes, newest first.
    List {
        #[arg(long, env = "RUNNER_PROJECT")]
        project: Option<String>,
        #[arg(long, env = "RUNNER_ENVIRONMENT")]
        environment: Option<String>,
    },
    /// Print a change's log: phases, build progress and step output. With --output json: one object per log
    /// line (change, step, action, stream, time, seq, line), for log shippers.
    ShowLogs {
        id: String,
        /// Keep printing until the change ends.
        #[arg(long)]
        follow: bool,
        /// Only this step's lines.
        #[arg(long)]
        step: Option<String>,
        /// Only this background service's log lines.
        #[arg(long)]
        service: Option<String>,
        /// Only what happened since then: a duration back from now (10m, 2h) or a time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only log lines matching this regular expression.
        #[arg(long)]
        grep: Option<String>,
        /// Only the last N log lines (then, with --follow, every new one).
        #[arg(long)]
        tail: Option<usize>,
        /// Prefix every line with its time.
        #[arg(long)]
        timestamps: bool,
    },
    /// Stop a change: running steps get SIGTERM, then SIGKILL after the grace period.
    Cancel { id: String },
    /// Run a failed or cancelled change again at the same SHA, from the step that did not succeed.
    Retry {
        id: String,
        #[arg(long)]
        background: bool,
    },
    /// Run an existing change in this process (what --background starts), as the runner process `owner` the
    /// change was created or retried for.
    #[command(hide = true)]
    Run {
        id: String,
        #[arg(long)]
        owner: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum StepCommand {
    /// Show a step: state, image, exit code, the properties it used and the versions it started from.
    Show { id: String },
}

pub async fn change(app: App, cmd: ChangeCommand, out: Output) -> Result<()> {
    match cmd {
        ChangeCommand::Create {
            project,
            environment,
            git_rev,
            action,
            background,
            enqueue,
        } => {
            let request = CreateChange {
                project,
                environment,
                git_rev,
                action,
            };
            // A shared store has a fleet to run its changes: this process only queues and follows.
            if enqueue || app.store.backend() == crate::store::Backend::Postgres {
                let orchestrator = crate::runtime::offline(app)?;
                let change = orchestrator.enqueue_change(&request).await?;
                if background {
                    println!("{}", change.id);
                    return Ok(());
                }
                eprintln!(
                    "change {} created at {} ({}), queued for the fleet's workers",
                    change.id, change.git_sha, change.git_rev
                );
                return follow_in_store(&orchestrator, &change.id, out).await;
            }
            let orchestrator = crate::runtime::local(app).await?;
            if background {
                let id = in_background(&orchestrator, |child| async move {
                    Ok(child.create_change(&request).await?.id)
                })
                .await?;
                println!("{id}");
                return Ok(());
            }
            // The lease is taken before the change exists: from its creation, the change has a live owner.
            let lease = Lease::take(&orchestrator).await?;
            let change = orchestrator.create_change(&request).await;
            let result = match change {
                Ok(change) => {
                    eprintln!(
                        "change {} created at {} ({})",
                        change.id, change.git_sha, change.git_rev
                    );
                    run_in_foreground(&orchestrator, &change.id, out).await
                }
                Err(e) => Err(e),
            };
            lease.give_up().await;
            result
        }
        ChangeCommand::Retry { id, background } => {
            // On a shared store the retried change goes back to the fleet's queue, as a created one does.
            if app.store.backend() == crate::store::Backend::Postgres {
                let orchestrator = crate::runtime::offline(app)?;
                let change = orchestrator.enqueue_retry(&id).await?;
                if background {
                    println!("{}", change.id);
                    return Ok(());
                }
                eprintln!(
                    "change {} queued again for the fleet's workers (attempt {})",
                    change.id, change.attempt
                );
                return follow_in_store(&orchestrator, &change.id, out).await;
            }
            let orchestrator = crate::runtime::local(app).await?;
            if background {
                let id = in_background(&orchestrator, |child| async move {
                    Ok(child.prepare_retry(&id).await?.id)
                })
                .await?;
                println!("{id}");
                return Ok(());
            }
            let lease = Lease::take(&orchestrator).await?;
            let result = match orchestrator.prepare_retry(&id).await {
                Ok(_) => run_in_foreground(&orchestrator, &id, out).await,
                Err(e) => Err(e),
            };
            lease.give_up().await;
            result
        }
        ChangeCommand::Run { id, owner } => {
            let orchestrator = crate::runtime::local_as(app, Some(owner)).await?;
            let lease = Lease::take(&orchestrator).await?;
            let result = run_in_foreground(&orchestrator, &id, Output::Text).await;
            lease.give_up().await;
            result
        }
        ChangeCommand::Show { id, attempt } => {
            // Changes whose runner died are ended first (no Docker needed), so what is shown is the truth.
            crate::orchestrator::reap_changes(&app.store, None).await?;
            let attempts = app.store.change(&id).await?.attempt;
            let change = app.store.change_in_attempt(&id, attempt).await?;
            let steps = app.store.steps_in_attempt(&id, attempt).await?;
            render::change(out, &change, &steps, attempts);
            Ok(())
        }
        ChangeCommand::List {
            project,
            environment,
        } => {
            let filter = ChangeFilter {
                project,
                environment,
                ..Default::default()
            };
            crate::orchestrator::reap_changes(&app.store, None).await?;
            render::changes(out, &app.store.list_changes(&filter).await?);
            Ok(())
        }
        ChangeCommand::ShowLogs {
            id,
            follow,
            step,
            service,
            since,
            grep,
            tail,
            timestamps,
        } => {
            let view = log_view(step, service, since, grep, tail)?;
            show_logs(&app, &id, follow, &view, LogPrinter::new(out, timestamps)).await
        }
        ChangeCommand::Cancel { id } => {
            let orchestrator = crate::runtime::offline(app)?;
            let change = orchestrator.cancel_change(&id).await?;
            eprintln!("change {id}: cancel requested ({})", change.state);
            Ok(())
        }
    }
}

pub async fn step(app: App, cmd: StepCommand, out: Output) -> Result<()> {
    match cmd {
        StepCommand::Show { id } => {
            let step = app.store.step(&id).await?;
            render::step(out, &step);
            Ok(())
        }
    }
}

/// This process's lease, held while it runs changes; given up only once they have ended.
struct Lease {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    async fn take(orchestrator: &Orchestrator) -> Result<Lease> {
        let stop = CancellationToken::new();
        let task = orchestrator.hold_lease(stop.clone()).await?;
        Ok(Lease { stop, task })
    }

    async fn give_up(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Creates or retries a change (`start`) for a new runner process that then runs it in the background: the change
/// is owned by that process from the start. Its lease is taken here first (with this process's pid, then the
/// child's), so no reaper ever sees the change without a live owner, and a change whose child died is reaped.
async fn in_background<F, Fut>(orchestrator: &Orchestrator, start: F) -> Result<String>
where
    F: FnOnce(Orchestrator) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let owner = uuid::Uuid::new_v4().to_string();
    let child = orchestrator.clone().with_owner(owner.clone());
    child.take_lease_for(std::process::id()).await?;
    let id = match start(child.clone()).await {
        Ok(id) => id,
        Err(e) => {
            let _ = orchestrator.app().store.drop_lease(&owner).await;
            return Err(e);
        }
    };
    let pid = spawn_background(orchestrator, &id, &owner)?;
    child.take_lease_for(pid).await?;
    Ok(id)
}

/// Starts `runner change run ID --owner OWNER` as a detached process that outlives this one; its output goes to a
/// log file. Returns its pid.
fn spawn_background(orchestrator: &Orchestrator, id: &str, owner: &str) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let home = &orchestrator.app().home;
    let log_dir = home.join("logs");
    let io = |source| Error::Home {
        path: log_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&log_dir).map_err(io)?;
    let log = std::fs::File::create(log_dir.join(format!("{id}.log"))).map_err(io)?;
    let exe = std::env::current_exe().map_err(io)?;
    let child = std::process::Command::new(exe)
        .args(["--home"])
        .arg(home)
        .args(["change", "run", id, "--owner", owner])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io)?;
    Ok(child.id())
}

/// Runs the change here, rendering its events as they happen. SIGTERM, SIGINT or SIGHUP cancels it; this returns
/// once its steps have stopped and their containers are gone (the caller gives up the lease after that).
async fn run_in_foreground(orchestrator: &Orchestrator, id: &str, out: Output) -> Result<()> {
    let mut events = orchestrator.subscribe();
    let cancel = CancellationToken::new();
    let signals = crate::daemon::shutdown::signals().map_err(|source| Error::Home {
        path: "signal handlers".into(),
        source,
    })?;
    let on_signal = {
        let (cancel, id) = (cancel.clone(), id.to_owned());
        tokio::spawn(async move {
            let signal = signals.await;
            eprintln!("{signal}: cancelling change {id}; its steps get SIGTERM, then SIGKILL after the grace period");
            cancel.cancel();
        })
    };
    let id_owned = id.to_owned();
    let render_task = tokio::spawn(async move {
        let mut renderer = render::EventRenderer::new(out, std::io::stderr().is_terminal());
        loop {
            match events.recv().await {
                Ok(record) if record.change_id == id_owned => {
                    let done = matches!(record.event, Event::ChangeState { state, .. } if state.is_final());
                    renderer.show(&record);
                    if done {
                        break;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    });
    let change = orchestrator.run_change(id, cancel).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), render_task).await;
    on_signal.abort();
    outcome(change?)
}

/// Follows a change whichever worker runs it, from the events in the store, to its end. A signal asks for the
/// change to be cancelled (its worker stops it) and keeps following until it has ended.
async fn follow_in_store(orchestrator: &Orchestrator, id: &str, out: Output) -> Result<()> {
    let store = &orchestrator.app().store;
    let mut signals =
        Box::pin(
            crate::daemon::shutdown::signals().map_err(|source| Error::Home {
                path: "signal handlers".into(),
                source,
            })?,
        );
    let mut renderer = render::EventRenderer::new(out, std::io::stderr().is_terminal());
    let (mut after, mut cancelled, mut told, mut quiet) = (0, false, false, false);
    // Taken before the first read: whatever a worker stores after it wakes this follower.
    let mut stored = store.change_signal(id).await;
    loop {
        let records = store.events_after(id, after).await?;
        for record in &records {
            after = record.seq;
            renderer.show(record);
        }
        let change = store.change(id).await?;
        let ended = records.iter().any(|r| ends(r, &change));
        if ended || records.is_empty() && change.state.is_final() && quiet {
            return outcome(store.change(id).await?);
        }
        if !told && change.owner.is_none() && !cancelled && !any_live_lease(store).await? {
            eprintln!(
                "change {id} waits in the queue, but no worker serves this store (no live lease): start one on a \
                 host with Docker, `runner worker` with the same --database (or RUNNER_DATABASE_URL), or a \
                 `runner serve` there; Ctrl-C cancels the change"
            );
            told = true;
        }
        tokio::select! {
            signal = &mut signals, if !cancelled => {
                eprintln!("{signal}: cancelling change {id}; its worker stops its steps");
                orchestrator.cancel_change(id).await?;
                cancelled = true;
            }
            woke = stored.wait_at_most(end_wait(&change, &stored)) => quiet = woke == Woke::Fallback,
        }
    }
}

/// Whether `record` is the end of `change`'s current attempt (an earlier attempt's end was retried).
fn ends(record: &EventRecord, change: &crate::store::Change) -> bool {
    matches!(record.event, Event::ChangeState { state, .. } if state.is_final())
        && record.attempt >= change.attempt
}

/// How long a follower waits for news: its fallback, but once the change has ended only briefly. A change's final
/// state is stored before the last events (its runner's recorder stores them after), so a follower that sees
/// the state waits for them, until its final event comes or the store stays quiet that long (a runner that died
/// in between never stores it).
fn end_wait(change: &crate::store::Change, stored: &Signal) -> Duration {
    if change.state.is_final() {
        stored.fallback().min(Duration::from_secs(2))
    } else {
        stored.fallback()
    }
}

/// Whether some runner process holds an unexpired lease on the store (by the store's clock): one that may take
/// queued changes.
async fn any_live_lease(store: &crate::store::Store) -> Result<bool> {
    let now = store.clock_ms().await?;
    Ok(store.leases().await?.iter().any(|l| l.expires_at > now))
}

/// Success only if the change succeeded; otherwise its state and a one-line reason (details, e.g. a conflict
/// report, are in the log above and in `change show-logs`).
fn outcome(change: crate::store::Change) -> Result<()> {
    match change.state {
        ChangeState::Success => Ok(()),
        state => Err(Error::ChangeFailed {
            id: change.id,
            state: state.to_string(),
            reason: change
                .reason
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        }),
    }
}

fn log_view(
    step: Option<String>,
    service: Option<String>,
    since: Option<String>,
    grep: Option<String>,
    tail: Option<usize>,
) -> Result<LogView> {
    let now = chrono::Utc::now().timestamp_millis();
    LogView::parse(step, service, since.as_deref(), grep.as_deref(), tail, now).map_err(|e| {
        Error::Refused {
            message: e.to_string(),
        }
    })
}

/// Shows what is stored (with `--tail`, its last lines), then with `--follow` what comes until the change ends.
async fn show_logs(
    app: &App,
    id: &str,
    follow: bool,
    view: &LogView,
    mut printer: LogPrinter,
) -> Result<()> {
    app.store.change(id).await?;
    let mut after = 0;
    let mut first = true;
    // Taken before the first read: whatever a worker on any host stores after it wakes this follower.
    let mut stored = app.store.change_signal(id).await;
    let (mut ended, mut quiet) = (false, false);
    loop {
        let records: Vec<EventRecord> = app.store.events_after(id, after).await?;
        if let Some(last) = records.last() {
            after = last.seq;
        }
        records.iter().for_each(|r| printer.learn(r));
        let shown = if first {
            view.select(&records)
        } else {
            records.iter().filter(|r| view.wants(r)).collect()
        };
        first = false;
        for record in shown {
            printer.show(record);
        }
        printer.flush();
        if printer.closed() || !follow {
            return Ok(());
        }
        let change = app.store.change(id).await?;
        // The current attempt's end (an earlier attempt's end was retried).
        ended |= records.iter().any(|r| ends(r, &change));
        if ended || change.state.is_final() && records.is_empty() && quiet {
            return Ok(());
        }
        quiet = stored.wait_at_most(end_wait(&change, &stored)).await == Woke::Fallback;
    }
}

/// What `change …` cannot mean with --server, refused before the server is contacted. `--enqueue` is refused
/// rather than ignored: the server runs the changes created through it (its own worker), and a queue a user can
/// reach only through the store is the store's, so the user is told where it is.
pub fn refuse_with_server(cmd: &ChangeCommand) -> Result<()> {
    match cmd {
        ChangeCommand::Create { enqueue: true, .. } => Err(Error::Refused {
            message: "--enqueue does not apply with --server: the server runs the changes created through it. To \
                      leave a change in the queue of a fleet's PostgreSQL store, create it against the store \
                      instead: `runner change create --database postgres://…` without --server (against \
                      PostgreSQL it queues the change and follows it)"
                .into(),
        }),
        _ => Ok(()),
    }
}

/// `change …` against `runner serve`.
pub async fn change_remote(remote: Remote, cmd: ChangeCommand, out: Output) -> Result<()> {
    let mut changes = remote.changes();
    match cmd {
        ChangeCommand::Create {
            project,
            environment,
            git_rev,
            action,
            background,
            // Refused before the server is contacted (`refuse_with_server`).
            enqueue: _,
        } => {
            let request = pb::CreateChangeRequest {
                project,
                environment,
                git_rev,
                action,
                ..Default::default()
            };
            let change = changes
                .create_change(remote.request(request))
                .await
                .map_err(status)?
                .into_inner();
            if background {
                println!("{}", change.id);
                return Ok(());
            }
            eprintln!(
                "change {} created at {} ({}) on {}",
                change.id,
                change.git_sha,
                change.git_rev,
                remote.url()
            );
            follow_remote(&remote, &change.id, out).await
        }
        ChangeCommand::Retry { id, background } => {
            changes
                .retry_change(remote.request(pb::RetryChangeRequest {
                    id: id.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(status)?;
            if background {
                println!("{id}");
                return Ok(());
            }
            follow_remote(&remote, &id, out).await
        }
        ChangeCommand::Run { .. } => Err(Error::InvalidArgument {
            what: "command for --server",
            value: "change run".into(),
            expected: "the server runs the changes created through it",
        }),
        ChangeCommand::Show { id, attempt } => {
            let detail = changes
                .get_change(remote.request(pb::GetChangeRequest { id, attempt }))
                .await
                .map_err(status)?
                .into_inner();
            let change = convert::change_from(detail.change.unwrap_or_default());
            let steps: Vec<_> = detail.steps.into_iter().map(convert::step_from).collect();
            render::change(out, &change, &steps, detail.attempts);
            Ok(())
        }
        ChangeCommand::List {
            project,
            environment,
        } => {
            let mut all = vec![];
            let mut page_token = String::new();
            loop {
                let request = pb::ListChangesRequest {
                    project: project.clone().unwrap_or_default(),
                    environment: environment.clone().unwrap_or_default(),
                    page_size: 200,
                    page_token,
                    ..Default::default()
                };
                let page = changes
                    .list_changes(remote.request(request))
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(page.changes.into_iter().map(convert::change_from));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            render::changes(out, &all);
            Ok(())
        }
        ChangeCommand::ShowLogs {
            id,
            follow,
            step,
            service,
            since,
            grep,
            tail,
            timestamps,
        } => {
            let view = log_view(step, service, since, grep, tail)?;
            let mut printer = LogPrinter::new(out, timestamps);
            let mut after = 0;
            if view.tail.is_some() {
                // The last lines of the history first, then (with --follow) every new one.
                let mut history = vec![];
                watch_remote(&remote, &id, 0, true, |r| history.push(r.clone())).await?;
                history.iter().for_each(|r| printer.learn(r));
                view.select(&history)
                    .into_iter()
                    .for_each(|r| printer.show(r));
                after = history.last().map_or(0, |r| r.seq);
                if !follow {
                    printer.flush();
                    return Ok(());
                }
            }
            watch_remote(&remote, &id, after, !follow, |record| {
                printer.learn(record);
                if view.wants(record) {
                    printer.show(record);
                }
            })
            .await?;
            printer.flush();
            Ok(())
        }
        ChangeCommand::Cancel { id } => {
            let change = changes
                .cancel_change(remote.request(pb::CancelChangeRequest {
                    id: id.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(status)?
                .into_inner();
            eprintln!("change {id}: cancel requested ({})", change.state);
            Ok(())
        }
    }
}

/// `step …` against `runner serve`.
pub async fn step_remote(remote: Remote, cmd: StepCommand, out: Output) -> Result<()> {
    match cmd {
        StepCommand::Show { id } => {
            let step = remote
                .changes()
                .get_step(remote.request(pb::GetStepRequest { id, attempt: 0 }))
                .await
                .map_err(status)?
                .into_inner();
            render::step(out, &convert::step_from(step));
            Ok(())
        }
    }
}

/// Streams a change's events (the history, then live ones unless `history_only`) into `show`.
async fn watch_remote(
    remote: &Remote,
    id: &str,
    after_seq: i64,
    history_only: bool,
    mut show: impl FnMut(&EventRecord),
) -> Result<()> {
    let request = pb::WatchChangeRequest {
        id: id.to_owned(),
        after_seq,
        history_only,
    };
    let mut stream = remote
        .changes()
        .watch_change(remote.request(request))
        .await
        .map_err(status)?
        .into_inner();
    // A stream that breaks (the server stopped or the network dropped) says which change and how to re-attach.
    let lost = |e: tonic::Status| {
        Error::Remote {
        code: tonic::Code::Unavailable,
        message: format!(
            "lost the server at {} while following change {id} ({}); the change is not cancelled by this: if the server is running again, re-attach with `runner --server {} change show-logs --follow {id}`, or see its state with `runner --server {} change show {id}`",
            remote.url(),
            e.message(),
            remote.url(),
            remote.url(),
        ),
    }
    };
    while let Some(event) = stream.message().await.map_err(lost)? {
        if let Some(record) = convert::record_from(event) {
            show(&record);
        }
    }
    Ok(())
}

/// Follows a change the server runs to its end; succeeds only if the change did.
async fn follow_remote(remote: &Remote, id: &str, out: Output) -> Result<()> {
    let mut renderer = render::EventRenderer::new(out, std::io::stderr().is_terminal());
    watch_remote(remote, id, 0, false, |record| renderer.show(record)).await?;
    let detail = remote
        .changes()
        .get_change(remote.request(pb::GetChangeRequest {
            id: id.to_owned(),
            attempt: 0,
        }))
        .await
        .map_err(status)?
        .into_inner();
    outcome(convert::change_from(detail.change.unwrap_or_default()))
}
