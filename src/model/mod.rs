//! The model side: a Llama-style transformer (config, weights from safetensors or GGUF,
//! forward, generation), its tokenizer and chat template, adapters as PEFT writes them, and
//! GGUF export with an adapter merged.

mod adapter;
mod chat;
mod config;
mod export;
mod fetch;
mod generate;
mod llama;
mod tokenizer;
mod train;
mod weights;

pub use adapter::{LoraAdapter, LoraConfig, LoraLayer};
pub use chat::ChatMessage;
pub use config::LlamaConfig;
pub use export::export_gguf;
pub use fetch::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, cache_dir, cached_default_model, default_model};
pub use generate::{FinishReason, Flow, Generated, GenerationConfig, Prompt, StopStrings};
pub use llama::{KvState, Llama, Logits, Sequence};
pub use tokenizer::{TokenStream, Tokenizer};
pub use train::{StepOptions, StepOutput, TrainSequence, Trainable, lora_tensor_names};
pub use weights::{LayerWeights, Linear, LoadOptions, ModelWeights, PROJECTIONS, Weight, unpermute_order};
