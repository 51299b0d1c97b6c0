//! DARE's random drop mask. PEFT draws it with `torch.bernoulli`, whose stream we cannot
//! reproduce outside torch; this is our own small seeded generator (splitmix64), so a fit is
//! reproducible from its `seed` and a test can replay the exact mask.
//!
//! The stream: one [`DropMask`] per module, made by [`DropMask::for_module`] from the fit's
//! seed and the module path (so a module's mask does not depend on which other modules exist).
//! Within a module the merge draws, in order: for every tensor kind it merges (low-rank
//! space: all the `A`s, then all the `B`s; SVD space: the dense deltas), for every expert in
//! the plan's order (an expert lacking the module draws for its zeros too), one
//! [`DropMask::keep`] per entry in row-major order. Nothing is drawn when `density ≥ 1`
//! (PEFT's `prune` returns the tensor untouched then).

/// A seeded splitmix64 stream of keep/drop decisions.
#[derive(Debug, Clone)]
pub struct DropMask(u64);

impl DropMask {
    /// The stream of `module` for the fit's `seed`: splitmix64 started at
    /// `seed ^ fnv1a64(module)`.
    pub fn for_module(seed: u64, module: &str) -> DropMask {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in module.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        DropMask(seed ^ h)
    }

    /// The next raw 64-bit value (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next uniform draw `u` in `[0, 1)` (53 random bits).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One Bernoulli(`density`) draw: keep the entry when `u < density`.
    pub fn keep(&mut self, density: f64) -> bool {
        self.uniform() < density
    }
}
