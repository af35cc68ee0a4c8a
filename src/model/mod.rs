//! The model side: adapters as PEFT writes them.

mod adapter;

pub use adapter::{LoraAdapter, LoraConfig, LoraLayer};
