//! Recording a change's story: events are masked, stored, then broadcast; step transitions and phases are
//! emitted as events.

use super::{EventTx, Orchestrator};
use crate::error::Result;
use crate::events::{Event, Phase};
use crate::mask::Masker;
use crate::store::Step;

impl Orchestrator {
    /// Starts a task that stores, then broadcasts, every event and output line sent to the returned sender,
    /// masking secrets (see [`crate::logs::recorder`]).
    pub(super) fn recorder(
        &self,
        change_id: &str,
        masker: Masker,
    ) -> (EventTx, tokio::task::JoinHandle<()>) {
        crate::logs::recorder(
            self.app.store.clone(),
            self.live.clone(),
            change_id,
            masker,
            self.settings.logs,
        )
    }

    /// Every secret value the store holds: whatever a step could see is masked in what is stored and streamed.
    pub(super) fn masker(&self) -> Result<Masker> {
        let mut values = Vec::new();
        for (name, _) in self.app.secrets.list()? {
            values.extend(self.app.secrets.get(&name)?.0.into_values());
        }
        Ok(Masker::new(values.iter().map(String::as_str)))
    }

    pub(super) fn phase(events: &EventTx, step: &Step, phase: Phase, message: String) {
        let _ = events.send(Event::Phase {
            step_id: step.id.clone(),
            phase,
            message,
        });
    }
}
