//! Perplexity over a token stream, by a fixed rule so that figures compare across runtimes:
//! the first `tokens` ids are cut into `floor(tokens / seq)` non-overlapping windows; each
//! window runs from an empty cache and predicts its tokens 1..seq from the ones before
//! (`seq - 1` predictions per window, no BOS added). Perplexity is `exp(Σ NLL / predictions)`,
//! accumulated in f64.

use super::{LanguageModel, LlmError};

/// The result of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub seq: usize,
    /// Sum of negative log-likelihoods of each window (nats).
    pub window_nll: Vec<f64>,
    /// Predictions in total (`windows × (seq − 1)`).
    pub predicted: usize,
}

impl Perplexity {
    pub fn windows(&self) -> usize {
        self.window_nll.len()
    }
    pub fn tokens_used(&self) -> usize {
        self.windows() * self.seq
    }
    pub fn nll_sum(&self) -> f64 {
        self.window_nll.iter().sum()
    }
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum() / self.predicted as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// `-log softmax(row)[target]`, in f64.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Evaluates `tokens` in windows of `seq` (see the module docs); `on_window(done, total)` is
/// called after each window.
pub fn perplexity(
    model: &LanguageModel,
    tokens: &[u32],
    seq: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Perplexity, LlmError> {
    if seq < 2 {
        return Err(LlmError::Invalid(format!(
            "--seq must be at least 2, got {seq}"
        )));
    }
    if let Some(ctx) = model.max_context() {
        if seq > ctx {
            return Err(LlmError::Invalid(format!(
                "--seq {seq} is longer than the model's context of {ctx}"
            )));
        }
    }
    let windows = tokens.len() / seq;
    if windows == 0 {
        return Err(LlmError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {seq}",
            tokens.len()
        )));
    }
    let mut window_nll = Vec::with_capacity(windows);
    for w in 0..windows {
        let ids = &tokens[w * seq..(w + 1) * seq];
        let mut cache = model.new_cache();
        let logits = model.forward(&mut cache, ids, seq)?;
        let sum: f64 = (0..seq - 1).map(|i| nll(logits.row(i), ids[i + 1])).sum();
        window_nll.push(sum);
        on_window(w + 1, windows);
    }
    Ok(Perplexity {
        seq,
        window_nll,
        predicted: windows * (seq - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_the_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        for t in 0..3 {
            let want = -((row[t] as f64).exp() / z).ln();
            assert!((nll(&row, t as u32) - want).abs() < 1e-12);
        }
        // Large logits do not overflow.
        assert!((nll(&[1000.0, 1000.0], 0) - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn perplexity_arithmetic() {
        let p = Perplexity {
            seq: 4,
            window_nll: vec![3.0, 6.0],
            predicted: 6,
        };
        assert_eq!(p.tokens_used(), 8);
        assert!((p.perplexity() - 1.5f64.exp()).abs() < 1e-12);
    }
}
