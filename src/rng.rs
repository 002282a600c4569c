//! Counter-based seeds: every random draw is a pure function of (seed, stream, counter),
//! so a resumed run replays exactly the draws an uninterrupted one would make.

/// Independent random streams derived from the run seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Shuffling order of epoch `counter`.
    Shuffle = 1,
    /// libtorch's generator (reparameterization noise, binarization) at step `counter`.
    Step = 2,
    /// Procedural dataset generation.
    Data = 3,
    /// Evaluation draws, identical for every evaluation of a checkpoint.
    Eval = 4,
    /// Parameter initialisation.
    Init = 5,
    /// Importance samples of the IWAE bound, per evaluation batch.
    Iwae = 6,
}

/// SplitMix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: tiny, fast, and statistically fine for shuffling and procedural data.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one (stream, counter) cell of the run seed.
    pub fn derived(seed: u64, stream: Stream, counter: u64) -> Self {
        Self::new(derive_seed(seed, stream, counter))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Moves `n` draws ahead in O(1): the state is a counter, so any slice of a stream can be
    /// drawn without the draws before it.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(GAMMA));
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform in 0..n (n > 0), by Lemire's multiply-shift; the bias is below 2^-32 for our n.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A Fisher-Yates permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut order: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes (seed, stream, counter) into a seed; distinct cells give unrelated streams.
pub fn derive_seed(seed: u64, stream: Stream, counter: u64) -> u64 {
    mix(mix(mix(seed) ^ (stream as u64)).wrapping_add(counter))
}

/// Seeds libtorch's global generators (CPU and every CUDA device) for one cell.
pub fn seed_torch(seed: u64, stream: Stream, counter: u64) {
    // libtorch takes an i64 but uses the bits as a u64; keep them non-negative to be safe.
    tch::manual_seed((derive_seed(seed, stream, counter) >> 1) as i64);
}

/// FNV-1a, then SplitMix's finaliser: a stable 64-bit hash (std's is randomised per process),
/// for names and splits that must not change between runs.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    SplitMix64::new(h).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_depends_on_the_cell() {
        let p = SplitMix64::derived(7, Stream::Shuffle, 3).permutation(1000);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<i64>>());
        assert_eq!(p, SplitMix64::derived(7, Stream::Shuffle, 3).permutation(1000));
        assert_ne!(p, SplitMix64::derived(7, Stream::Shuffle, 4).permutation(1000));
        assert_ne!(p, SplitMix64::derived(8, Stream::Shuffle, 3).permutation(1000));
    }

    #[test]
    fn skipping_equals_drawing() {
        let mut drawn = SplitMix64::new(9);
        for _ in 0..1234 {
            drawn.next_u64();
        }
        let mut skipped = SplitMix64::new(9);
        skipped.skip(1234);
        assert_eq!(drawn.next_u64(), skipped.next_u64());
    }

    #[test]
    fn uniform_stays_in_range_with_the_right_mean() {
        let mut rng = SplitMix64::new(1);
        let xs: Vec<f64> = (0..10_000).map(|_| rng.next_f64()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}
