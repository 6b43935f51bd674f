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

/// Optimizer steps for one epoch: groups of `effective` pairs (shuffled with `seed`, grouped by
/// length within windows so each batch pads little, the group order shuffled again), each cut
/// into micro-batches of at most `micro`. Every index appears exactly once. Which pairs make an
/// optimizer step depends on `effective` only, never on `micro`: a run resumed under a smaller
/// micro-batch (less memory) takes the same steps on the same pairs.
pub fn epoch_groups(pairs: &[TrainPair], effective: usize, micro: usize, seed: u64) -> Vec<Vec<Vec<usize>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..pairs.len()).collect();
    idx.shuffle(&mut rng);
    let effective = effective.max(1);
    let window = effective * 32;
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for w in idx.chunks_mut(window) {
        w.sort_by_key(|&i| pairs[i].ids.len());
        groups.extend(w.chunks(effective).map(<[usize]>::to_vec));
    }
    groups.shuffle(&mut rng);
    groups.into_iter().map(|g| g.chunks(micro.max(1)).map(<[usize]>::to_vec).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_pair_once_and_are_reproducible() {
        let pairs: Vec<TrainPair> = (0..103).map(|i| TrainPair { ids: vec![0; 5 + i % 17], label: 0.0 }).collect();
        let a = epoch_groups(&pairs, 8, 8, 7);
        let mut all: Vec<usize> = a.iter().flatten().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(a, epoch_groups(&pairs, 8, 8, 7));
        assert_ne!(a, epoch_groups(&pairs, 8, 8, 8));
        assert!(a.iter().flatten().all(|b| b.len() <= 8));
        assert_eq!(a.len(), 103usize.div_ceil(8), "the trainer counts an epoch's steps as ceil(n / effective)");
        // A smaller micro-batch splits the same steps differently, nothing else.
        let b = epoch_groups(&pairs, 8, 3, 7);
        let flat = |g: &Vec<Vec<Vec<usize>>>| g.iter().map(|s| s.concat()).collect::<Vec<_>>();
        assert_eq!(flat(&a), flat(&b));
        assert!(b.iter().flatten().all(|mb| mb.len() <= 3));
    }
}
