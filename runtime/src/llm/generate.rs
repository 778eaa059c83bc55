//! The generation loop: a prompt's ids through the model, then one sampled token per step
//! until EOS, the token budget or the context is reached. `patchrt run` streams its pieces.

use std::time::Instant;

use super::sampler::{Sampler, SamplingOptions};
use super::text::{StreamDecoder, TextTokenizer};
use super::{LanguageModel, LlmError};

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model produced one of its EOS ids (not emitted).
    EndOfSequence,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The next step would exceed the model's context.
    ContextFull,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::EndOfSequence => "end of sequence",
            Stop::MaxTokens => "max tokens",
            Stop::ContextFull => "context full",
        })
    }
}

/// What one generation did.
#[derive(Clone, Debug)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub stop: Stop,
    /// Seconds for the prompt's forward pass, and for the generated tokens after it.
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl LanguageModel {
    /// The ids of `text` as a plain prompt (see [`TextTokenizer::encode_prompt`]).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        let bos = self.generation.bos_token_id.map(|b| b as u32);
        self.tokenizer()?
            .encode_prompt(text, bos, self.generation.add_bos_token)
    }

    /// A prompt generation can start from: not empty, and shorter than the model's context.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<(), LlmError> {
        if prompt.is_empty() {
            return Err(LlmError::Invalid("the prompt is empty".into()));
        }
        match self.max_context() {
            Some(ctx) if prompt.len() >= ctx => Err(LlmError::PromptTooLong {
                tokens: prompt.len(),
                context: ctx,
            }),
            _ => Ok(()),
        }
    }

    /// Generates up to `max_tokens` after `prompt` (ids, not empty, shorter than the context),
    /// calling `on_token` with each new id as soon as it is sampled.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: SamplingOptions,
        mut on_token: impl FnMut(u32) -> Result<(), LlmError>,
    ) -> Result<Generated, LlmError> {
        self.check_prompt(prompt)?;
        let eos: Vec<u32> = self
            .generation
            .eos_token_ids
            .iter()
            .map(|&e| e as u32)
            .collect();
        let mut sampler = Sampler::new(sampling);
        let mut cache = self.new_cache();
        let t0 = Instant::now();
        let mut logits = self.forward(&mut cache, prompt, 1)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut tokens = Vec::new();
        let mut stop = Stop::MaxTokens;
        while tokens.len() < max_tokens {
            let next = sampler.sample(logits.last());
            if eos.contains(&next) {
                stop = Stop::EndOfSequence;
                break;
            }
            tokens.push(next);
            on_token(next)?;
            if tokens.len() == max_tokens {
                break;
            }
            if self.max_context().is_some_and(|c| cache.len() + 1 > c) {
                stop = Stop::ContextFull;
                break;
            }
            logits = self.forward(&mut cache, &[next], 1)?;
        }
        Ok(Generated {
            tokens,
            stop,
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        })
    }

    /// [`generate`](Self::generate) from a plain text prompt to text, with `on_piece` called
    /// with each completed piece of text as it streams.
    pub fn generate_text(
        &self,
        prompt: &str,
        max_tokens: usize,
        sampling: SamplingOptions,
        mut on_piece: impl FnMut(&str),
    ) -> Result<(String, Generated), LlmError> {
        let ids = self.encode_prompt(prompt)?;
        self.stream(&ids, max_tokens, sampling, &mut on_piece)
    }

    /// Generation from ids with the text streamed through `on_piece`; returns the whole text.
    pub fn stream(
        &self,
        ids: &[u32],
        max_tokens: usize,
        sampling: SamplingOptions,
        on_piece: &mut dyn FnMut(&str),
    ) -> Result<(String, Generated), LlmError> {
        let tok: &TextTokenizer = self.tokenizer()?;
        let mut decoder = StreamDecoder::new();
        let mut text = String::new();
        let generated = self.generate(ids, max_tokens, sampling, |id| {
            let piece = decoder.push(tok, id)?;
            on_piece(&piece);
            text.push_str(&piece);
            Ok(())
        })?;
        let rest = decoder.finish(tok)?;
        on_piece(&rest);
        text.push_str(&rest);
        Ok((text, generated))
    }
}
