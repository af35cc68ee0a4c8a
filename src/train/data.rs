//! Placeholder of the data loader's API (replaced by the real module).
use crate::model::{ChatMessage, Tokenizer};
use crate::{Error, Result};

pub enum Record {
    Chat(Vec<ChatMessage>),
    PromptCompletion { prompt: String, completion: String },
    Text(String),
}

#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<i32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

pub fn read_jsonl(_path: &std::path::Path) -> Result<Vec<Record>> {
    Err(Error::InvalidArgument("todo".into()))
}
pub fn write_jsonl(_path: &std::path::Path, _records: &[Record]) -> Result<()> {
    Ok(())
}

pub fn tokenize(record: &Record, tokenizer: &Tokenizer, max_len: usize) -> Result<Example> {
    let Record::Chat(m) = record else { return Err(Error::InvalidArgument("todo".into())) };
    let prefix = tokenizer.apply_chat_template(&m[..m.len() - 1], true)?;
    let full = tokenizer.apply_chat_template(m, false)?;
    let p = tokenizer.encode(&prefix, false)?;
    let mut ids = tokenizer.encode(&full, false)?;
    ids.truncate(max_len);
    let mut targets: Vec<i32> = ids.iter().skip(1).map(|&i| i as i32).chain([-100]).collect();
    for t in targets.iter_mut().take(p.len() - 1) {
        *t = -100;
    }
    Ok(Example { ids, targets })
}

pub fn length_grouped_batches(lens: &[usize], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    super::rng::SplitMix64::stream(seed, epoch).shuffle(&mut idx);
    idx.chunks(batch_size).map(|c| c.to_vec()).collect()
}
