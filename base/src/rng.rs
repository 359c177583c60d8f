//! The workspace's one seeded generator: splitmix64 (Steele, Lea and Flood, 2014).
//!
//! It is also part of hostmem's wire contract: the shm backend's FILL pattern is
//! [`mix`]`(seed ^ qword_index)`, and the guest programs (`vmm-side/guest/driver.c`,
//! `tools/linux-guest.d/gpu-blob-test.c`) compute the same function in C to check what the
//! host wrote, so it must never change. Not for cryptography.

/// The golden-ratio increment of splitmix64.
pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64 of `z`: add [`GAMMA`], then the standard finalizer (`z ^= z >> 30;
/// z *= 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31`), all
/// wrapping.
pub fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded splitmix64 stream: value `i` (from 1) is `mix(seed + (i - 1) * GAMMA)`.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let v = mix(self.0);
        self.0 = self.0.wrapping_add(GAMMA);
        v
    }

    /// Uniform-ish in `0..n` (modulo bias is irrelevant for test workloads); 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64() {
        // The reference implementation's first outputs for seed 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.below(0), 0);
        assert!(r.below(7) < 7);
    }
}
