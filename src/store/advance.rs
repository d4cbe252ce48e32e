//! How a change's step tree moves on, as a pure function of the tree as stored: the store runs it inside the
//! transaction that records a step's end (or its children), a change's start, a cancel or a worker's loss, and
//! applies the updates it returns in that same transaction. No process holds the walk in memory, so any worker
//! can settle any step and the next steps become `ready` for whichever worker claims them.
//!
//! The rules are those of a walk from the root:
//! - a step that recorded children: its first child (sequential) or all of them (parallel) become ready;
//! - a step that ended, under a sequential parent: the next sibling becomes ready; on a failure (not ignored) the
//!   later siblings end `aborted` (`cancelled` if the failure was a cancel) with "an earlier sibling failed",
//!   and the parent ends with the failure's reason (`step ACTION failed` when it had none);
//! - under a parallel parent: once every child has ended, the parent ends — `error` if a child failed (its reason;
//!   a real failure's reason wins over a cancel's), `cancelled` if the only failures were cancels, else
//!   `success`;
//! - a parent's end moves its own parent on the same way; the root's end is the change's end.
//!
//! [`resume`] starts a change (or a retry of one): a step that succeeded, or whose own work succeeded (it recorded
//! children), is not run again; the walk descends into whatever below it has not succeeded.

use crate::events::{ChangeState, StepState};

/// How a step's children run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Sequential,
    Parallel,
}

impl Strategy {
    pub fn parse(text: &str) -> Strategy {
        match text {
            "parallel" => Strategy::Parallel,
            _ => Strategy::Sequential,
        }
    }
}

/// One step of the tree, as far as advancing it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: String,
    pub parent: Option<String>,
    pub position: i64,
    pub action: String,
    pub state: StepState,
    pub reason: Option<String>,
    /// Set once the step's own work succeeded and it recorded children.
    pub strategy: Option<Strategy>,
    pub ignore_failure: bool,
}

/// A change to the stored tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The step's new state (`ready`, `running` for a parent resumed below, or a final one) and reason.
    Step {
        id: String,
        state: StepState,
        reason: Option<String>,
    },
    /// The root ended: so does the change.
    Change {
        state: ChangeState,
        reason: Option<String>,
    },
}

/// What follows from step `changed` having just ended, or having just recorded its children. The tree holds the
/// step's new state.
pub fn advance(tree: &[Node], changed: &str) -> Vec<Update> {
    let mut walk = Walk::new(tree);
    if let Some(i) = walk.index(changed) {
        let node = &walk.nodes[i];
        if node.state.is_final() {
            walk.ended(i);
        } else if node.strategy.is_some() {
            walk.start_children(i);
        }
    }
    walk.out
}

/// The steps a change starts with (its root, or on a retry whatever has not succeeded yet).
pub fn resume(tree: &[Node]) -> Vec<Update> {
    let mut walk = Walk::new(tree);
    if let Some(root) = walk.nodes.iter().position(|n| n.parent.is_none()) {
        if walk.needs_work(root) {
            walk.enter(root);
        } else {
            walk.end(root, StepState::Success, None);
        }
    }
    walk.out
}

/// A cancel of the change: every ready step ends `cancelled` (running ones are stopped by their workers and end
/// through [`advance`]), and the tree moves on from each.
pub fn cancel(tree: &[Node]) -> Vec<Update> {
    let mut walk = Walk::new(tree);
    let ready: Vec<usize> = (0..walk.nodes.len())
        .filter(|&i| walk.nodes[i].state == StepState::Ready)
        .collect();
    for i in ready {
        if walk.nodes[i].state == StepState::Ready {
            walk.end(i, StepState::Cancelled, Some("cancelled".into()));
        }
    }
    walk.out
}

/// The tree being advanced: a working copy that takes each update as it is made, and the updates in order.
struct Walk {
    nodes: Vec<Node>,
    out: Vec<Update>,
}

impl Walk {
    fn new(tree: &[Node]) -> Walk {
        Walk {
            nodes: tree.to_vec(),
            out: Vec::new(),
        }
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The children of step `i`, in their order.
    fn children(&self, i: usize) -> Vec<usize> {
        let id = &self.nodes[i].id;
        let mut kids: Vec<usize> = (0..self.nodes.len())
            .filter(|&k| self.nodes[k].parent.as_deref() == Some(id))
            .collect();
        kids.sort_by_key(|&k| self.nodes[k].position);
        kids
    }

    fn parent(&self, i: usize) -> Option<usize> {
        let parent = self.nodes[i].parent.as_deref()?;
        self.index(parent)
    }

    /// Whether anything of step `i`'s subtree is still to run: it did not succeed, or something below it did not.
    fn needs_work(&self, i: usize) -> bool {
        self.nodes[i].state != StepState::Success
            || self.children(i).into_iter().any(|k| self.needs_work(k))
    }

    fn set(&mut self, i: usize, state: StepState, reason: Option<String>) {
        let node = &mut self.nodes[i];
        if node.state == state && node.reason == reason {
            return;
        }
        node.state = state;
        node.reason = reason.clone();
        self.out.push(Update::Step {
            id: node.id.clone(),
            state,
            reason,
        });
    }

    /// Step `i`'s turn has come: it becomes ready, or, when its own work already succeeded, its children carry on.
    fn enter(&mut self, i: usize) {
        let node = &self.nodes[i];
        if node.strategy.is_some() || node.state == StepState::Success {
            if !matches!(node.state, StepState::Success | StepState::Running) {
                self.set(i, StepState::Running, None);
            }
            self.start_children(i);
        } else {
            self.set(i, StepState::Ready, None);
        }
    }

    fn start_children(&mut self, i: usize) {
        let todo: Vec<usize> = self
            .children(i)
            .into_iter()
            .filter(|&k| self.needs_work(k))
            .collect();
        if todo.is_empty() {
            return self.end(i, StepState::Success, None);
        }
        match self.nodes[i].strategy.unwrap_or(Strategy::Sequential) {
            Strategy::Sequential => self.enter(todo[0]),
            Strategy::Parallel => todo.into_iter().for_each(|k| self.enter(k)),
        }
    }

    fn end(&mut self, i: usize, state: StepState, reason: Option<String>) {
        self.set(i, state, reason);
        self.ended(i);
    }

    /// Step `i` has ended: its parent moves on (or the change ends).
    fn ended(&mut self, i: usize) {
        let Some(p) = self.parent(i) else {
            let root = &self.nodes[i];
            let (state, reason) = match root.state {
                StepState::Success => (ChangeState::Success, None),
                StepState::Cancelled => (ChangeState::Cancelled, Some("cancelled".to_owned())),
                _ => (ChangeState::Error, Some(failure_reason(root))),
            };
            self.out.push(Update::Change { state, reason });
            return;
        };
        // A parent that already ended (a failure ended it, or a retry found it succeeded) moves on no more, except
        // a successful one whose children a retry runs again.
        if self.nodes[p].state.is_final() && self.nodes[p].state != StepState::Success {
            return;
        }
        let siblings = self.children(p);
        match self.nodes[p].strategy.unwrap_or(Strategy::Sequential) {
            Strategy::Sequential => {
                let child = &self.nodes[i];
                let later: Vec<usize> = siblings
                    .into_iter()
                    .filter(|&k| self.nodes[k].position > child.position)
                    .collect();
                if child.state != StepState::Success && !child.ignore_failure {
                    let cancelled = child.state == StepState::Cancelled;
                    let reason = failure_reason(child);
                    let state = if cancelled {
                        StepState::Cancelled
                    } else {
                        StepState::Aborted
                    };
                    for k in later {
                        if self.nodes[k].state != StepState::Success {
                            self.set(k, state, Some("an earlier sibling failed".into()));
                        }
                    }
                    let parent_state = if cancelled {
                        StepState::Cancelled
                    } else {
                        StepState::Error
                    };
                    return self.end(p, parent_state, Some(reason));
                }
                match later.into_iter().find(|&k| self.needs_work(k)) {
                    Some(next) => self.enter(next),
                    None => self.end(p, StepState::Success, None),
                }
            }
            Strategy::Parallel => {
                if siblings.iter().any(|&k| !self.nodes[k].state.is_final()) {
                    return;
                }
                let mut failure: Option<(StepState, String)> = None;
                for k in siblings {
                    let child = &self.nodes[k];
                    if child.state != StepState::Success
                        && !child.ignore_failure
                        && failure
                            .as_ref()
                            .is_none_or(|(s, _)| *s == StepState::Cancelled)
                    {
                        failure = Some((child.state, failure_reason(child)));
                    }
                }
                match failure {
                    None => self.end(p, StepState::Success, None),
                    Some((StepState::Cancelled, reason)) => {
                        self.end(p, StepState::Cancelled, Some(reason))
                    }
                    Some((_, reason)) => self.end(p, StepState::Error, Some(reason)),
                }
            }
        }
    }
}

fn failure_reason(node: &Node) -> String {
    node.reason
        .clone()
        .unwrap_or_else(|| format!("step {} failed", node.action))
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepState::*;

    /// `(id, parent, state, strategy, ignore_failure)`.
    type Spec<'a> = (&'a str, Option<&'a str>, StepState, Option<Strategy>, bool);

    /// A tree from specs; positions follow the order given.
    fn tree(spec: &[Spec]) -> Vec<Node> {
        spec.iter()
            .enumerate()
            .map(|(position, (id, parent, state, strategy, ignore))| Node {
                id: (*id).into(),
                parent: parent.map(str::to_owned),
                position: position as i64,
                action: format!("act-{id}"),
                state: *state,
                reason: None,
                strategy: *strategy,
                ignore_failure: *ignore,
            })
            .collect()
    }

    fn step(id: &str, state: StepState, reason: Option<&str>) -> Update {
        Update::Step {
            id: id.into(),
            state,
            reason: reason.map(str::to_owned),
        }
    }

    fn change(state: ChangeState, reason: Option<&str>) -> Update {
        Update::Change {
            state,
            reason: reason.map(str::to_owned),
        }
    }

    const SEQ: Option<Strategy> = Some(Strategy::Sequential);
    const PAR: Option<Strategy> = Some(Strategy::Parallel);
    const EARLIER: Option<&str> = Some("an earlier sibling failed");

    #[test]
    fn advance_follows_the_walk_of_the_tree() {
        type Case<'a> = (&'a str, Vec<Spec<'a>>, &'a str, Vec<Update>);
        let cases: Vec<Case> = vec![
            (
                "recorded sequential children: the first is ready",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Pending, None, false),
                    ("b", Some("r"), Pending, None, false),
                ],
                "r",
                vec![step("a", Ready, None)],
            ),
            (
                "recorded parallel children: all are ready",
                vec![
                    ("r", None, Running, PAR, false),
                    ("a", Some("r"), Pending, None, false),
                    ("b", Some("r"), Pending, None, false),
                ],
                "r",
                vec![step("a", Ready, None), step("b", Ready, None)],
            ),
            (
                "a sequential child succeeded: the next is ready",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Success, None, false),
                    ("b", Some("r"), Pending, None, false),
                ],
                "a",
                vec![step("b", Ready, None)],
            ),
            (
                "the last sequential child succeeded: parent and change succeed",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Success, None, false),
                    ("b", Some("r"), Success, None, false),
                ],
                "b",
                vec![step("r", Success, None), change(ChangeState::Success, None)],
            ),
            (
                "a sequential child failed: later siblings abort, parent and change fail",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Error, None, false),
                    ("b", Some("r"), Pending, None, false),
                    ("c", Some("r"), Pending, None, false),
                ],
                "a",
                vec![
                    step("b", Aborted, EARLIER),
                    step("c", Aborted, EARLIER),
                    step("r", Error, Some("step act-a failed")),
                    change(ChangeState::Error, Some("step act-a failed")),
                ],
            ),
            (
                "a cancelled sequential child: later siblings and the change are cancelled",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Cancelled, None, false),
                    ("b", Some("r"), Pending, None, false),
                ],
                "a",
                vec![
                    step("b", Cancelled, EARLIER),
                    step("r", Cancelled, Some("step act-a failed")),
                    change(ChangeState::Cancelled, Some("cancelled")),
                ],
            ),
            (
                "an ignored failure moves on",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Error, None, true),
                    ("b", Some("r"), Pending, None, false),
                ],
                "a",
                vec![step("b", Ready, None)],
            ),
            (
                "an ignored failure last: the parent succeeds",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Success, None, false),
                    ("b", Some("r"), Error, None, true),
                ],
                "b",
                vec![step("r", Success, None), change(ChangeState::Success, None)],
            ),
            (
                "a parallel child ended while a sibling runs: nothing yet",
                vec![
                    ("r", None, Running, PAR, false),
                    ("a", Some("r"), Error, None, false),
                    ("b", Some("r"), Running, None, false),
                ],
                "a",
                vec![],
            ),
            (
                "the last parallel child ended: the parent fails with the failure's reason",
                vec![
                    ("r", None, Running, PAR, false),
                    ("a", Some("r"), Error, None, false),
                    ("b", Some("r"), Success, None, false),
                ],
                "b",
                vec![
                    step("r", Error, Some("step act-a failed")),
                    change(ChangeState::Error, Some("step act-a failed")),
                ],
            ),
            (
                "parallel: a real failure wins over a cancel",
                vec![
                    ("r", None, Running, PAR, false),
                    ("a", Some("r"), Cancelled, None, false),
                    ("b", Some("r"), Error, None, false),
                ],
                "b",
                vec![
                    step("r", Error, Some("step act-b failed")),
                    change(ChangeState::Error, Some("step act-b failed")),
                ],
            ),
            (
                "parallel: only cancels cancel the parent",
                vec![
                    ("r", None, Running, PAR, false),
                    ("a", Some("r"), Cancelled, None, false),
                    ("b", Some("r"), Error, None, true),
                ],
                "a",
                vec![
                    step("r", Cancelled, Some("step act-a failed")),
                    change(ChangeState::Cancelled, Some("cancelled")),
                ],
            ),
            (
                "a nested end moves the grandparent on",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("g", Some("r"), Running, PAR, false),
                    ("x", Some("g"), Success, None, false),
                    ("y", Some("g"), Success, None, false),
                    ("n", Some("r"), Pending, None, false),
                ],
                "y",
                vec![step("g", Success, None), step("n", Ready, None)],
            ),
            (
                "a leaf root ends the change with its reason",
                vec![("r", None, Error, None, false)],
                "r",
                vec![change(ChangeState::Error, Some("step act-r failed"))],
            ),
            (
                "a step that has not ended moves nothing",
                vec![
                    ("r", None, Running, SEQ, false),
                    ("a", Some("r"), Running, None, false),
                ],
                "a",
                vec![],
            ),
            (
                "a parent that already failed is not ended twice",
                vec![
                    ("r", None, Error, PAR, false),
                    ("a", Some("r"), Error, None, false),
                    ("b", Some("r"), Cancelled, None, false),
                ],
                "b",
                vec![],
            ),
        ];
        for (name, spec, changed, want) in cases {
            assert_eq!(advance(&tree(&spec), changed), want, "{name}");
        }
    }

    #[test]
    fn a_failure_keeps_its_own_reason_up_the_tree() {
        let mut nodes = tree(&[
            ("r", None, Running, SEQ, false),
            ("g", Some("r"), Running, SEQ, false),
            ("x", Some("g"), Error, None, false),
        ]);
        nodes[2].reason = Some("step x exited with code 3".into());
        assert_eq!(
            advance(&nodes, "x"),
            vec![
                step("g", Error, Some("step x exited with code 3")),
                step("r", Error, Some("step x exited with code 3")),
                change(ChangeState::Error, Some("step x exited with code 3")),
            ]
        );
    }

    #[test]
    fn resume_runs_only_what_did_not_succeed() {
        type Case<'a> = (&'a str, Vec<Spec<'a>>, Vec<Update>);
        let cases: Vec<Case> = vec![
            (
                "a new change: the root is ready",
                vec![("r", None, Pending, None, false)],
                vec![step("r", Ready, None)],
            ),
            (
                "a root that failed on its own runs again",
                vec![("r", None, Error, None, false)],
                vec![step("r", Ready, None)],
            ),
            (
                "sequential: succeeded children are skipped, the failed one runs again",
                vec![
                    ("r", None, Error, SEQ, false),
                    ("a", Some("r"), Success, None, false),
                    ("b", Some("r"), Error, None, false),
                    ("c", Some("r"), Aborted, None, false),
                ],
                vec![step("r", Running, None), step("b", Ready, None)],
            ),
            (
                "parallel: every child that did not succeed runs again",
                vec![
                    ("r", None, Cancelled, PAR, false),
                    ("a", Some("r"), Success, None, false),
                    ("b", Some("r"), Cancelled, None, false),
                    ("c", Some("r"), Error, None, false),
                ],
                vec![
                    step("r", Running, None),
                    step("b", Ready, None),
                    step("c", Ready, None),
                ],
            ),
            (
                "a nested step whose own work succeeded descends further",
                vec![
                    ("r", None, Error, SEQ, false),
                    ("g", Some("r"), Error, SEQ, false),
                    ("x", Some("g"), Success, None, false),
                    ("y", Some("g"), Error, None, false),
                    ("n", Some("r"), Aborted, None, false),
                ],
                vec![
                    step("r", Running, None),
                    step("g", Running, None),
                    step("y", Ready, None),
                ],
            ),
            (
                "everything succeeded: the change succeeds",
                vec![
                    ("r", None, Success, SEQ, false),
                    ("a", Some("r"), Success, None, false),
                ],
                vec![change(ChangeState::Success, None)],
            ),
        ];
        for (name, spec, want) in cases {
            assert_eq!(resume(&tree(&spec)), want, "{name}");
        }
    }

    #[test]
    fn a_retried_sequence_goes_on_past_skipped_successes() {
        let nodes = tree(&[
            ("r", None, Running, SEQ, false),
            ("a", Some("r"), Success, None, false),
            ("b", Some("r"), Success, None, false),
            ("c", Some("r"), Success, None, false),
            ("d", Some("r"), Aborted, None, false),
        ]);
        // b ran again and succeeded; c succeeded in the earlier attempt.
        assert_eq!(advance(&nodes, "b"), vec![step("d", Ready, None)]);
    }

    #[test]
    fn cancel_ends_ready_steps_and_what_follows_them() {
        let nodes = tree(&[
            ("r", None, Running, SEQ, false),
            ("a", Some("r"), Ready, None, false),
            ("b", Some("r"), Pending, None, false),
        ]);
        assert_eq!(
            cancel(&nodes),
            vec![
                step("a", Cancelled, Some("cancelled")),
                step("b", Cancelled, EARLIER),
                step("r", Cancelled, Some("cancelled")),
                change(ChangeState::Cancelled, Some("cancelled")),
            ]
        );
        let running = tree(&[
            ("r", None, Running, PAR, false),
            ("a", Some("r"), Ready, None, false),
            ("b", Some("r"), Running, None, false),
        ]);
        // b is stopped by its worker; the parent ends when it does.
        assert_eq!(
            cancel(&running),
            vec![step("a", Cancelled, Some("cancelled"))]
        );
    }
}
