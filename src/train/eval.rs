//! Evaluation of a fine-tune: the loss on held-out examples, the share of questions a model
//! answers correctly (greedy answers checked by their fact), and how much of the base
//! model's own behaviour on general prompts the adapter keeps.

use super::company::{QuestionAnswer, is_correct};
use super::data::Example;
use super::general::RETENTION_PROMPTS;
use crate::model::{
    ChatMessage, GenerationConfig, Llama, Logits, LoraAdapter, Prompt, Sequence, Tokenizer, TrainSequence,
};
use crate::{Error, Result};

/// The mean loss over every counted target of `examples`, in batches of `batch_size`, with
/// `adapter` on the base (or the base alone).
pub fn eval_loss(model: &Llama, adapter: Option<&LoraAdapter>, examples: &[Example], batch_size: usize) -> Result<f64> {
    let (mut sum, mut counted) = (0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let batch =
            chunk.iter().map(|e| TrainSequence::new(e.ids.clone(), e.targets.clone())).collect::<Result<Vec<_>>>()?;
        let (loss, n) = model.eval_loss(&batch, adapter)?;
        sum += loss as f64 * n as f64;
        counted += n;
    }
    if counted == 0 {
        return Err(Error::InvalidArgument("the evaluation examples have no counted target".into()));
    }
    Ok(sum / counted as f64)
}

/// Greedy answers to `questions` (each asked after `system`), at most `max_new_tokens`
/// each, decoded without special tokens; `adapter` names a loaded adapter or `None` for the
/// base. The questions run in batches of `batch_size`.
pub fn answer(
    model: &Llama,
    tokenizer: &Tokenizer,
    questions: &[QuestionAnswer],
    system: &str,
    adapter: Option<&str>,
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<Vec<String>> {
    let conversations: Vec<Vec<ChatMessage>> = questions.iter().map(|q| q.prompt(system)).collect();
    complete(model, tokenizer, &conversations, adapter, max_new_tokens, batch_size)
        .map(|r| r.into_iter().map(|c| c.text).collect())
}

/// A greedy completion of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The rendered conversation's ids, with the template's generation prompt.
    pub prompt: Vec<u32>,
    /// The answer's ids (with the end-of-sequence token when the model produced it).
    pub answer: Vec<u32>,
    /// The answer's text, without special tokens, trimmed.
    pub text: String,
}

/// Greedy completions of chat `conversations` (with the template's generation prompt).
pub fn complete(
    model: &Llama,
    tokenizer: &Tokenizer,
    conversations: &[Vec<ChatMessage>],
    adapter: Option<&str>,
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<Vec<Completion>> {
    let config = GenerationConfig { max_new_tokens, eos_token_ids: tokenizer.eos_ids().to_vec(), ..Default::default() };
    let mut out = Vec::with_capacity(conversations.len());
    for chunk in conversations.chunks(batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|messages| {
                let text = tokenizer.apply_chat_template(messages, true)?;
                Ok(Prompt::new(tokenizer.encode(&text, false)?).with_adapter(adapter))
            })
            .collect::<Result<Vec<_>>>()?;
        let generated = model.generate(&prompts, &config, &mut |_, _| Ok(crate::model::Flow::Continue))?;
        for (prompt, g) in prompts.into_iter().zip(generated) {
            let text = tokenizer.decode(&g.ids, true)?;
            out.push(Completion { prompt: prompt.ids, answer: g.ids, text: text.trim().to_string() });
        }
    }
    Ok(out)
}

/// The share of `replies` that state their question's fact.
pub fn accuracy(questions: &[QuestionAnswer], replies: &[String]) -> f64 {
    if questions.is_empty() {
        return 0.0;
    }
    let right = questions.iter().zip(replies).filter(|(q, r)| is_correct(r, &q.expect)).count();
    right as f64 / questions.len() as f64
}

/// The base model's own greedy answers to [`RETENTION_PROMPTS`]: the reference retention is
/// measured against.
#[derive(Debug, Clone)]
pub struct RetentionReference {
    /// Per prompt, its ids and the base model's answer's ids.
    pub sequences: Vec<(Vec<u32>, Vec<u32>)>,
}

/// How close the adapted model stays to the base on the reference answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// The share of answer positions where the adapted model's top token is the base's.
    pub top_token_agreement: f64,
    /// The mean KL(base ‖ adapted) of the next-token distributions over those positions.
    pub mean_kl: f64,
    pub positions: usize,
}

impl RetentionReference {
    /// The base model's greedy answers (at most `max_new_tokens` each), no adapter.
    pub fn new(model: &Llama, tokenizer: &Tokenizer, max_new_tokens: usize) -> Result<RetentionReference> {
        let conversations: Vec<Vec<ChatMessage>> =
            RETENTION_PROMPTS.iter().map(|p| vec![ChatMessage::user(*p)]).collect();
        let done = complete(model, tokenizer, &conversations, None, max_new_tokens, RETENTION_PROMPTS.len())?;
        Ok(RetentionReference { sequences: done.into_iter().map(|c| (c.prompt, c.answer)).collect() })
    }

    /// Feeds each prompt and the base's answer, token by token, through the base and
    /// through the model with the loaded adapter `adapter`, and compares their next-token
    /// distributions at every answer position.
    pub fn measure(&self, model: &Llama, adapter: &str) -> Result<Retention> {
        let (mut agree, mut kl, mut positions) = (0usize, 0f64, 0usize);
        for (prompt, answer) in &self.sequences {
            if answer.is_empty() {
                continue;
            }
            let ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
            let base = model.forward(&[Sequence::new(&ids)], None, Logits::All)?.to_vec_f32()?;
            let tuned =
                model.forward(&[Sequence::new(&ids).with_adapter(Some(adapter))], None, Logits::All)?.to_vec_f32()?;
            let vocab = model.config.vocab_size;
            // Position j's logits predict token j + 1: the answer's tokens are predicted from
            // the prompt's last position on.
            for j in prompt.len() - 1..ids.len() - 1 {
                let (p, q) = (&base[j * vocab..(j + 1) * vocab], &tuned[j * vocab..(j + 1) * vocab]);
                agree += (argmax(p) == argmax(q)) as usize;
                kl += kl_divergence(p, q);
                positions += 1;
            }
        }
        if positions == 0 {
            return Err(Error::InvalidArgument("the base model's reference answers are all empty".into()));
        }
        Ok(Retention {
            top_token_agreement: agree as f64 / positions as f64,
            mean_kl: kl / positions as f64,
            positions,
        })
    }
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// KL(softmax(p) ‖ softmax(q)) in f64.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    fn log_softmax(x: &[f32]) -> impl Iterator<Item = f64> + '_ {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        x.iter().map(move |&v| v as f64 - lse)
    }
    log_softmax(p).zip(log_softmax(q)).map(|(lp, lq)| lp.exp() * (lp - lq)).sum::<f64>().max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_distributions_and_matches_a_hand_value() {
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
        // p = (0.5, 0.5), q = (0.25, 0.75): 0.5 ln 2 + 0.5 ln(2/3).
        let q = [0.25f32.ln(), 0.75f32.ln()];
        let expected = 0.5 * (2f64).ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&[0.0, 0.0], &q) - expected).abs() < 1e-6);
        assert_eq!(argmax(&[0.1, 3.0, -1.0]), 1);
    }
}
