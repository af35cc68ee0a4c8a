//! The model's tokenizer: Hugging Face's `tokenizers` from a `tokenizer.json`, or rebuilt from a
//! GGUF file's `tokenizer.ggml.*` metadata the way transformers builds it, with the special
//! token ids and the chat template beside it.
//!
//! ```no_run
//! use kiln::model::{ChatMessage, Tokenizer};
//! # fn main() -> kiln::Result<()> {
//! let gguf = kiln::GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let tokenizer = Tokenizer::from_gguf(&gguf)?;
//! let prompt = tokenizer.apply_chat_template(&[ChatMessage::user("Hi!")], true)?;
//! let ids = tokenizer.encode(&prompt, true)?; // <|im_start|> and <|im_end|> stay whole
//! let mut stream = tokenizer.decoder_stream(true);
//! for &id in &ids {
//!     if let Some(text) = stream.step(id)? {
//!         print!("{text}");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! From GGUF, what transformers 5 builds (`integrations/gguf/gguf_tokenizer_mapping.py`):
//! for `tokenizer.ggml.model = "gpt2"`, a byte-level BPE (GPT-2's: no unknown token, no
//! prefix space) over the file's tokens, each re-spelled in GPT-2's byte alphabet when it is
//! not already, and its merges; the pre-tokenizer splits with the regex `tokenizer.ggml.pre`
//! names (llama3, qwen2, ...) or GPT-2's; CONTROL tokens (type 3) are special added tokens
//! and USER_DEFINED ones (type 4) plain added tokens, both matched whole in the text; BOS and
//! EOS are added only when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so. Other
//! tokenizer models (`llama`'s sentencepiece, `t5`) are `Err(Unsupported)`.
//!
//! From `tokenizer.json`, what transformers 5's `AutoTokenizer` gives on its directory: the
//! file's own pipeline and post-processor (transformers 5 ignores `add_bos_token` in
//! `tokenizer_config.json` when there is a `tokenizer.json`), the named special tokens of
//! `tokenizer_config.json` (or of `special_tokens_map.json` when the config has no
//! `added_tokens_decoder`) added as special tokens when the file lacks them, and the chat
//! template of `chat_template.jinja`, else of the config (a string, or the list of named
//! templates, of which "default" is used).

use super::chat::{ChatMessage, ChatTemplate};
use crate::io::{GgufArray, GgufFile, GgufValue};
use crate::{Error, Result};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// The named special tokens transformers passes to chat templates, in its order.
const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A tokenizer with its special ids and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// The named special tokens (`("bos_token", "<|im_start|>")`, ...) chat templates see.
    special_tokens: Vec<(String, String)>,
    chat_template: Option<ChatTemplate>,
    /// Why there is no chat template, for the error of `apply_chat_template`.
    no_template: String,
    /// Where it came from, for error messages.
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

fn bad(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{}: {e}", path.display()))
}

/// The JSON object in `path`, or `None` when there is no such file.
fn read_json_beside(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    };
    match serde_json::from_str(&text) {
        Ok(Json::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(bad(path, "not a JSON object")),
        Err(e) => Err(bad(path, format!("not valid JSON: {e}"))),
    }
}

/// A token as tokenizer_config.json writes it: a string, or an AddedToken's fields.
fn added_token_from_json(value: &Json, special: bool, file: &Path, key: &str) -> Result<Option<AddedToken>> {
    match value {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(AddedToken::from(s.as_str(), special).normalized(false))),
        Json::Object(fields) => {
            let content = fields
                .get("content")
                .and_then(Json::as_str)
                .ok_or_else(|| bad(file, format!("{key}: a token object without a \"content\" string")))?;
            let flag = |name: &str, default: bool| fields.get(name).and_then(Json::as_bool).unwrap_or(default);
            let special = flag("special", special);
            Ok(Some(
                AddedToken::from(content, special)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", !special)),
            ))
        }
        other => Err(bad(file, format!("{key}: expected a token (a string or an object), found {other}"))),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and what lies beside it: `tokenizer_config.json` (named special
    /// tokens, `added_tokens_decoder`, `chat_template`), `special_tokens_map.json`,
    /// `chat_template.jinja`, and `generation_config.json`'s `eos_token_id` (more stop ids).
    /// Errors: a missing or unreadable file is `Err(Io)`, a corrupt one `Err(InvalidArgument)`,
    /// each naming the file.
    pub fn from_file(tokenizer_json: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(tokenizer_json).map_err(|e| io_err(tokenizer_json, e))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| bad(tokenizer_json, format!("not a valid tokenizer.json: {e}")))?;
        let dir = tokenizer_json.parent().map(Path::to_path_buf).unwrap_or_default();

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_beside(&config_path)?.unwrap_or_default();
        let mut named: Vec<(String, Json)> = SPECIAL_TOKEN_NAMES
            .iter()
            .filter_map(|&name| config.get(name).map(|v| (name.to_string(), v.clone())))
            .collect();
        let mut extra: Vec<Json> = Vec::new();
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Json::Array(list)) = config.get(key) {
                extra.extend(list.iter().cloned());
            }
        }
        let map_path = dir.join("special_tokens_map.json");
        if !config.contains_key("added_tokens_decoder")
            && let Some(map) = read_json_beside(&map_path)?
        {
            for (key, value) in map {
                if SPECIAL_TOKEN_NAMES.contains(&key.as_str()) {
                    named.retain(|(k, _)| *k != key);
                    named.push((key, value));
                } else if key == "additional_special_tokens" || key == "extra_special_tokens" {
                    if let Json::Array(list) = value {
                        extra.extend(list);
                    }
                }
            }
        }
        named.sort_by_key(|(k, _)| SPECIAL_TOKEN_NAMES.iter().position(|n| n == k));

        // The tokens transformers adds when the tokenizer.json lacks them.
        let mut to_add: Vec<AddedToken> = Vec::new();
        if let Some(Json::Object(decoder)) = config.get("added_tokens_decoder") {
            let mut entries: Vec<(u64, &Json)> =
                decoder.iter().map(|(id, tok)| (id.parse::<u64>().unwrap_or(u64::MAX), tok)).collect();
            entries.sort_by_key(|(id, _)| *id);
            for (_, token) in entries {
                if let Some(t) = added_token_from_json(token, false, &config_path, "added_tokens_decoder")? {
                    to_add.push(t);
                }
            }
        }
        let mut special_tokens = Vec::new();
        for (name, value) in &named {
            if let Some(t) = added_token_from_json(value, true, &config_path, name)? {
                special_tokens.push((name.clone(), t.content.clone()));
                to_add.push(t);
            }
        }
        for value in &extra {
            if let Some(t) = added_token_from_json(value, true, &config_path, "extra_special_tokens")? {
                to_add.push(t);
            }
        }
        add_missing(&mut inner, to_add).map_err(|e| bad(&config_path, e))?;

        let (chat_template, no_template) = chat_template_beside(&dir, &config, &config_path)?;
        let id_of = |name: &str| special_tokens.iter().find(|(n, _)| n == name).and_then(|(_, t)| inner.token_to_id(t));
        let bos_id = id_of("bos_token");
        let mut eos_ids: Vec<u32> = id_of("eos_token").into_iter().collect();
        let generation_path = dir.join("generation_config.json");
        if let Some(generation) = read_json_beside(&generation_path)? {
            let ids = match generation.get("eos_token_id") {
                Some(Json::Array(list)) => list.clone(),
                Some(single) => vec![single.clone()],
                None => vec![],
            };
            for id in ids {
                if id.is_null() {
                    continue;
                }
                let id = id
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| bad(&generation_path, format!("eos_token_id: {id} is not a token id")))?;
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let tokenizer = Tokenizer {
            inner,
            bos_id,
            eos_ids,
            special_tokens,
            chat_template,
            no_template,
            source: tokenizer_json.to_path_buf(),
        };
        tokenizer.check_ids(&generation_path)?;
        Ok(tokenizer)
    }

    /// [`Tokenizer::from_file`] on `dir/tokenizer.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        Tokenizer::from_file(&dir.join("tokenizer.json"))
    }

    /// The tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes (see the module docs),
    /// with its chat template from `tokenizer.chat_template`. Errors name the file and the key:
    /// a missing or mistyped key, an id past the token list, a merge that is not two tokens
    /// of the vocabulary, and `Err(Unsupported)` for a tokenizer model other than `gpt2`.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let path = file.path();
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "{}: tokenizer.ggml.model = {model:?}: only \"gpt2\" (byte-level BPE) tokenizers are built from GGUF \
                 metadata; pass a tokenizer.json instead",
                path.display()
            )));
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let token_types = match file.get("tokenizer.ggml.token_type") {
            Some(_) => int_array(file, "tokenizer.ggml.token_type")?,
            None => Vec::new(),
        };
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(bad(
                path,
                format!("tokenizer.ggml.token_type has {} entries for {} tokens", token_types.len(), tokens.len()),
            ));
        }
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let pre = match file.get("tokenizer.ggml.pre") {
            Some(_) => Some(file.get_str("tokenizer.ggml.pre")?),
            None => None,
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            match file.get(key) {
                Some(_) => file.get_bool(key).map(Some),
                None => Ok(None),
            }
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

        let mut inner = byte_level_bpe(tokens, merges, pre).map_err(|e| bad(path, e))?;

        // CONTROL tokens are special; one outside the byte alphabet is a llama.cpp mislabel
        // that transformers skips. USER_DEFINED tokens are plain added tokens.
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|&(t, &ty)| ty == 3 && t.chars().all(in_byte_alphabet))
            .map(|(t, _)| AddedToken::from(t.as_str(), true).normalized(false))
            .collect();
        if !control.is_empty() {
            inner.add_special_tokens(control).map_err(|e| bad(path, e))?;
        }
        let user_defined: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|&(t, &ty)| ty == 4 && inner.token_to_id(t).is_some())
            .map(|(t, _)| AddedToken::from(t.as_str(), false).normalized(false))
            .collect();
        if !user_defined.is_empty() {
            inner.add_tokens(user_defined).map_err(|e| bad(path, e))?;
        }

        let mut special_tokens = Vec::new();
        let mut named_ids = Vec::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = uint(file, key)? {
                let token = usize::try_from(id).ok().and_then(|i| tokens.get(i)).ok_or_else(|| {
                    bad(path, format!("{key} = {id} is past the {} tokens of tokenizer.ggml.tokens", tokens.len()))
                })?;
                special_tokens.push((name.to_string(), token.clone()));
                named_ids.push((name, id as u32));
            }
        }
        // transformers adds the named tokens as special tokens when they are not already, and
        // GPT2Tokenizer's default "<|endoftext|>" with them (only when the vocabulary has it:
        // transformers would append it past the model's vocabulary otherwise).
        let mut named: Vec<AddedToken> =
            special_tokens.iter().map(|(_, t)| AddedToken::from(t.as_str(), true).normalized(false)).collect();
        if inner.token_to_id("<|endoftext|>").is_some() {
            named.insert(0, AddedToken::from("<|endoftext|>", true).normalized(false));
        }
        add_missing(&mut inner, named).map_err(|e| bad(path, e))?;

        let id_of = |name: &str| -> Option<u32> {
            let token = &special_tokens.iter().find(|(n, _)| n == name)?.1;
            inner.token_to_id(token).or_else(|| named_ids.iter().find(|(n, _)| *n == name).map(|(_, id)| *id))
        };
        let bos_id = id_of("bos_token");
        let eos_id = id_of("eos_token");
        let bos = special_tokens.iter().find(|(n, _)| n == "bos_token").map(|(_, t)| t.clone());
        let eos = special_tokens.iter().find(|(n, _)| n == "eos_token").map(|(_, t)| t.clone());
        let post =
            post_processor(add_bos.then_some(bos.zip(bos_id)).flatten(), add_eos.then_some(eos.zip(eos_id)).flatten())
                .map_err(|e| bad(path, e))?;
        if let Some(post) = post {
            inner.with_post_processor(Some(post));
        }
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = uint(file, key)?
                && let Ok(id) = u32::try_from(id)
                && !eos_ids.contains(&id)
            {
                eos_ids.push(id);
            }
        }

        let (chat_template, no_template) = match file.get("tokenizer.chat_template") {
            Some(_) => (Some(ChatTemplate::new(file.get_str("tokenizer.chat_template")?.to_string())), String::new()),
            None => (None, format!("{} has no tokenizer.chat_template", path.display())),
        };
        let tokenizer = Tokenizer {
            inner,
            bos_id,
            eos_ids,
            special_tokens,
            chat_template,
            no_template,
            source: path.to_path_buf(),
        };
        tokenizer.check_ids(path)?;
        Ok(tokenizer)
    }

    /// Every special id inside the vocabulary.
    fn check_ids(&self, file: &Path) -> Result<()> {
        for &id in self.bos_id.iter().chain(&self.eos_ids) {
            if self.inner.id_to_token(id).is_none() {
                return Err(bad(
                    file,
                    format!("special token id {id} is past the vocabulary of {}", self.vocab_size()),
                ));
            }
        }
        Ok(())
    }

    /// The ids of `text`. Added and special tokens written in the text (`<|im_start|>`) stay
    /// whole; `add_special_tokens` adds what the tokenizer adds around a sequence (a BOS, for
    /// tokenizers that add one), as transformers' `tokenizer(text)` does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::InvalidArgument(format!("{}: encoding failed: {e}", self.source.display())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` leaves the special ones out. An id past the
    /// vocabulary is `Err(InvalidArgument)` naming it and its position.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_in_vocab(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::InvalidArgument(format!("{}: decoding failed: {e}", self.source.display())))
    }

    fn check_in_vocab(&self, ids: &[u32]) -> Result<()> {
        if let Some((at, &id)) = ids.iter().enumerate().find(|&(_, &id)| self.inner.id_to_token(id).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "token id {id} (at position {at}) is past the vocabulary of {} ({})",
                self.vocab_size(),
                self.source.display()
            )));
        }
        Ok(())
    }

    /// An incremental decoder for streaming: feed it ids one at a time; it returns the text
    /// each one completes (`None` while a character's bytes are still partial).
    pub fn decoder_stream(&self, skip_special_tokens: bool) -> TokenStream<'_> {
        TokenStream { tokenizer: self, skip_special_tokens, ids: Vec::new(), prefix: String::new(), prefix_index: 0 }
    }

    /// The number of ids, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the BOS token, when the tokenizer names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The ids that end a generation: the EOS token's first, then the others the files name
    /// (GGUF's EOT and EOM tokens, `generation_config.json`'s `eos_token_id` list).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The id of the token spelled `token` (an added token's content, or a vocabulary entry
    /// in the model's own spelling, `Ġ` for a space in byte-level BPE).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The spelling of token `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The chat template's Jinja source.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// The named special tokens chat templates see, as (`"bos_token"`, token) pairs.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// `messages` rendered with the chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`. Errors
    /// (`InvalidArgument`): no template, no messages, a template that does not compile, one
    /// that reads a variable nobody gave (named), or calls `raise_exception` (its message).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| Error::InvalidArgument(self.no_template.clone()))?;
        if messages.is_empty() {
            return Err(Error::InvalidArgument("apply_chat_template: the conversation has no messages".into()));
        }
        template.render(messages, add_generation_prompt, &self.special_tokens)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Adds those of `tokens` the tokenizer does not already hold as added tokens, in one call.
fn add_missing(inner: &mut tokenizers::Tokenizer, tokens: Vec<AddedToken>) -> tokenizers::Result<()> {
    let mut missing: Vec<AddedToken> = Vec::new();
    for t in tokens {
        let held = inner.get_added_vocabulary().get_vocab().contains_key(&t.content);
        if !held && !missing.iter().any(|m| m.content == t.content) {
            missing.push(t);
        }
    }
    let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) = missing.into_iter().partition(|t| t.special);
    if !special.is_empty() {
        inner.add_special_tokens(special)?;
    }
    if !plain.is_empty() {
        inner.add_tokens(plain)?;
    }
    Ok(())
}

/// The transformers' post-processor that adds BOS and/or EOS around a sequence.
fn post_processor(bos: Option<(String, u32)>, eos: Option<(String, u32)>) -> Result<Option<PostProcessorWrapper>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let piece =
        |token: &(String, u32), type_id: u32| serde_json::json!({"SpecialToken": {"id": token.0, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        if let Some(b) = &bos {
            pair.push(piece(b, type_id));
        }
        pair.push(sequence(seq, type_id));
        if let Some(e) = &eos {
            pair.push(piece(e, type_id));
        }
        if type_id == 0 {
            single = pair.clone();
        }
    }
    let mut special = serde_json::Map::new();
    for token in bos.iter().chain(&eos) {
        special.insert(token.0.clone(), serde_json::json!({"id": token.0, "ids": [token.1], "tokens": [token.0]}));
    }
    let json =
        serde_json::json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special});
    serde_json::from_value(json)
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("building the BOS/EOS post-processor: {e}")))
}

// ---------------------------------------------------------------------------------------
// GGUF: byte-level BPE

/// GPT-2's `bytes_to_unicode`: the printable character that spells each byte.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// Whether `c` is one of the 256 characters of GPT-2's byte alphabet.
fn in_byte_alphabet(c: char) -> bool {
    matches!(c as u32, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF | 0x100..=0x143)
}

/// llama.cpp's pre-tokenizer names and the split regexes transformers uses for them
/// (`GGUF_PRE_TOKENIZER_SPLITS`); any other name (`smollm`, `gpt-2`, ...) keeps GPT-2's.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// transformers' `byte_level_tokenizer` + `set_split_regex`: GPT-2's byte-level BPE over
/// `tokens` (re-spelled in the byte alphabet where needed) and `merges`.
fn byte_level_bpe(
    tokens: &[String],
    merges: &[String],
    pre: Option<&str>,
) -> std::result::Result<tokenizers::Tokenizer, String> {
    let spelling = bytes_to_unicode();
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| "more tokens than u32 ids".to_string())?;
        let key = if token.chars().all(in_byte_alphabet) {
            token.clone()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, id); // a later duplicate wins, as in the Python dict
    }
    let mut pairs: Merges = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        let mut parts = merge.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => pairs.push((a.to_string(), b.to_string())),
            _ => {
                return Err(format!("tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens separated by one space"));
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| format!("tokenizer.ggml.tokens / merges do not make a BPE: {e}"))?;
    let mut tokenizer = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
    let pre_tokenizer: PreTokenizerWrapper = match pre.and_then(pre_tokenizer_split) {
        Some(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| format!("the split regex of tokenizer.ggml.pre = {pre:?}: {e}"))?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]))
        }
        None => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(tokenizer)
}

/// An unsigned integer of any GGUF integer type at `key`, `None` when absent.
fn uint(file: &GgufFile, key: &str) -> Result<Option<u64>> {
    let Some(value) = file.get(key) else { return Ok(None) };
    let v: Option<u64> = match *value {
        GgufValue::U8(v) => Some(v.into()),
        GgufValue::U16(v) => Some(v.into()),
        GgufValue::U32(v) => Some(v.into()),
        GgufValue::U64(v) => Some(v),
        GgufValue::I8(v) => u64::try_from(v).ok(),
        GgufValue::I16(v) => u64::try_from(v).ok(),
        GgufValue::I32(v) => u64::try_from(v).ok(),
        GgufValue::I64(v) => u64::try_from(v).ok(),
        _ => None,
    };
    v.map(Some).ok_or_else(|| {
        bad(file.path(), format!("metadata key {key:?} is {}, expected a non-negative integer", value.type_name()))
    })
}

/// An array of integers of any GGUF integer type at `key`.
fn int_array(file: &GgufFile, key: &str) -> Result<Vec<i64>> {
    Ok(match file.get_array(key)? {
        GgufArray::I32(v) => v.iter().map(|&x| x.into()).collect(),
        GgufArray::U32(v) => v.iter().map(|&x| x.into()).collect(),
        GgufArray::I8(v) => v.iter().map(|&x| x.into()).collect(),
        GgufArray::U8(v) => v.iter().map(|&x| x.into()).collect(),
        GgufArray::I16(v) => v.iter().map(|&x| x.into()).collect(),
        GgufArray::U16(v) => v.iter().map(|&x| x.into()).collect(),
        GgufArray::I64(v) => v.clone(),
        other => {
            return Err(bad(
                file.path(),
                format!("metadata key {key:?} is {}, expected an array of integers", other.type_name()),
            ));
        }
    })
}

/// The chat template beside a tokenizer.json: `chat_template.jinja`, else the config's
/// `chat_template` (a string, or a list of `{"name", "template"}` of which "default" is used).
fn chat_template_beside(
    dir: &Path,
    config: &serde_json::Map<String, Json>,
    config_path: &Path,
) -> Result<(Option<ChatTemplate>, String)> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok((Some(ChatTemplate::new(source)), String::new())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&jinja, e)),
    }
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok((
            None,
            format!("no chat template: neither {} nor a chat_template in {}", jinja.display(), config_path.display()),
        )),
        Some(Json::String(source)) => Ok((Some(ChatTemplate::new(source.clone())), String::new())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(source)) => {
                        return Ok((Some(ChatTemplate::new(source.to_string())), String::new()));
                    }
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => {
                        return Err(bad(
                            config_path,
                            "chat_template: each entry of the list needs a \"name\" and a \"template\" string",
                        ));
                    }
                }
            }
            Ok((None, format!("{}: chat_template names {names:?} but no \"default\" template", config_path.display())))
        }
        Some(other) => Err(bad(config_path, format!("chat_template: expected a string or a list, found {other}"))),
    }
}

// ---------------------------------------------------------------------------------------
// Streaming

/// Incremental decoding (tokenizers' `DecodeStream` algorithm): each [`TokenStream::step`]
/// returns the text its id completes, holding back ids whose bytes do not yet make whole
/// characters; [`TokenStream::finish`] returns what is still held back at the end. The
/// pieces concatenate to [`Tokenizer::decode`] of all the ids.
pub struct TokenStream<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// The ids not yet fully emitted, after a few already emitted ones that give context.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl TokenStream<'_> {
    /// Feeds `id`: `Some(text)` it completes, or `None` while it ends inside a character.
    /// An id past the vocabulary is `Err(InvalidArgument)` and leaves the stream unchanged.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_in_vocab(&[id])?;
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special_tokens);
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let prefix = decode(&self.ids)?;
            if !prefix.ends_with('\u{FFFD}') {
                self.prefix = prefix;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = decode(&self.ids)?;
        if text.len() > self.prefix.len() && !text.ends_with('\u{FFFD}') {
            let Some(new_text) = text.strip_prefix(self.prefix.as_str()) else {
                self.ids.pop();
                return Err(Error::InvalidArgument(format!(
                    "decoder stream: the text so far {:?} does not start with the text already emitted {:?}",
                    text, self.prefix
                )));
            };
            let new_text = new_text.to_string();
            let new_prefix_index = self.ids.len() - self.prefix_index;
            self.ids.drain(..self.prefix_index);
            self.prefix = decode(&self.ids)?;
            self.prefix_index = new_prefix_index;
            Ok(Some(new_text))
        } else {
            Ok(None)
        }
    }

    /// The text of the ids still held back (an incomplete character at the end decodes to
    /// U+FFFD, as in [`Tokenizer::decode`]); the stream starts afresh after it.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let rest = text.strip_prefix(self.prefix.as_str()).unwrap_or(&text).to_string();
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok((!rest.is_empty()).then_some(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let table = bytes_to_unicode();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        let mut chars: Vec<char> = table.to_vec();
        chars.sort();
        chars.dedup();
        assert_eq!(chars.len(), 256);
        assert!(chars.iter().all(|&c| in_byte_alphabet(c)));
        assert_eq!((0..0x200u32).filter_map(char::from_u32).filter(|&c| in_byte_alphabet(c)).count(), 256);
    }
}
