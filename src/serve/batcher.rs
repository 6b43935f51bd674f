//! The scoring queue: requests' tokenized pairs wait here, and one scoring thread takes the
//! oldest request with every other waiting request for the same scorer, sorts their pairs by
//! length and scores them in batches of at most `batch_size` rows and `batch_tokens` padded
//! tokens. Admission is bounded in pairs (waiting or being scored): past `max_queue_pairs` a
//! request is refused at once, never queued without bound.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::oneshot;

use super::models::Scorer;
use super::telemetry::Telemetry;
use crate::model::reranker::PairLogits;

/// One request's work: its scorer, its prompts, and where the scores go.
pub struct Work {
    pub scorer: Arc<Scorer>,
    pub seqs: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<PairLogits>, String>>,
    /// Its place in the bound, released when the work is dropped (after its reply), so a
    /// request whose client went away still counts until it has been scored.
    pub admission: Admission,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub max_queue_pairs: usize,
    pub batch_size: usize,
    pub batch_tokens: usize,
}

struct Queue {
    work: VecDeque<Work>,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Pairs admitted and not yet answered (tokenizing, waiting or being scored).
    admitted: AtomicUsize,
    limits: Mutex<Limits>,
    telemetry: Arc<Telemetry>,
}

#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
}

/// Pairs held in the queue's bound; released when dropped (answered, failed or abandoned).
pub struct Admission {
    shared: Arc<Shared>,
    pairs: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let left = self.shared.admitted.fetch_sub(self.pairs, Ordering::AcqRel) - self.pairs;
        self.shared.telemetry.queue_pairs.set(left as i64);
    }
}

/// The queue is full: how many pairs are admitted now, and the bound.
#[derive(Debug)]
pub struct Full {
    pub admitted: usize,
    pub max: usize,
}

impl Batcher {
    /// Starts the scoring thread.
    pub fn start(limits: Limits, telemetry: Arc<Telemetry>) -> (Self, std::thread::JoinHandle<()>) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { work: VecDeque::new(), stop: false }),
            wake: Condvar::new(),
            admitted: AtomicUsize::new(0),
            limits: Mutex::new(limits),
            telemetry,
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("scorer".into())
            .spawn(move || score_loop(&s))
            .expect("spawning the scoring thread");
        (Self { shared }, handle)
    }

    pub fn set_limits(&self, limits: Limits) {
        *self.shared.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    fn limits(&self) -> Limits {
        *self.shared.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves room for `pairs` pairs, or says the queue is full.
    pub fn admit(&self, pairs: usize) -> Result<Admission, Full> {
        let max = self.limits().max_queue_pairs;
        let mut now = self.shared.admitted.load(Ordering::Acquire);
        loop {
            if now + pairs > max {
                return Err(Full { admitted: now, max });
            }
            match self.shared.admitted.compare_exchange(now, now + pairs, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => now = actual,
            }
        }
        self.shared.telemetry.queue_pairs.set((now + pairs) as i64);
        Ok(Admission { shared: self.shared.clone(), pairs })
    }

    pub fn submit(&self, work: Work) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.stop {
            let _ = work.reply.send(Err("the server is shutting down".into()));
            return;
        }
        q.work.push_back(work);
        self.shared.wake.notify_one();
    }

    /// Lets the thread finish what is queued, then end.
    pub fn stop(&self) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.shared.wake.notify_all();
    }
}

/// Whole requests for one scorer, oldest first, at most about four batches' worth of pairs.
fn next_group(shared: &Shared) -> Option<Vec<Work>> {
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    while q.work.is_empty() {
        if q.stop {
            return None;
        }
        q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
    }
    let gather = 4 * shared.limits.lock().unwrap_or_else(|e| e.into_inner()).batch_size;
    let first = q.work.pop_front().expect("not empty");
    let mut pairs = first.seqs.len();
    let mut group = vec![first];
    let mut i = 0;
    while i < q.work.len() && pairs < gather {
        if Arc::ptr_eq(&q.work[i].scorer, &group[0].scorer) {
            let w = q.work.remove(i).expect("index in range");
            pairs += w.seqs.len();
            group.push(w);
        } else {
            i += 1;
        }
    }
    Some(group)
}

/// Consecutive runs of `order` (sorted by length) of at most `batch_size` rows and at most
/// `batch_tokens` padded tokens (rows x the longest), at least one row each.
pub fn chunks(
    lengths: &[usize],
    order: &[usize],
    batch_size: usize,
    batch_tokens: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len()
            && end - start < batch_size
            && (end - start + 1) * lengths[order[end]].max(lengths[order[start]]) <= batch_tokens
        {
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

fn score_loop(shared: &Shared) {
    while let Some(group) = next_group(shared) {
        let limits = *shared.limits.lock().unwrap_or_else(|e| e.into_inner());
        // catch_unwind: a panic in scoring answers its requests with an error, and the thread
        // lives on for the next ones (a dead scorer would leave every later request waiting).
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| score_group(&group, limits, &shared.telemetry)))
            .unwrap_or_else(|_| Err("internal error while scoring (panic)".into()));
        match result {
            Ok(mut per_work) => {
                for (w, scores) in group.into_iter().zip(per_work.drain(..)) {
                    let _ = w.reply.send(Ok(scores));
                }
            }
            Err(e) => {
                tracing::error!("scoring failed: {e}");
                for w in group {
                    let _ = w.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn score_group(group: &[Work], limits: Limits, telemetry: &Telemetry) -> Result<Vec<Vec<PairLogits>>, String> {
    let scorer = &group[0].scorer;
    let mut out: Vec<Vec<Option<PairLogits>>> = group.iter().map(|w| vec![None; w.seqs.len()]).collect();
    // A request's documents share their prompt's beginning (template, instruction, query): that
    // prefix is computed once, and only each document's tokens run, in batches of their own.
    let mut whole = Vec::new();
    for (w, work) in group.iter().enumerate() {
        let seqs: Vec<&[u32]> = work.seqs.iter().map(Vec::as_slice).collect();
        let Some(p) = crate::model::reranker::shared_prefix(&seqs) else {
            whole.push(w);
            continue;
        };
        let reranker = &scorer.base.reranker;
        let lora = scorer.lora.as_ref();
        let tails: Vec<&[u32]> = seqs.iter().map(|s| &s[p..]).collect();
        // Each row also attends to the prefix: count it in the token budget.
        let lengths: Vec<usize> = tails.iter().map(|t| p + t.len()).collect();
        let mut order: Vec<usize> = (0..tails.len()).collect();
        order.sort_by_key(|&i| lengths[i]);
        let earlier = scorer.last_prefix.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cache = reranker.prefix_cache_reusing(earlier.as_ref(), &seqs[0][..p], lora).map_err(|e| e.to_string())?;
        telemetry.prefix_tokens_reused.inc_by(cache.reused as u64);
        *scorer.last_prefix.lock().unwrap_or_else(|e| e.into_inner()) = Some(cache.clone());
        for range in chunks(&lengths, &order, limits.batch_size, limits.batch_tokens) {
            let rows = &order[range];
            crate::testhooks::score_sleep();
            let batch: Vec<&[u32]> = rows.iter().map(|&i| tails[i]).collect();
            let scores = reranker.score_after(&cache, &batch, lora).map_err(|e| e.to_string())?;
            telemetry.batch_size.observe(rows.len() as f64);
            telemetry.pairs_scored.inc_by(rows.len() as u64);
            for (&i, s) in rows.iter().zip(scores) {
                out[w][i] = Some(s);
            }
        }
    }
    let pairs: Vec<(usize, usize)> =
        whole.iter().flat_map(|&w| (0..group[w].seqs.len()).map(move |p| (w, p))).collect();
    let lengths: Vec<usize> = pairs.iter().map(|&(w, p)| group[w].seqs[p].len()).collect();
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    for range in chunks(&lengths, &order, limits.batch_size, limits.batch_tokens) {
        let rows = &order[range];
        crate::testhooks::score_sleep();
        let seqs: Vec<&[u32]> = rows.iter().map(|&i| group[pairs[i].0].seqs[pairs[i].1].as_slice()).collect();
        let scores = scorer.base.reranker.score_ids(&seqs, scorer.lora.as_ref()).map_err(|e| e.to_string())?;
        telemetry.batch_size.observe(rows.len() as f64);
        telemetry.pairs_scored.inc_by(rows.len() as u64);
        for (&i, s) in rows.iter().zip(scores) {
            out[pairs[i].0][pairs[i].1] = Some(s);
        }
    }
    Ok(out.into_iter().map(|v| v.into_iter().map(|s| s.expect("every pair scored")).collect()).collect())
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_respect_rows_and_tokens() {
        let lengths = [10, 10, 10, 50, 50, 100];
        let order: Vec<usize> = (0..6).collect();
        assert_eq!(chunks(&lengths, &order, 16, 10_000), vec![0..6]);
        assert_eq!(chunks(&lengths, &order, 2, 10_000), vec![0..2, 2..4, 4..6]);
        // 3 x 10 fits 40 tokens; adding a 50-token row would make 4 x 50.
        assert_eq!(chunks(&lengths, &order, 16, 100), vec![0..3, 3..5, 5..6]);
        // A row longer than the budget still goes, alone.
        assert_eq!(chunks(&lengths, &order, 16, 20), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
    }
}
