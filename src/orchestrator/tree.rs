//! The walk of a change's step tree: a step's own work, then its children, sequentially or in parallel; a
//! retry resumes below steps whose own work already succeeded.

use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use tracing::Instrument;

use super::step::Own;
use super::{Orchestrator, Run};
use crate::actions::RunAs;
use crate::error::Result;
use crate::events::StepState;
use crate::store::{Step, StepFinish};

impl Orchestrator {
    /// Runs a step and then its children; returns its final state and, on failure, why.
    pub(super) fn run_tree(
        &self,
        run: Arc<Run>,
        step: Step,
    ) -> BoxFuture<'_, Result<(StepState, Option<String>)>> {
        async move {
            let store = &self.app.store;
            // On a retry, a step whose own work succeeded earlier (it recorded its children) is not run again; its
            // subtree carries on from whatever did not succeed.
            if step.state == StepState::Success || step.children_strategy.is_some() {
                let strategy = match step.children_strategy.as_deref() {
                    Some("parallel") => RunAs::Parallel,
                    _ => RunAs::Sequential,
                };
                let children: Vec<Step> = store.steps(&run.change.id).await?.into_iter().filter(|s| s.parent_id.as_deref() == Some(&step.id)).collect();
                return self.run_children(run, &step, children, strategy).await;
            }
            if run.cancel.is_cancelled() {
                self.finish_step(&run.events, &step, StepState::Cancelled, StepFinish::default()).await?;
                return Ok((StepState::Cancelled, Some("cancelled".into())));
            }
            let action = run.manifest.action(&run.manifest_path, &step.action)?.clone();
            let span = tracing::info_span!("step", change_id = %run.change.id, step_id = %step.id, action = %step.action);
            let own = self.run_own(&run, &step, &action).instrument(span).await?;
            match own {
                Own::Failed(state, reason) => Ok((state, Some(reason))),
                Own::Succeeded(children, _) if children.is_empty() => Ok((StepState::Success, None)),
                Own::Succeeded(children, strategy) => {
                    self.run_children(run, &step, children, strategy).await
                }
            }
        }
        .boxed()
    }

    async fn run_children(
        &self,
        run: Arc<Run>,
        parent: &Step,
        children: Vec<Step>,
        strategy: RunAs,
    ) -> Result<(StepState, Option<String>)> {
        let ignored = |step: &Step| {
            run.manifest
                .actions
                .get(&step.action)
                .is_some_and(|a| a.ignore_failure)
        };
        let mut failure: Option<(StepState, String)> = None;
        match strategy {
            RunAs::Sequential => {
                for (position, child) in children.into_iter().enumerate() {
                    if position > 0 {
                        super::crash_point::reached("between-steps").await;
                    }
                    if let Some((state, _)) = &failure {
                        if child.state != StepState::Success {
                            let aborted = if *state == StepState::Cancelled {
                                StepState::Cancelled
                            } else {
                                StepState::Aborted
                            };
                            self.finish_step(
                                &run.events,
                                &child,
                                aborted,
                                StepFinish {
                                    reason: Some("an earlier sibling failed".into()),
                                    ..Default::default()
                                },
                            )
                            .await?;
                        }
                        continue;
                    }
                    let action = child.action.clone();
                    let ignore = ignored(&child);
                    let (state, reason) = self.run_tree(run.clone(), child).await?;
                    if state != StepState::Success && !ignore {
                        failure = Some((
                            state,
                            reason.unwrap_or_else(|| format!("step {action} failed")),
                        ));
                    }
                }
            }
            RunAs::Parallel => {
                let results = futures::future::join_all(children.into_iter().map(|child| {
                    let ignore = ignored(&child);
                    let action = child.action.clone();
                    self.run_tree(run.clone(), child)
                        .map(move |r| (r, ignore, action))
                }))
                .await;
                for (result, ignore, action) in results {
                    let (state, reason) = result?;
                    if state != StepState::Success
                        && !ignore
                        && failure
                            .as_ref()
                            .is_none_or(|(s, _)| *s == StepState::Cancelled)
                    {
                        failure = Some((
                            state,
                            reason.unwrap_or_else(|| format!("step {action} failed")),
                        ));
                    }
                }
            }
        }
        let (state, reason) = match failure {
            None => (StepState::Success, None),
            Some((StepState::Cancelled, reason)) => (StepState::Cancelled, Some(reason)),
            Some((_, reason)) => (StepState::Error, Some(reason)),
        };
        if parent.state != StepState::Success || state != StepState::Success {
            self.finish_step(
                &run.events,
                parent,
                state,
                StepFinish {
                    reason: reason.clone(),
                    ..Default::default()
                },
            )
            .await?;
        }
        Ok((state, reason))
    }
}
