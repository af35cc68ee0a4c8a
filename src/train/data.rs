//! Fine-tuning data: JSONL records in the three shapes people already have, tokenized with the
//! loss counted where the model should learn, and batches grouped by length.
//!
//! One JSON object a line (blank lines skipped; other keys, such as an `"id"`, are ignored):
//!
//! - `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`: a chat,
//!   rendered with the model's chat template; the loss counts the assistant's tokens only
//!   (each assistant message's content and the template's end of turn).
//! - `{"prompt": ..., "completion": ...}`: the loss counts the completion's tokens and an EOS.
//! - `{"text": ...}`: the loss counts every token, and an EOS.
//!
//! ```no_run
//! use kiln::model::Tokenizer;
//! use kiln::train::data;
//! # fn main() -> kiln::Result<()> {
//! let tokenizer = Tokenizer::from_hf_dir("SmolLM2-135M-Instruct".as_ref())?;
//! let examples = data::load_examples("train.jsonl".as_ref(), &tokenizer, 512)?;
//! let lens: Vec<usize> = examples.iter().map(data::Example::len).collect();
//! for batch in data::length_grouped_batches(&lens, 8, 42, 0) {
//!     // one step on examples[batch[0]], examples[batch[1]], ...
//! }
//! # Ok(()) }
//! ```

use super::rng::SplitMix64;
use crate::model::ChatMessage;
use crate::model::Tokenizer;
use crate::model::TrainSequence;
use crate::ops::loss::IGNORE_INDEX;
use crate::{Error, Result};
use serde_json::Value as Json;
use std::ops::Range;
use std::path::Path;

/// The roles a chat record may use.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One record of a JSONL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A conversation; the assistant's messages are learned.
    Chat(Vec<ChatMessage>),
    /// The completion is learned, given the prompt.
    PromptCompletion { prompt: String, completion: String },
    /// Plain text, all of it learned.
    Text(String),
}

impl Record {
    pub fn chat(messages: impl IntoIterator<Item = ChatMessage>) -> Record {
        Record::Chat(messages.into_iter().collect())
    }

    pub fn prompt_completion(prompt: impl Into<String>, completion: impl Into<String>) -> Record {
        Record::PromptCompletion { prompt: prompt.into(), completion: completion.into() }
    }

    pub fn text(text: impl Into<String>) -> Record {
        Record::Text(text.into())
    }

    /// The record as one JSONL line (no newline), keys in a fixed order.
    pub fn to_json_line(&self) -> String {
        let s = |text: &str| Json::String(text.to_string()).to_string();
        match self {
            Record::Chat(messages) => {
                let list: Vec<String> = messages
                    .iter()
                    .map(|m| format!("{{\"role\":{},\"content\":{}}}", s(&m.role), s(&m.content)))
                    .collect();
                format!("{{\"messages\":[{}]}}", list.join(","))
            }
            Record::PromptCompletion { prompt, completion } => {
                format!("{{\"prompt\":{},\"completion\":{}}}", s(prompt), s(completion))
            }
            Record::Text(text) => format!("{{\"text\":{}}}", s(text)),
        }
    }

    /// The record a parsed JSON line holds, or what is wrong with it.
    fn from_json(value: &Json) -> std::result::Result<Record, String> {
        let Json::Object(fields) = value else {
            return Err(format!("expected a JSON object, found {}", kind_of(value)));
        };
        let shapes: Vec<&str> =
            ["messages", "prompt", "completion", "text"].into_iter().filter(|k| fields.contains_key(*k)).collect();
        let is_chat = shapes.contains(&"messages");
        let is_pair = shapes.contains(&"prompt") || shapes.contains(&"completion");
        let is_text = shapes.contains(&"text");
        if usize::from(is_chat) + usize::from(is_pair) + usize::from(is_text) > 1 {
            return Err(format!(
                "the keys {} mix record shapes: a line is one of {{\"messages\": ...}}, {{\"prompt\": ..., \
                 \"completion\": ...}} or {{\"text\": ...}}",
                quoted(&shapes)
            ));
        }
        let string = |key: &str| -> std::result::Result<String, String> {
            match fields.get(key) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("\"{key}\" must be a string, found {}", kind_of(other))),
                None => Err(format!("\"{key}\" is missing")),
            }
        };
        if is_chat {
            let Some(Json::Array(list)) = fields.get("messages") else {
                return Err(format!("\"messages\" must be a list, found {}", kind_of(&fields["messages"])));
            };
            if list.is_empty() {
                return Err("\"messages\" is empty".into());
            }
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let Json::Object(m) = m else {
                    return Err(format!("messages[{i}] must be an object, found {}", kind_of(m)));
                };
                let field = |key: &str| match m.get(key) {
                    Some(Json::String(s)) => Ok(s.clone()),
                    Some(other) => Err(format!("messages[{i}].{key} must be a string, found {}", kind_of(other))),
                    None => Err(format!("messages[{i}] has no \"{key}\"")),
                };
                let role = field("role")?;
                if !ROLES.contains(&role.as_str()) {
                    return Err(format!(
                        "messages[{i}].role is {role:?}: expected \"system\", \"user\" or \"assistant\""
                    ));
                }
                messages.push(ChatMessage::new(role, field("content")?));
            }
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err("the conversation has no assistant message: nothing to learn".into());
            }
            Ok(Record::Chat(messages))
        } else if is_pair {
            Ok(Record::PromptCompletion { prompt: string("prompt")?, completion: string("completion")? })
        } else if is_text {
            let text = string("text")?;
            if text.is_empty() {
                return Err("\"text\" is empty".into());
            }
            Ok(Record::Text(text))
        } else {
            let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
            Err(format!(
                "not a known record: expected {{\"messages\": [...]}}, {{\"prompt\": ..., \"completion\": ...}} or \
                 {{\"text\": ...}}, found the keys {}",
                quoted(&keys)
            ))
        }
    }
}

fn kind_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn quoted(keys: &[&str]) -> String {
    let list: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    format!("[{}]", list.join(", "))
}

/// The records of a JSONL text with the (1-based) line each came from. Blank lines are
/// skipped. `Err(InvalidArgument)` "`{source}:{line}: what is wrong`" for the first bad line:
/// not JSON, not an object, an unknown or mixed shape, a missing or non-string field, an
/// empty `messages` list or `text`, a role other than system / user / assistant, a chat with
/// no assistant message.
pub fn parse_jsonl_lines(text: &str, source: &str) -> Result<Vec<(usize, Record)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i + 1;
        let bad = |what: String| Error::InvalidArgument(format!("{source}:{line_no}: {what}"));
        let value: Json = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        records.push((line_no, Record::from_json(&value).map_err(bad)?));
    }
    Ok(records)
}

/// The records of a JSONL text (see [`parse_jsonl_lines`] for the errors).
pub fn parse_jsonl(text: &str, source: &str) -> Result<Vec<Record>> {
    Ok(parse_jsonl_lines(text, source)?.into_iter().map(|(_, r)| r).collect())
}

/// The text of a JSONL file: `Err(Io)` naming the file when it cannot be read,
/// `Err(InvalidArgument)` naming the line of the first byte that is not UTF-8.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::InvalidArgument(format!("{}:{line}: not UTF-8 text", path.display()))
    })
}

/// The records of the JSONL file at `path` (see [`parse_jsonl`]; errors name the file and line).
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    parse_jsonl(&read_text(path)?, &path.display().to_string())
}

/// Writes `records` as JSONL to `path`, whole or not at all; [`read_jsonl`] gives them back.
pub fn write_jsonl(path: &Path, records: &[Record]) -> Result<()> {
    let mut text = String::new();
    for record in records {
        text.push_str(&record.to_json_line());
        text.push('\n');
    }
    crate::fs::write_file(path, text.as_bytes()).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

/// A tokenized example, ready for [`TrainSequence::new`]`(ids, targets)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `targets[j]` is the id the model must predict after position j (`ids[j + 1]`) when
    /// token j + 1 is counted, else [`IGNORE_INDEX`] (−100); the last is −100.
    pub targets: Vec<i32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The number of positions whose target is counted in the loss.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    pub fn into_sequence(self) -> Result<TrainSequence> {
        TrainSequence::new(self.ids, self.targets)
    }
}

/// `record` tokenized for training, its first `max_len` tokens kept.
///
/// - Chat: the chat template's rendering of all messages (no generation prompt), tokenized
///   without adding special tokens (as transformers' `apply_chat_template(tokenize=True)`). A
///   token counts when its bytes lie inside what an assistant message adds: the text rendering
///   `messages[..=i]` adds after rendering `messages[..i]` with the generation prompt, which is
///   the message's content and the template's end of turn (`<|im_end|>\n` in ChatML).
/// - Prompt/completion: `prompt + completion` tokenized with the tokenizer's special tokens
///   (a BOS for tokenizers that add one), then the EOS unless already last; the tokens inside
///   the completion's text count (one spanning the seam does not), and the EOS.
/// - Text: tokenized likewise, EOS appended; every token counts.
///
/// Errors (`InvalidArgument`): a tokenizer without a chat template (chat) or EOS token
/// (otherwise); a template that is not incremental (rendering the first messages is not a
/// prefix of rendering them all), naming the message; an assistant message first (the
/// template renders nothing before it); empty text; nothing counted in the first `max_len`
/// tokens.
pub fn tokenize(record: &Record, tokenizer: &Tokenizer, max_len: usize) -> Result<Example> {
    let (mut ids, mut counted) = match record {
        Record::Chat(messages) => tokenize_chat(messages, tokenizer)?,
        Record::PromptCompletion { prompt, completion } => {
            tokenize_with_eos(&format!("{prompt}{completion}"), prompt.len(), tokenizer)?
        }
        Record::Text(text) => tokenize_with_eos(text, 0, tokenizer)?,
    };
    if ids.is_empty() {
        return Err(Error::InvalidArgument("the record's text is empty".into()));
    }
    let total = ids.len();
    ids.truncate(max_len);
    counted.truncate(max_len);
    let targets: Vec<i32> = (0..ids.len())
        .map(|j| match ids.get(j + 1) {
            Some(&next) if counted[j + 1] => next as i32,
            _ => IGNORE_INDEX,
        })
        .collect();
    if targets.iter().all(|&t| t == IGNORE_INDEX) {
        let learned = match record {
            Record::Chat(_) => "assistant",
            Record::PromptCompletion { .. } => "completion",
            Record::Text(_) => "text",
        };
        return Err(Error::InvalidArgument(if total > max_len {
            format!(
                "nothing to learn in the first {max_len} of its {total} tokens: the {learned} tokens come later \
                 (raise the sequence length or shorten the record)"
            )
        } else {
            format!("nothing to learn: no {learned} token follows another token in its {total} tokens")
        }));
    }
    Ok(Example { ids, targets })
}

fn tokenizer_err(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("tokenizing failed: {e}"))
}

/// Whether each token's bytes lie inside one of `spans` (a token with no bytes, such as a
/// special token a post-processor added, never does).
fn inside(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    offsets.iter().map(|&(a, b)| a < b && spans.iter().any(|s| s.start <= a && b <= s.end)).collect()
}

fn tokenize_chat(messages: &[ChatMessage], tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>)> {
    let full = tokenizer.apply_chat_template(messages, false)?;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        if i == 0 {
            return Err(Error::InvalidArgument(
                "messages[0] is the assistant's: the chat template renders no conversation before it, so its \
                 tokens cannot be told apart"
                    .into(),
            ));
        }
        let before = tokenizer.apply_chat_template(&messages[..i], true)?;
        let through = tokenizer.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || before.len() > through.len() {
            return Err(Error::InvalidArgument(format!(
                "the chat template is not incremental at messages[{i}] (the assistant's): rendering the \
                 conversation up to it is not a prefix of rendering all of it, so its tokens cannot be located"
            )));
        }
        spans.push(before.len()..through.len());
    }
    let encoding = tokenizer.inner().encode(full.as_str(), false).map_err(tokenizer_err)?;
    Ok((encoding.get_ids().to_vec(), inside(encoding.get_offsets(), &spans)))
}

/// `text` tokenized with special tokens and an EOS; the tokens inside `text[learned_from..]`
/// and the EOS are counted.
fn tokenize_with_eos(text: &str, learned_from: usize, tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>)> {
    if text.is_empty() {
        return Err(Error::InvalidArgument("the record's text is empty".into()));
    }
    let &eos = tokenizer
        .eos_ids()
        .first()
        .ok_or_else(|| Error::InvalidArgument("the tokenizer has no EOS token to end the example with".into()))?;
    let encoding = tokenizer.inner().encode(text, true).map_err(tokenizer_err)?;
    let mut ids = encoding.get_ids().to_vec();
    let mut counted = if learned_from == 0 {
        vec![true; ids.len()]
    } else {
        inside(encoding.get_offsets(), std::slice::from_ref(&(learned_from..text.len())))
    };
    if ids.last() != Some(&eos) {
        ids.push(eos);
        counted.push(true);
    }
    Ok((ids, counted))
}

/// Each of `records` tokenized (see [`tokenize`]); an error names `{source}: record {n}` (1-based).
pub fn tokenize_records(
    records: &[Record],
    tokenizer: &Tokenizer,
    max_len: usize,
    source: &str,
) -> Result<Vec<Example>> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| tokenize(r, tokenizer, max_len).map_err(|e| at(e, &format!("{source}: record {}", i + 1))))
        .collect()
}

/// The examples of the JSONL file at `path`, every line parsed and tokenized before any is
/// used; an error names the file and line (`train.jsonl:12: ...`).
pub fn load_examples(path: &Path, tokenizer: &Tokenizer, max_len: usize) -> Result<Vec<Example>> {
    let source = path.display().to_string();
    parse_jsonl_lines(&read_text(path)?, &source)?
        .into_iter()
        .map(|(line, r)| tokenize(&r, tokenizer, max_len).map_err(|e| at(e, &format!("{source}:{line}"))))
        .collect()
}

/// `e` with `place` in front of its message.
fn at(e: Error, place: &str) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{place}: {m}")),
        other => other,
    }
}

/// How many batches a megabatch holds (Hugging Face's `LengthGroupedSampler` default).
const MEGABATCH_BATCHES: usize = 50;

/// The order of one epoch: the indices of `lens` in batches of `batch_size` (0 is taken as 1)
/// that group similar lengths, to limit padding. As Hugging Face's `LengthGroupedSampler`:
/// the indices shuffled, cut into megabatches of 50 batches, each sorted by length
/// (longest first) and cut into batches; then the full batches are shuffled, the one holding
/// the longest sequence put first (a run that runs out of memory does so at once), and the
/// short batch, if any, kept last. Every index appears exactly once. The order depends only on
/// `(seed, epoch)` and `lens`, the same on every platform and version (a resumed run relies
/// on it).
pub fn length_grouped_batches(lens: &[usize], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = SplitMix64::stream(seed, epoch);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    rng.shuffle(&mut order);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(lens.len().div_ceil(batch_size));
    for megabatch in order.chunks_mut(batch_size * MEGABATCH_BATCHES) {
        megabatch.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        batches.extend(megabatch.chunks(batch_size).map(<[usize]>::to_vec));
    }
    let short = match batches.last() {
        Some(last) if last.len() < batch_size => batches.pop(),
        _ => None,
    };
    rng.shuffle(&mut batches);
    let longest = |b: &Vec<usize>| b.iter().map(|&i| lens[i]).max().unwrap_or(0);
    if let Some(first) = (0..batches.len()).max_by_key(|&b| (longest(&batches[b]), std::cmp::Reverse(b))) {
        batches.swap(0, first);
    }
    batches.extend(short);
    batches
}
