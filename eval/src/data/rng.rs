//! The one random source of splits and synthetic data.
//!
//! ChaCha8 (`rand_chacha`) is a fixed, portable algorithm; integers are drawn
//! here by rejection sampling rather than with `rand`'s distributions, whose
//! algorithms may change between releases. So a seed gives the same splits
//! on every platform and with every dependency version.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Seeded random source; `stream` separates independent uses of one seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(ChaCha8Rng);

impl Rng {
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self(rng)
    }

    /// Uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.0.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform float in `[lo, hi)`.
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED: [usize; 6] = [652, 623, 878, 556, 681, 541];

    #[test]
    fn draws_are_fixed_by_seed_and_stream() {
        let draws = |seed, stream| {
            let mut r = Rng::new(seed, stream);
            (0..8).map(|_| r.below(1000)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7, 0), draws(7, 0));
        assert_ne!(draws(7, 0), draws(7, 1));
        assert_ne!(draws(7, 0), draws(8, 0));
        assert!(draws(7, 0).iter().all(|&x| x < 1000));
    }

    #[test]
    fn draws_are_pinned() {
        // Recorded once: a change here means every published split changes
        // (a new rand_chacha algorithm, or a change to `below`).
        let mut r = Rng::new(0, 0);
        let got: Vec<usize> = (0..6).map(|_| r.below(1000)).collect();
        assert_eq!(got, PINNED);
    }
}
