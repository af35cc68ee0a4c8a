//! Generation: the prompts of a batch go through one prefill, then every sequence decodes a
//! token per step against the KV cache, greedy or sampled (temperature, top-k, top-p, seed),
//! until its end-of-sequence token, a stop the caller signals (a stop string, with
//! [`StopStrings`]), or the token budget. Each
//! sequence may run with its own adapter; one forward per step serves the whole batch.

use super::llama::{KvState, Llama, Logits, Sequence};
use super::tokenizer::{TokenStream, Tokenizer};
use crate::ops::SamplingParams;
use crate::{Error, Result};

/// How [`Llama::generate`] decodes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// New tokens per sequence at most; 0 runs the prompts only.
    pub max_new_tokens: usize,
    /// Temperature 0 (the default) is greedy decoding.
    pub sampling: SamplingParams,
    /// Tokens that end a sequence (kept as its last token); the model's own when empty.
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
            eos_token_ids: Vec::new(),
        }
    }
}

/// A prompt and the adapter its sequence runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub adapter: Option<String>,
}

impl Prompt {
    pub fn new(ids: Vec<u32>) -> Prompt {
        Prompt { ids, adapter: None }
    }

    pub fn with_adapter(self, adapter: Option<&str>) -> Prompt {
        Prompt { adapter: adapter.map(str::to_string), ..self }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence token.
    Eos,
    /// The caller's callback stopped it (a stop string, say).
    Stopped,
    /// It reached `max_new_tokens`.
    Length,
}

/// One sequence's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The new tokens (an end-of-sequence token included).
    pub ids: Vec<u32>,
    pub finish: FinishReason,
}

/// What the per-token callback tells the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// End this sequence here (its token is kept).
    Stop,
}

impl Llama {
    /// Generates a continuation of every prompt. `on_token(sequence, id)` is called for each
    /// new token as soon as it is chosen (streaming) and may stop its sequence.
    ///
    /// Sampled draws depend on `(seed, step, sequence index)` only, so a seed gives the same
    /// tokens on every device. Errors: an empty prompt, a token id past the vocabulary, an
    /// adapter that is not loaded, a prompt that with its budget passes the model's context,
    /// and whatever the callback returns.
    pub fn generate(
        &self,
        prompts: &[Prompt],
        config: &GenerationConfig,
        on_token: &mut dyn FnMut(usize, u32) -> Result<Flow>,
    ) -> Result<Vec<Generated>> {
        let context = self.config.max_sequence();
        if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
            return Err(Error::InvalidArgument(format!("prompt {i} is empty: generation needs at least one token")));
        }
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.ids.len() > context) {
            return Err(Error::InvalidArgument(format!(
                "prompt {i} has {} tokens, past the model's context of {context}",
                p.ids.len()
            )));
        }
        let eos = if config.eos_token_ids.is_empty() { &self.config.eos_token_ids } else { &config.eos_token_ids };
        let mut results: Vec<Generated> =
            prompts.iter().map(|_| Generated { ids: Vec::new(), finish: FinishReason::Length }).collect();
        if prompts.is_empty() {
            return Ok(results);
        }
        // One slot more than any sequence needs; the context bounds it.
        let capacity = longest.saturating_add(config.max_new_tokens).min(context).max(1);
        let mut state: KvState = self.new_state(prompts.len(), capacity)?;
        let batch: Vec<Sequence<'_>> =
            prompts.iter().map(|p| Sequence::new(&p.ids).with_adapter(p.adapter.as_deref())).collect();
        if config.max_new_tokens == 0 {
            self.forward(&batch, Some(&mut state), Logits::Last)?;
            return Ok(results);
        }
        let mut logits = self.forward(&batch, Some(&mut state), Logits::Last)?;
        let mut live: Vec<bool> = vec![true; prompts.len()];
        for step in 0..config.max_new_tokens {
            let picked = crate::ops::sample(&logits, &config.sampling, step as u64)?.to_vec::<u32>()?;
            let mut next: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
            for (i, &id) in picked.iter().enumerate() {
                if !live[i] {
                    continue;
                }
                results[i].ids.push(id);
                let flow = on_token(i, id)?;
                if eos.contains(&id) {
                    results[i].finish = FinishReason::Eos;
                    live[i] = false;
                } else if flow == Flow::Stop {
                    results[i].finish = FinishReason::Stopped;
                    live[i] = false;
                } else if state.lens()[i] >= capacity {
                    // The context is full: the sequence ends at its length limit.
                    live[i] = false;
                } else {
                    next[i].push(id);
                }
            }
            if !live.iter().any(|&l| l) || step + 1 == config.max_new_tokens {
                break;
            }
            let batch: Vec<Sequence<'_>> = next
                .iter()
                .zip(prompts)
                .map(|(ids, p)| Sequence::new(ids).with_adapter(p.adapter.as_deref()))
                .collect();
            logits = self.forward(&batch, Some(&mut state), Logits::Last)?;
        }
        Ok(results)
    }
}

/// Ends sequences at stop strings: the generation callback feeds it each new token, and it
/// answers [`Flow::Stop`] once a sequence's decoded completion contains one of the strings
/// (the token that completes it is kept, as transformers' `stop_strings` keeps it).
pub struct StopStrings<'t> {
    stops: Vec<String>,
    streams: Vec<TokenStream<'t>>,
    texts: Vec<String>,
}

impl<'t> StopStrings<'t> {
    /// For a batch of `batch` sequences. Empty strings are ignored.
    pub fn new(tokenizer: &'t Tokenizer, stops: &[&str], batch: usize) -> StopStrings<'t> {
        StopStrings {
            stops: stops.iter().filter(|s| !s.is_empty()).map(|s| s.to_string()).collect(),
            streams: (0..batch).map(|_| tokenizer.decoder_stream(false)).collect(),
            texts: vec![String::new(); batch],
        }
    }

    /// Feeds sequence `seq`'s new token `id`. `Err` for a sequence past the batch or an id
    /// past the vocabulary.
    pub fn check(&mut self, seq: usize, id: u32) -> Result<Flow> {
        let batch = self.streams.len();
        let (stream, text) = self
            .streams
            .get_mut(seq)
            .zip(self.texts.get_mut(seq))
            .ok_or_else(|| Error::InvalidArgument(format!("sequence {seq} of a batch of {batch}")))?;
        let Some(piece) = stream.step(id)? else { return Ok(Flow::Continue) };
        // Only the new text and the longest stop's worth before it can complete a stop.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = text.len().saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        text.push_str(&piece);
        let tail = &text[from..];
        Ok(if self.stops.iter().any(|s| tail.contains(s.as_str())) { Flow::Stop } else { Flow::Continue })
    }

    /// Sequence `seq`'s completion text so far.
    pub fn text(&self, seq: usize) -> Option<&str> {
        self.texts.get(seq).map(String::as_str)
    }
}
