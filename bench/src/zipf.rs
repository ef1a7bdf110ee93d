//! YCSB's scrambled zipfian generator.
//!
//! Ranks are drawn with YCSB's `ZipfianGenerator` (Gray et al., "Quickly generating
//! billion-record synthetic databases", SIGMOD 1994): exact for ranks 0 and 1, a closed-form
//! approximation beyond (it puts about one point more mass on the top 1 % than the exact pmf
//! at θ = 0.99). ζ(n, θ) is computed exactly for the item count.
//!
//! YCSB then scrambles rank → key with an FNV hash modulo the item count, which is not a
//! bijection (hot ranks collide, some keys are never drawn). Here the scramble is a bijection,
//! the affine map `key = (a · rank + c) mod n` with `a` coprime to `n` near `n / φ`: hot keys are
//! spread over the whole key space, none collide, and the key popularity is exactly the rank
//! distribution, which the tests check against the pmf.

use serde::Serialize;

/// ζ(n, θ) = Σ_{i=1..n} 1 / i^θ.
pub fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| (i as f64).powf(-theta)).sum()
}

/// The zipf pmf's share of the `k` most popular of `n` items: ζ(k, θ) / ζ(n, θ).
#[cfg(test)]
pub fn top_share(k: u64, n: u64, theta: f64) -> f64 {
    zeta(k, theta) / zeta(n, theta)
}

/// The constants of a zipfian over `n` items; computing ζ(n) is O(n), so it is shared by every
/// generator over the same key space.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    zetan: f64,
    alpha: f64,
    eta: f64,
    half_pow_theta: f64,
    scramble_a: u64,
    scramble_c: u64,
}

impl Zipfian {
    /// A zipfian over `0..n` (n ≥ 1) with constant `theta` in (0, 1).
    pub fn new(n: u64, theta: f64) -> Self {
        assert!(n >= 1 && theta > 0.0 && theta < 1.0, "validated by the caller");
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let eta = if n <= 2 {
            0.0
        } else {
            (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan)
        };
        let (scramble_a, scramble_c) = scramble_constants(n);
        Zipfian {
            n,
            theta,
            zetan,
            alpha: 1.0 / (1.0 - theta),
            eta,
            half_pow_theta: 0.5f64.powf(theta),
            scramble_a,
            scramble_c,
        }
    }

    /// A rank (0 = most popular) from a uniform `u` in [0, 1): YCSB's `nextLong`.
    #[inline]
    pub fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + self.half_pow_theta {
            return 1.min(self.n - 1);
        }
        let rank = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n - 1)
    }

    /// The key of a rank: a bijection of `0..n`.
    #[inline]
    pub fn scramble(&self, rank: u64) -> u64 {
        let (a, c, n) = (self.scramble_a, self.scramble_c, self.n);
        if n <= u32::MAX as u64 {
            // a, rank, c < n < 2^32: no overflow, and a 64-bit division is much cheaper.
            (a * rank + c) % n
        } else {
            ((a as u128 * rank as u128 + c as u128) % n as u128) as u64
        }
    }

    /// A key drawn from the scrambled zipfian.
    #[inline]
    pub fn key(&self, u: f64) -> u64 {
        self.scramble(self.rank(u))
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `a` coprime to `n` near `n / φ` (consecutive ranks land far apart), and an offset.
fn scramble_constants(n: u64) -> (u64, u64) {
    if n <= 2 {
        return (1, 0);
    }
    let mut a = ((n as f64 * 0.618_033_988_749_895) as u64).max(1);
    while gcd(a, n) != 1 {
        a += 1;
    }
    (a, n / 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corebuf_shard::rng::SimRng;

    fn unit(rng: &mut SimRng) -> f64 {
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn scramble_is_a_bijection() {
        for n in [1u64, 2, 3, 10, 64, 1000, 4096, 65_537] {
            let z = Zipfian::new(n, 0.99);
            let mut seen = vec![false; n as usize];
            for r in 0..n {
                let k = z.scramble(r) as usize;
                assert!(!seen[k], "n {n}: key {k} drawn twice");
                seen[k] = true;
            }
        }
    }

    /// The top 1 % of keys (by observed frequency) take the share the zipf pmf gives the top
    /// 1 % of ranks. Gray's approximation overshoots the exact pmf by about one point at
    /// θ = 0.99 (see the module doc), so the tolerance is 2.5 points.
    #[test]
    fn top_one_percent_of_keys_takes_the_pmf_share() {
        for (n, theta) in [(10_000u64, 0.99), (100_000, 0.99), (50_000, 0.8)] {
            let z = Zipfian::new(n, theta);
            let mut rng = SimRng::new(9);
            let samples = 1_000_000;
            let mut counts = vec![0u32; n as usize];
            for _ in 0..samples {
                counts[z.key(unit(&mut rng)) as usize] += 1;
            }
            counts.sort_unstable_by(|a, b| b.cmp(a));
            let k = n / 100;
            let observed =
                counts[..k as usize].iter().map(|&c| c as f64).sum::<f64>() / samples as f64;
            let expected = top_share(k, n, theta);
            assert!(
                (observed - expected).abs() < 0.025,
                "n {n} θ {theta}: top 1 % took {observed:.4}, pmf says {expected:.4}"
            );
        }
    }

    #[test]
    fn ranks_zero_and_one_are_exact() {
        let (n, theta) = (1000u64, 0.99);
        let z = Zipfian::new(n, theta);
        let mut rng = SimRng::new(1);
        let samples = 400_000;
        let mut top = [0u32; 2];
        for _ in 0..samples {
            let r = z.rank(unit(&mut rng));
            if r < 2 {
                top[r as usize] += 1;
            }
        }
        let zn = zeta(n, theta);
        for (r, &c) in top.iter().enumerate() {
            let expected = ((r + 1) as f64).powf(-theta) / zn;
            let observed = c as f64 / samples as f64;
            assert!((observed - expected).abs() < 0.003, "rank {r}: {observed} vs {expected}");
        }
    }
}
