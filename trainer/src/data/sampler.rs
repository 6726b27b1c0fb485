//! P x K identity sampler (Hermans et al. 2017; CLIP-ReID's
//! `RandomIdentitySampler`): every batch holds P persons with K images each,
//! so batch-hard triplet and SupCon always find positives and negatives.
//!
//! An epoch: each person's images are shuffled and cut into groups of K (a
//! person with fewer than K images is filled up by drawing from its own
//! images with replacement, as the reference does); then batches take P
//! distinct persons at random among those with groups left, one group each,
//! until fewer than P persons have groups left. The order depends only on
//! (seed, epoch), so resuming mid-epoch replays the same batches.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// Why a sampler cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplerError {
    /// P or K is zero.
    #[error("P and K must be at least 1 (got P = {p}, K = {k})")]
    Empty {
        /// Persons per batch.
        p: usize,
        /// Images per person.
        k: usize,
    },
    /// Fewer persons than P: not a single batch could be formed.
    #[error("P = {p} persons per batch, but the training set has only {persons} persons")]
    TooFewPersons {
        /// Persons per batch.
        p: usize,
        /// Persons in the data.
        persons: usize,
    },
}

/// Draws P x K batches of dataset indices.
#[derive(Debug, Clone)]
pub struct PkSampler {
    /// Dataset indices of each person, in dataset order.
    persons: Vec<Vec<usize>>,
    p: usize,
    k: usize,
    seed: u64,
}

impl PkSampler {
    /// `labels[i]` is the person index (0..n_persons) of dataset item `i`.
    pub fn new(labels: &[usize], p: usize, k: usize, seed: u64) -> Result<Self, SamplerError> {
        if p == 0 || k == 0 {
            return Err(SamplerError::Empty { p, k });
        }
        let n_persons = labels.iter().max().map_or(0, |m| m + 1);
        let mut persons = vec![Vec::new(); n_persons];
        for (index, &label) in labels.iter().enumerate() {
            persons[label].push(index);
        }
        persons.retain(|images| !images.is_empty());
        if persons.len() < p {
            return Err(SamplerError::TooFewPersons {
                p,
                persons: persons.len(),
            });
        }
        Ok(Self { persons, p, k, seed })
    }

    /// Images per batch (P x K).
    pub fn batch_size(&self) -> usize {
        self.p * self.k
    }

    /// The batches of one epoch, each `P x K` dataset indices, grouped by
    /// person (K consecutive indices share a person).
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        // One independent stream per epoch: epoch e never depends on e - 1.
        rng.set_stream(epoch);
        let mut groups: Vec<Vec<Vec<usize>>> = self
            .persons
            .iter()
            .map(|images| {
                let mut pool = images.clone();
                while pool.len() < self.k {
                    pool.push(images[below(&mut rng, images.len())]);
                }
                shuffle(&mut pool, &mut rng);
                let whole = pool.len() / self.k * self.k;
                // Reversed so that pop() hands groups out in shuffled order.
                pool[..whole]
                    .chunks(self.k)
                    .rev()
                    .map(<[usize]>::to_vec)
                    .collect()
            })
            .collect();
        let mut available: Vec<usize> = (0..groups.len()).filter(|&i| !groups[i].is_empty()).collect();
        let mut batches = Vec::new();
        while available.len() >= self.p {
            // Choose P distinct persons: a partial Fisher-Yates over `available`.
            for i in 0..self.p {
                let j = i + below(&mut rng, available.len() - i);
                available.swap(i, j);
            }
            let mut batch = Vec::with_capacity(self.batch_size());
            for &person in &available[..self.p] {
                if let Some(group) = groups[person].pop() {
                    batch.extend(group);
                }
            }
            batches.push(batch);
            available.retain(|&person| !groups[person].is_empty());
        }
        batches
    }
}

/// The batches of every epoch: P x K for the metric losses, or plain
/// shuffled batches (the dissertation's `DataLoader(shuffle=True)`).
#[derive(Debug, Clone)]
pub enum Sampler {
    /// P persons x K images per batch.
    Pk(PkSampler),
    /// A fresh permutation of the items per epoch, cut into `batch_size`
    /// pieces, the last one partial.
    Random {
        /// Items in the data.
        items: usize,
        /// Items per batch.
        batch_size: usize,
        /// Seeds the permutations.
        seed: u64,
    },
}

impl Sampler {
    /// The batches of the 0-based `epoch`, dataset indices; a pure function
    /// of the seed and the epoch.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        match self {
            Sampler::Pk(pk) => pk.epoch(epoch),
            Sampler::Random {
                items,
                batch_size,
                seed,
            } => {
                let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                // Streams apart from the P x K sampler's and stage 1's.
                rng.set_stream(2 << 32 | epoch);
                let mut order: Vec<usize> = (0..*items).collect();
                shuffle(&mut order, &mut rng);
                order
                    .chunks((*batch_size).max(1))
                    .map(<[usize]>::to_vec)
                    .collect()
            }
        }
    }
}

/// Uniform integer in `0..n` (Lemire's multiply-shift; n >= 1).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

fn shuffle(items: &mut [usize], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        items.swap(i, below(rng, i + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// 6 persons with 1, 2, 3, 4, 8 and 9 images.
    fn labels() -> Vec<usize> {
        [1usize, 2, 3, 4, 8, 9]
            .iter()
            .enumerate()
            .flat_map(|(person, &n)| std::iter::repeat_n(person, n))
            .collect()
    }

    #[test]
    fn the_random_sampler_covers_every_item_once_per_epoch() {
        let sampler = Sampler::Random {
            items: 10,
            batch_size: 4,
            seed: 3,
        };
        let batches = sampler.epoch(0);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_ne!(sampler.epoch(0), sampler.epoch(1));
        assert_eq!(sampler.epoch(1), sampler.epoch(1));
    }

    #[test]
    fn batches_hold_p_distinct_persons_with_k_images_each() {
        let labels = labels();
        let sampler = PkSampler::new(&labels, 3, 4, 7).expect("sampler");
        let batches = sampler.epoch(0);
        assert!(!batches.is_empty());
        for batch in &batches {
            assert_eq!(batch.len(), 12);
            let persons: Vec<usize> = batch.chunks(4).map(|g| labels[g[0]]).collect();
            for (g, &person) in batch.chunks(4).zip(&persons) {
                assert!(
                    g.iter().all(|&i| labels[i] == person),
                    "a group mixes persons: {batch:?}"
                );
            }
            assert_eq!(
                persons.iter().collect::<BTreeSet<_>>().len(),
                3,
                "persons repeat: {persons:?}"
            );
        }
    }

    #[test]
    fn a_person_with_fewer_than_k_images_is_filled_up_with_replacement() {
        // Persons with 1, 2 and 3 images, P = 3, K = 4: exactly one batch.
        let labels = [0usize, 1, 1, 2, 2, 2];
        let batches = PkSampler::new(&labels, 3, 4, 5).expect("sampler").epoch(0);
        assert_eq!(batches.len(), 1);
        let single: Vec<usize> = batches[0].iter().copied().filter(|&i| labels[i] == 0).collect();
        assert_eq!(single, vec![0, 0, 0, 0]);
    }

    #[test]
    fn the_order_depends_only_on_seed_and_epoch() {
        let labels = labels();
        let a = PkSampler::new(&labels, 2, 2, 42).expect("sampler");
        let b = PkSampler::new(&labels, 2, 2, 42).expect("sampler");
        assert_eq!(a.epoch(3), b.epoch(3));
        assert_ne!(a.epoch(3), a.epoch(4));
        let c = PkSampler::new(&labels, 2, 2, 43).expect("sampler");
        assert_ne!(a.epoch(3), c.epoch(3));
    }

    #[test]
    fn every_image_of_a_large_person_is_used_once_per_epoch() {
        let labels = labels();
        let sampler = PkSampler::new(&labels, 2, 4, 1).expect("sampler");
        let used: Vec<usize> = sampler
            .epoch(0)
            .into_iter()
            .flatten()
            .filter(|&i| labels[i] == 4)
            .collect();
        // Person 4 has 8 images = two groups of 4, each image once.
        let distinct: BTreeSet<usize> = used.iter().copied().collect();
        assert_eq!(used.len(), distinct.len());
        assert!(used.len() <= 8);
    }

    #[test]
    fn refuses_impossible_settings() {
        assert_eq!(
            PkSampler::new(&[0, 1], 3, 2, 0).err(),
            Some(SamplerError::TooFewPersons { p: 3, persons: 2 })
        );
        assert_eq!(
            PkSampler::new(&[0, 1], 0, 2, 0).err(),
            Some(SamplerError::Empty { p: 0, k: 2 })
        );
    }
}
