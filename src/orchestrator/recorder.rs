//! Recording a change's story: events are masked, stored, then broadcast; step transitions and phases are
//! emitted as events.

use tokio::sync::mpsc;

use super::{EventTx, Orchestrator};
use crate::error::Result;
use crate::events::{Event, Masker, Phase, StepState};
use crate::store::{Step, StepFinish};

impl Orchestrator {
    /// Starts a task that stores, then broadcasts, every event sent to the returned sender, masking secrets.
    pub(super) fn recorder(
        &self,
        change_id: &str,
        masker: Masker,
    ) -> (EventTx, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let (store, live, change_id) = (
            self.app.store.clone(),
            self.live.clone(),
            change_id.to_owned(),
        );
        let task = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let event = masker.mask_event(event);
                match store.append_event(&change_id, &event).await {
                    Ok(record) => {
                        let _ = live.send(record);
                    }
                    Err(e) => tracing::error!(error = %e, change_id, "failed to store an event"),
                }
            }
        });
        (tx, task)
    }

    /// Every secret value the store holds: whatever a step could see is masked in what is stored and streamed.
    pub(super) fn masker(&self) -> Result<Masker> {
        let mut values = Vec::new();
        for (name, _) in self.app.secrets.list()? {
            values.extend(self.app.secrets.get(&name)?.0.into_values());
        }
        Ok(Masker::new(values.iter().map(String::as_str)))
    }

    pub(super) async fn finish_step(
        &self,
        events: &EventTx,
        step: &Step,
        state: StepState,
        finish: StepFinish,
    ) -> Result<()> {
        self.app.store.finish_step(&step.id, state, &finish).await?;
        let _ = events.send(Event::StepState {
            step_id: step.id.clone(),
            parent_id: step.parent_id.clone(),
            action: step.action.clone(),
            state,
            reason: finish.reason,
        });
        Ok(())
    }

    pub(super) fn phase(events: &EventTx, step: &Step, phase: Phase, message: String) {
        let _ = events.send(Event::Phase {
            step_id: step.id.clone(),
            phase,
            message,
        });
    }
}
