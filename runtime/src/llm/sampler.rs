//! Next-token selection: greedy (temperature 0) or sampling with temperature, top-k and
//! top-p (nucleus), from a seeded generator so that a given `--seed` always gives the same
//! text.

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Checks the ranges, naming the offending option.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature must be ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// splitmix64: seeds the state from one u64.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256**: a small, fast generator whose output is fixed by its seed (no dependency
/// whose algorithm could change under us).
#[derive(Clone, Debug)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        Xoshiro256 {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks tokens from logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    options: SamplingOptions,
    rng: Xoshiro256,
}

/// Index of the largest value; the lowest index among equals (like numpy's argmax). NaNs
/// never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Sampler {
        Sampler {
            options,
            rng: Xoshiro256::new(options.seed),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.options.temperature == 0.0
    }

    /// The next token given the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        let o = self.options;
        // Candidates by descending logit (ties: lower id first, so the order is total).
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        if idx.is_empty() {
            return 0;
        }
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if o.top_k > 0 && o.top_k < idx.len() {
            idx.select_nth_unstable_by(o.top_k - 1, by_logit);
            idx.truncate(o.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize] as f64;
        let t = o.temperature as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= o.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return idx[i];
            }
        }
        *idx.last().expect("at least one candidate")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingOptions {
        SamplingOptions {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingOptions::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        let mut a = Sampler::new(opts(1.0, 1, 1.0, 3));
        let mut b = Sampler::new(opts(1.0, 0, 1e-6, 4));
        for _ in 0..50 {
            assert_eq!(a.sample(&logits), 1);
            assert_eq!(b.sample(&logits), 1);
        }
    }

    #[test]
    fn top_k_restricts_the_support() {
        let logits = [1.0, 1.1, 0.9, 1.05, -10.0];
        let mut s = Sampler::new(opts(5.0, 2, 1.0, 9));
        for _ in 0..500 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 3, "token {t} is outside the top 2");
        }
    }

    #[test]
    fn frequencies_follow_the_softmax_and_the_seed_fixes_the_stream() {
        // Two tokens with probabilities 0.731 / 0.269 at temperature 1.
        let logits = [1.0, 0.0];
        let mut s = Sampler::new(opts(1.0, 0, 1.0, 42));
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 0).count();
        let f = ones as f64 / n as f64;
        let want = 1.0 / (1.0 + (-1f64).exp());
        assert!((f - want).abs() < 0.015, "frequency {f}, expected {want}");
        let draw = |seed| {
            let mut s = Sampler::new(opts(0.8, 0, 0.9, seed));
            (0..64)
                .map(|_| s.sample(&[0.3, 0.2, 0.1, 0.0]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn options_out_of_range_are_named() {
        assert!(opts(-1.0, 0, 1.0, 0)
            .validate()
            .unwrap_err()
            .contains("--temperature"));
        assert!(opts(1.0, 0, 0.0, 0)
            .validate()
            .unwrap_err()
            .contains("--top-p"));
        assert!(opts(1.0, 0, 1.5, 0)
            .validate()
            .unwrap_err()
            .contains("--top-p"));
        assert!(opts(0.7, 40, 0.95, 0).validate().is_ok());
    }
}
