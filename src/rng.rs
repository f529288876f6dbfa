//! Seeded random numbers for everything that must repeat exactly: the
//! built-in data set, the tiny model's weights, LoRA initialization, batch
//! order, sampling, simulated scenarios and poisoned updates.
//!
//! One generator, ChaCha8 from `rand_chacha`: its output for a seed is
//! specified (not "whatever this version of rand does"), the same on every
//! platform and word size, so a resumed node draws the same batches and
//! two machines build the same data set from the same seed.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

#[derive(Debug, Clone)]
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1), with the 53 bits an f64 holds.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) for n > 0 (Lemire's multiply-shift: no division,
    /// and a bias below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_stream_and_another_seed_another() {
        let draw = |seed| {
            let mut rng = SeededRng::new(seed);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn the_stream_is_chacha8_as_specified() {
        // ChaCha8 seeded through rand_core's seed_from_u64(0). Pinned: a
        // change of generator or of seeding would change every data set and
        // initialization, so it must not pass unnoticed.
        let mut rng = SeededRng::new(0);
        assert_eq!(rng.next_u64(), 0xb585_f767_a79a_3b6c);
        assert_eq!(rng.next_u64(), 0x7746_a55f_bad8_c037);
    }

    #[test]
    fn below_and_next_f64_stay_in_range() {
        let mut rng = SeededRng::new(1);
        for n in [1u64, 2, 3, 10, u64::MAX] {
            for _ in 0..100 {
                assert!(rng.below(n) < n);
            }
        }
        for _ in 0..1000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
