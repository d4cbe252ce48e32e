//! A change's life in its environment's queue: created, queued until its environment is free (one change at a
//! time, in creation order), driven to its end, cancelled or retried.

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{reaper, CreateChange, Orchestrator};
use crate::error::{Error, Result};
use crate::events::{ChangeState, Event};
use crate::policy::Subject;
use crate::properties::SecretKind;
use crate::store::{Change, Claim, ClaimScope, Transition};

impl Orchestrator {
    /// Creates a change: resolves the revision to a SHA once (everything after uses that SHA, retries included)
    /// and checks the action exists, before anything runs.
    pub async fn create_change(&self, request: &CreateChange) -> Result<Change> {
        self.create_labelled_change(request, &Default::default())
            .await
    }

    /// [`create_change`](Self::create_change) with a scheduler's labels, stored with the change.
    pub async fn create_labelled_change(
        &self,
        request: &CreateChange,
        labels: &crate::store::Labels,
    ) -> Result<Change> {
        self.create_owned_change(request, labels, &self.owner).await
    }

    /// Creates a change no runner process holds: it waits `pending` in the store until a worker of the fleet
    /// (`runner worker`, or `runner serve`'s) starts it when its environment is free. The same checks as
    /// [`create_change`](Self::create_change) run first, here.
    pub async fn enqueue_change(&self, request: &CreateChange) -> Result<Change> {
        self.create_owned_change(request, &Default::default(), "")
            .await
    }

    /// `owner` empty: nobody's yet.
    async fn create_owned_change(
        &self,
        request: &CreateChange,
        labels: &crate::store::Labels,
        owner: &str,
    ) -> Result<Change> {
        let store = &self.app.store;
        let project = store.project(&request.project).await?;
        let environment = store
            .environment(&request.project, &request.environment)
            .await?;
        let sha = self.sources.resolve(&project, &request.git_rev).await?;
        let (manifest, path) = self.manifest(&project, &sha).await?;
        let action = manifest.action(&path, &request.action)?;
        // What the operator has not granted fails here, before anything runs (and again before each step).
        let subject = Subject::Change {
            project: &project.code,
            environment: &environment.code,
        };
        self.app.policy.require_action(subject, action)?;
        // Every step the action runs must fit the operator's limits: one asking for too much fails the change here.
        for name in manifest.reachable(&request.action) {
            if let Some(reached) = manifest.actions.get(name) {
                self.app.policy.action_resources(subject, reached)?;
            }
        }
        let project_props = store.properties(&(&project).into(), None).await?;
        let environment_props = store.properties(&(&environment).into(), None).await?;
        for kind in [SecretKind::Build, SecretKind::Runner] {
            self.granted_secret_names(
                subject,
                &project_props.document,
                &environment_props.document,
                "project/environment",
                kind,
            )?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        store
            .create_change_with_root(
                &crate::store::NewChange {
                    id: &id,
                    project_id: project.id,
                    environment_id: environment.id,
                    action: &request.action,
                    git_rev: &request.git_rev,
                    git_sha: &sha,
                    root_step_id: &uuid::Uuid::new_v4().to_string(),
                    owner,
                    labels,
                },
                action.ignore_failure,
                action.retry_on_worker_loss,
            )
            .await?;
        let record = store
            .append_event(
                &id,
                &Event::ChangeState {
                    state: ChangeState::Pending,
                    reason: None,
                },
            )
            .await?;
        let _ = self.live.send(record);
        Ok(store.change(&id).await?)
    }

    /// Asks a change to stop. The runner running it (in any process) stops it; a change whose runner died is
    /// ended `cancelled` at once.
    pub async fn cancel_change(&self, id: &str) -> Result<Change> {
        let store = &self.app.store;
        let change = store.change(id).await?;
        if change.state.is_final() {
            return Ok(change);
        }
        for record in store.request_cancel(id).await? {
            let _ = self.live.send(record);
        }
        for reaped in reaper::reap_changes(store, Some(&self.owner)).await? {
            for record in reaped.events {
                let _ = self.live.send(record);
            }
        }
        Ok(store.change(id).await?)
    }

    /// Makes a failed or cancelled change runnable again by this process, at the same SHA; steps that succeeded
    /// are kept. Of two concurrent retries one wins; the other is told the change is already running.
    pub async fn prepare_retry(&self, id: &str) -> Result<Change> {
        self.reset_for(id, &self.owner).await
    }

    /// Makes a failed or cancelled change runnable again by the fleet: it waits `pending`, owned by nobody, until a
    /// worker starts it when its environment is free; steps that succeeded are kept, as with
    /// [`prepare_retry`](Self::prepare_retry).
    pub async fn enqueue_retry(&self, id: &str) -> Result<Change> {
        self.reset_for(id, "").await
    }

    /// `owner` empty: nobody's (the fleet's).
    async fn reset_for(&self, id: &str, owner: &str) -> Result<Change> {
        let store = &self.app.store;
        if let Err(change) = store.reset_change(id, owner).await? {
            return Err(match change.state {
                ChangeState::Success => Error::NotRetryable {
                    id: id.to_owned(),
                    state: change.state.to_string(),
                },
                state => Error::ChangeBusy {
                    id: id.to_owned(),
                    state: state.to_string(),
                    hint: format!(
                        "it is already running (another retry or run holds it), and only a change that ended in error or was cancelled can be retried; follow it with `runner change show-logs --follow {id}` or stop it with `runner change cancel {id}`"
                    ),
                },
            });
        }
        super::crash_point::reached("retrying").await;
        Ok(store.change(id).await?)
    }

    /// Runs a created (or retried) change to its end: waits for its environment, runs its step tree, and
    /// returns the change in its final state. `cancel` (or `runner change cancel` from anywhere) stops it.
    pub async fn run_change(&self, id: &str, cancel: CancellationToken) -> Result<Change> {
        let span = tracing::info_span!("change", change_id = %id);
        self.run_change_inner(id, cancel).instrument(span).await
    }

    async fn run_change_inner(&self, id: &str, cancel: CancellationToken) -> Result<Change> {
        let store = &self.app.store;
        let change = store.change(id).await?;
        if change.state != ChangeState::Pending || change.owner.as_deref() != Some(&self.owner) {
            // A change runs at most once per creation or retry, in the process that holds it.
            return Err(Error::ChangeBusy {
                id: id.to_owned(),
                state: change.state.to_string(),
                hint: match change.state {
                    ChangeState::Success | ChangeState::Error | ChangeState::Cancelled => {
                        format!("it has ended; run it again with `runner change retry {id}`")
                    }
                    _ => format!(
                        "another runner process holds it; follow it with `runner change show-logs --follow {id}`"
                    ),
                },
            });
        }
        // Its steps ended it (the store ends a change with its root step); otherwise it ended before they ran.
        let ended = match self.drive(change, cancel).await {
            Ok(None) => None,
            Ok(Some(end)) => Some(end),
            Err(e) => Some((ChangeState::Error, Some(crate::error::error_text(&e)))),
        };
        if let Some((state, reason)) = ended {
            let reason = self.masker()?.mask_opt(reason);
            match store
                .finish_change(id, &self.owner, state, reason.as_deref())
                .await?
            {
                Transition::Done => {
                    self.record(id, Event::ChangeState { state, reason })
                        .await?
                }
                Transition::Refused => {
                    tracing::warn!(change_id = %id, "the change was ended elsewhere (reaped?) before this runner ended it")
                }
            }
        }
        Ok(store.change(id).await?)
    }

    /// Stores a change's event (in order with what its steps' transitions record) and tells live watchers.
    async fn record(&self, id: &str, event: Event) -> Result<()> {
        let record = self.app.store.append_event(id, &event).await?;
        let _ = self.live.send(record);
        Ok(())
    }

    /// Cancels `cancel` when the change's cancel flag is set in the store (by any process).
    pub(super) fn watch_cancel(
        &self,
        id: &str,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (store, id, poll) = (self.app.store.clone(), id.to_owned(), self.settings.poll);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
                if matches!(store.change(&id).await, Ok(c) if c.cancel_requested) {
                    cancel.cancel();
                    return;
                }
            }
        })
    }

    /// Queues the change, waits for its environment, then claims and runs its steps until it ends. `Some`: how
    /// it ended before its steps ran (the caller records it); `None`: its steps ran and the store ended it.
    async fn drive(
        &self,
        change: Change,
        cancel: CancellationToken,
    ) -> Result<Option<(ChangeState, Option<String>)>> {
        let store = &self.app.store;
        let change_id = change.id.clone();
        let stopped = |what: &'static str| async move {
            let now = store.change(&change_id).await?;
            Ok::<_, Error>(Some(if now.cancel_requested {
                (ChangeState::Cancelled, Some(format!("cancelled {what}")))
            } else {
                (
                    ChangeState::Error,
                    Some(format!(
                        "the change is {} and no longer held by this runner process; it was not run",
                        now.state
                    )),
                )
            }))
        };
        if store.queue_change(&change.id, &self.owner).await? == Transition::Refused {
            return stopped("before it started").await;
        }
        self.record(
            &change.id,
            Event::ChangeState {
                state: ChangeState::Queued,
                reason: None,
            },
        )
        .await?;
        super::crash_point::reached("queued").await;
        let watch = self.watch_cancel(&change.id, cancel.clone());
        let claimed = loop {
            match store.claim_environment(&change.id, &self.owner).await? {
                Claim::Claimed => break true,
                Claim::Lost => break false,
                Claim::Blocked => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => break false,
                _ = tokio::time::sleep(self.settings.poll) => {}
            }
        };
        watch.abort();
        if !claimed {
            if cancel.is_cancelled() && !store.change(&change.id).await?.cancel_requested {
                return Ok(Some((
                    ChangeState::Cancelled,
                    Some("cancelled while queued".into()),
                )));
            }
            return stopped("while queued").await;
        }
        self.record(
            &change.id,
            Event::ChangeState {
                state: ChangeState::Running,
                reason: None,
            },
        )
        .await?;
        let id = change.id.clone();
        let context = self.context(self.change_run(change).await?, cancel.clone());
        self.run_own_change(&id, context).await?;
        Ok(None)
    }

    /// Claims and runs every ready step of the change this process runs, all at once, until the change ends. A
    /// cancel of this process's run is a cancel of the change: its waiting steps end at once, running ones stop.
    async fn run_own_change(&self, id: &str, context: super::steps::Context) -> Result<()> {
        let store = self.app.store.clone();
        let mut signal = store.work_signal().await;
        let mut running = tokio::task::JoinSet::new();
        let mut cancel_sent = false;
        loop {
            while let Some(claimed) = store
                .claim_step(&self.owner, ClaimScope::Change(id))
                .await?
            {
                let (me, run, cancel) = (self.clone(), context.run.clone(), context.cancel.clone());
                running.spawn(async move { me.run_claimed(run, cancel, claimed).await });
            }
            if running.is_empty() && store.change(id).await?.state.is_final() {
                return Ok(());
            }
            tokio::select! {
                _ = context.cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    for record in store.request_cancel(id).await? {
                        let _ = self.live.send(record);
                    }
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = signal.wait_at_most(self.settings.poll) => {}
            }
        }
    }
}
