//! Training data as the trainer sees it: tokenized pairs with labels, and length-grouped,
//! seeded micro-batches.

use rand::SeedableRng;
use rand::seq::SliceRandom;

/// One (query, document) prompt, tokenized, with its label (1 = relevant).
#[derive(Debug, Clone)]
pub struct TrainPair {
    pub ids: Vec<u32>,
    pub label: f32,
}

/// Micro-batches for one epoch: shuffled with `seed`, grouped by length within windows so each
/// batch pads little, then the batch order shuffled again. Every index appears exactly once.
pub fn epoch_batches(pairs: &[TrainPair], micro: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..pairs.len()).collect();
    idx.shuffle(&mut rng);
    let window = (micro * 32).max(1);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for w in idx.chunks_mut(window) {
        w.sort_by_key(|&i| pairs[i].ids.len());
        batches.extend(w.chunks(micro.max(1)).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_pair_once_and_are_reproducible() {
        let pairs: Vec<TrainPair> = (0..103).map(|i| TrainPair { ids: vec![0; 5 + i % 17], label: 0.0 }).collect();
        let a = epoch_batches(&pairs, 8, 7);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(&pairs, 8, 7));
        assert_ne!(a, epoch_batches(&pairs, 8, 8));
        assert!(a.iter().all(|b| b.len() <= 8));
        assert_eq!(a.len(), 103usize.div_ceil(8), "the trainer counts an epoch's batches as ceil(n / micro)");
    }
}
