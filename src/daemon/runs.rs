//! The daemon's one table of the runs it knows. Each run is in exactly one place: waiting in
//! line, active (a live process), ended but not yet recorded (a full disk), or paused. Every one
//! of them holds its corpus, so "is this corpus busy", "does the daemon know this run" and "what
//! is on this corpus" are each answered here, once. The line's order is arrival order: a run
//! queued again goes to its end.

use crate::ids::{CorpusName, RunId};

use super::ending::Unsettled;
use super::supervise::Active;

/// A run waiting to start.
pub struct Queued {
    pub run_id: RunId,
    pub corpus: CorpusName,
    pub budget_mb: u64,
    /// Its last attempt met a full disk: it starts once this many MB are free on the root's file
    /// system (checked at each tick it could start).
    pub needs_space_mb: Option<u64>,
}

/// Where a run the daemon knows stands.
pub enum Run {
    Queued(Queued),
    Active(Box<Active>),
    /// Its end could not be recorded yet; retried every tick.
    Unsettled(Unsettled),
    /// Stopped by `pause` with a checkpoint; holds its corpus until resumed or cancelled.
    Paused {
        run_id: RunId,
        corpus: CorpusName,
    },
}

impl Run {
    pub fn run_id(&self) -> &RunId {
        match self {
            Run::Queued(q) => &q.run_id,
            Run::Active(a) => &a.run_id,
            Run::Unsettled(u) => &u.run_id,
            Run::Paused { run_id, .. } => run_id,
        }
    }

    pub fn corpus(&self) -> &CorpusName {
        match self {
            Run::Queued(q) => &q.corpus,
            Run::Active(a) => &a.corpus,
            Run::Unsettled(u) => &u.corpus,
            Run::Paused { corpus, .. } => corpus,
        }
    }
}

/// The table: every run the daemon knows, each once.
#[derive(Default)]
pub struct Runs {
    runs: Vec<Run>,
}

impl Runs {
    /// Adds a run; one the table already holds is put in its new place (at the end of the line).
    pub fn put(&mut self, run: Run) {
        self.take(run.run_id());
        self.runs.push(run);
    }

    /// Removes a run from the table, giving back where it was.
    pub fn take(&mut self, run_id: &RunId) -> Option<Run> {
        let i = self.runs.iter().position(|r| r.run_id() == run_id)?;
        Some(self.runs.remove(i))
    }

    /// Removes and gives back every run `pick` chooses, in order.
    pub fn take_where(&mut self, pick: impl Fn(&Run) -> bool) -> Vec<Run> {
        let (taken, kept) = std::mem::take(&mut self.runs).into_iter().partition(|r| pick(r));
        self.runs = kept;
        taken
    }

    pub fn knows(&self, run_id: &RunId) -> bool {
        self.runs.iter().any(|r| r.run_id() == run_id)
    }

    /// Every corpus a run holds (active, queued, paused, or ending unrecorded).
    pub fn busy_corpora(&self) -> Vec<CorpusName> {
        let mut out: Vec<CorpusName> = self.runs.iter().map(|r| r.corpus().clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// The runs on `corpus`, wherever they stand.
    pub fn on_corpus<'a>(&'a self, corpus: &'a CorpusName) -> impl Iterator<Item = &'a Run> + 'a {
        self.runs.iter().filter(move |r| r.corpus() == corpus)
    }

    pub fn active(&self) -> impl Iterator<Item = &Active> {
        self.runs.iter().filter_map(|r| match r {
            Run::Active(a) => Some(&**a),
            _ => None,
        })
    }

    pub fn active_mut(&mut self) -> impl Iterator<Item = &mut Active> {
        self.runs.iter_mut().filter_map(|r| match r {
            Run::Active(a) => Some(&mut **a),
            _ => None,
        })
    }

    pub fn active_count(&self) -> usize {
        self.active().count()
    }

    /// The line, in order.
    pub fn queued(&self) -> impl Iterator<Item = &Queued> {
        self.runs.iter().filter_map(|r| match r {
            Run::Queued(q) => Some(q),
            _ => None,
        })
    }

    pub fn any_unsettled(&self) -> bool {
        self.runs.iter().any(|r| matches!(r, Run::Unsettled(_)))
    }

    /// The first run in line that may start now: its corpus held by no other run the table knows
    /// (an earlier one in line included), and `may_start` (the corpus lock, free disk space)
    /// agreeing. `may_start` is asked only of runs the table itself does not hold back.
    pub fn next_to_start(&self, mut may_start: impl FnMut(&Queued) -> bool) -> Option<RunId> {
        for (i, r) in self.runs.iter().enumerate() {
            let Run::Queued(q) = r else { continue };
            let held =
                self.runs.iter().enumerate().any(|(j, other)| {
                    j != i && other.corpus() == &q.corpus && (!matches!(other, Run::Queued(_)) || j < i)
                });
            if !held && may_start(q) {
                return Some(q.run_id.clone());
            }
        }
        None
    }

    /// Replaces a queued run by the same run active, in place.
    pub fn started(&mut self, active: Active) {
        match self.runs.iter_mut().find(|r| r.run_id() == &active.run_id) {
            Some(slot) => *slot = Run::Active(Box::new(active)),
            None => self.runs.push(Run::Active(Box::new(active))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, corpus: &str) -> Run {
        Run::Queued(Queued {
            run_id: RunId::parse(id).unwrap(),
            corpus: CorpusName::parse(corpus).unwrap(),
            budget_mb: 1024,
            needs_space_mb: None,
        })
    }

    #[test]
    fn a_run_is_in_one_place_and_the_line_keeps_arrival_order() {
        let mut runs = Runs::default();
        runs.put(q("a1", "a"));
        runs.put(q("a2", "a"));
        runs.put(q("b1", "b"));
        // a2 waits behind a1 on the same corpus; b1 may start beside it.
        assert_eq!(runs.next_to_start(|_| true).unwrap().as_str(), "a1");
        assert_eq!(runs.next_to_start(|q| q.corpus.as_str() != "a").unwrap().as_str(), "b1");
        let a1 = RunId::parse("a1").unwrap();
        runs.put(Run::Paused { run_id: a1.clone(), corpus: CorpusName::parse("a").unwrap() });
        assert_eq!(runs.queued().count(), 2);
        // A paused run holds its corpus.
        assert_eq!(runs.next_to_start(|_| true).unwrap().as_str(), "b1");
        // Queued again: at the end of the line, still once.
        runs.put(q("a1", "a"));
        assert_eq!(runs.queued().map(|q| q.run_id.as_str()).collect::<Vec<_>>(), ["a2", "b1", "a1"]);
        assert_eq!(runs.busy_corpora().len(), 2);
        assert_eq!(runs.take_where(|r| r.corpus().as_str() == "a").len(), 2);
        assert!(!runs.knows(&a1));
    }
}
