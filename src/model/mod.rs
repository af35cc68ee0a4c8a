//! The model side: a Llama-style transformer, its tokenizer and chat template, and adapters
//! as PEFT writes them.

mod adapter;
mod chat;
mod fetch;
mod tokenizer;

pub use adapter::{LoraAdapter, LoraConfig, LoraLayer};
pub use chat::ChatMessage;
pub use fetch::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, cache_dir, cached_default_model, default_model};
pub use tokenizer::{TokenStream, Tokenizer};
