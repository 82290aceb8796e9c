//! A small deterministic generator for randomized tests. The seed is
//! printed by [`XorShift::seeded`], and `HOTPATCH_TEST_SEED` repeats a run.

/// xorshift64: fast, deterministic, good enough to pick moments and bytes.
pub struct XorShift(pub u64);

impl XorShift {
    /// Seeded from `HOTPATCH_TEST_SEED` if set, the clock otherwise; the
    /// seed is printed on stderr so a failing run can be repeated.
    pub fn seeded() -> XorShift {
        let seed = std::env::var("HOTPATCH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("seed {seed} (HOTPATCH_TEST_SEED={seed} repeats the run)");
        XorShift(seed)
    }

    /// The next value. Not `Iterator::next`: the sequence never ends, and
    /// the tests want a `u64`, not an `Option`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let (mut a, mut b) = (XorShift(12345), XorShift(12345));
        let xs: Vec<u64> = (0..8).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        assert!(xs.windows(2).all(|w| w[0] != w[1]));
        assert!((0..1000).all(|_| a.below(7) < 7));
        assert_eq!(a.below(0), 0);
    }
}
