//! `patchrt bench`: prefill and decode throughput, repeated, with medians and spreads.
//!
//! Definitions (the same as `benches/peers/ort_bench.py`, so the two compare):
//! * `prefillN`: N tokens / the time of one forward call of N tokens on an empty cache;
//! * `decodeC`: after a C-token prefill (not timed), `steps` single-token calls feeding the
//!   greedy choice back; steps / their total time.
//!
//! Prompt ids are pseudo-random in `[100, vocab)` from a fixed seed. One warm-up run precedes
//! the timed repeats of every row.
//!
//! On the CPU the decode repeats are interleaved with read-bandwidth probes on the kernels' own
//! pool (`patch_kernels::bandwidth`, 16 MiB windows of a 256 MiB buffer), so that decode can be
//! stated as a share of the memory-bandwidth bound measured in the same run: the bytes of
//! weights one token reads ([`LanguageModel::weight_bytes_per_token`]) over that bandwidth.

use std::time::Instant;

use super::sampler::argmax;
use super::{LanguageModel, LlmError};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prefill: Vec<usize>,
    pub decode_context: usize,
    pub decode_steps: usize,
    pub repeats: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prefill: vec![128, 512],
            decode_context: 128,
            decode_steps: 32,
            repeats: 5,
        }
    }
}

/// Tokens per second of every repeat of one measurement.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub name: String,
    pub tokens_per_s: Vec<f64>,
}

impl BenchRow {
    pub fn median(&self) -> f64 {
        let mut v = self.tokens_per_s.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    /// Half the min-to-max range relative to the median (±%).
    pub fn spread_pct(&self) -> f64 {
        let min = self
            .tokens_per_s
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let max = self.tokens_per_s.iter().copied().fold(0.0, f64::max);
        50.0 * (max - min) / self.median()
    }
}

/// Deterministic prompt ids in `[100, vocab)`.
pub fn prompt_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    let span = vocab.saturating_sub(100).max(1) as u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (100 + (x >> 33) % span).min(vocab as u64 - 1) as u32
        })
        .collect()
}

fn prefill_rate(model: &LanguageModel, ids: &[u32]) -> Result<f64, LlmError> {
    let mut cache = model.new_cache();
    let t = Instant::now();
    model.forward(&mut cache, ids, 1)?;
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

fn decode_rate(model: &LanguageModel, ids: &[u32], steps: usize) -> Result<f64, LlmError> {
    let mut cache = model.new_cache();
    let mut next = argmax(model.forward(&mut cache, ids, 1)?.last());
    let t = Instant::now();
    for _ in 0..steps {
        next = argmax(model.forward(&mut cache, &[next], 1)?.last());
    }
    Ok(steps as f64 / t.elapsed().as_secs_f64())
}

/// Read-bandwidth probes taken between the decode repeats, GB/s.
#[derive(Clone, Debug, Default)]
pub struct BandwidthProbe {
    pub gb_per_s: Vec<f64>,
}

impl BandwidthProbe {
    pub fn median(&self) -> f64 {
        BenchRow {
            name: String::new(),
            tokens_per_s: self.gb_per_s.clone(),
        }
        .median()
    }
}

/// Probes per decode repeat (each reads one 16 MiB window, ≈ 1 ms).
const PROBES_PER_REPEAT: usize = 5;

/// Runs every measurement; `on_row` sees each row as soon as it is done. With `bandwidth`,
/// the decode repeats are interleaved with read-bandwidth probes, returned with the rows.
pub fn run(
    model: &LanguageModel,
    options: &BenchOptions,
    bandwidth: Option<&mut BandwidthProbe>,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, LlmError> {
    if options.repeats == 0 || options.decode_steps == 0 {
        return Err(LlmError::Invalid(
            "--repeats and --decode-steps must be ≥ 1".into(),
        ));
    }
    let longest = options
        .prefill
        .iter()
        .copied()
        .chain([options.decode_context + options.decode_steps])
        .max()
        .unwrap_or(0);
    if let Some(ctx) = model.max_context() {
        if longest > ctx {
            return Err(LlmError::ContextFull(longest, ctx));
        }
    }
    let mut rows = Vec::new();
    for &n in &options.prefill {
        let ids = prompt_ids(n, model.vocab(), n as u64);
        prefill_rate(model, &ids)?;
        let tokens_per_s = (0..options.repeats)
            .map(|_| prefill_rate(model, &ids))
            .collect::<Result<_, _>>()?;
        let row = BenchRow {
            name: format!("prefill{n}"),
            tokens_per_s,
        };
        on_row(&row);
        rows.push(row);
    }
    let c = options.decode_context;
    let ids = prompt_ids(c, model.vocab(), c as u64);
    decode_rate(model, &ids, options.decode_steps.min(4))?;
    let probe = bandwidth.and_then(|b| {
        let kernels = patch_kernels::CpuKernels::global().ok()?;
        Some((
            b,
            kernels,
            vec![1f32; patch_kernels::bandwidth::PROBE_ELEMENTS],
        ))
    });
    let mut probe = probe.map(|(b, k, buf)| (b, k, buf, 0usize));
    let mut tokens_per_s = Vec::with_capacity(options.repeats);
    for _ in 0..options.repeats {
        tokens_per_s.push(decode_rate(model, &ids, options.decode_steps)?);
        if let Some((b, kernels, buf, next)) = probe.as_mut() {
            for _ in 0..PROBES_PER_REPEAT {
                let gbs = patch_kernels::bandwidth::read_window(buf, kernels, next);
                b.gb_per_s.push(gbs);
            }
        }
    }
    let row = BenchRow {
        name: format!("decode{c}"),
        tokens_per_s,
    };
    on_row(&row);
    rows.push(row);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let r = BenchRow {
            name: "x".into(),
            tokens_per_s: vec![10.0, 12.0, 11.0, 9.0],
        };
        assert_eq!(r.median(), 10.5);
        assert!((r.spread_pct() - 50.0 * 3.0 / 10.5).abs() < 1e-12);
    }

    #[test]
    fn prompt_ids_are_in_range_and_fixed() {
        let a = prompt_ids(1000, 300, 5);
        assert!(a.iter().all(|&t| (100..300).contains(&t)));
        assert_eq!(a, prompt_ids(1000, 300, 5));
    }
}
