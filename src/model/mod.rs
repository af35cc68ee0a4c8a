//! The model side: a Llama-style transformer (config, weights from safetensors or GGUF,
//! forward, generation), and adapters as PEFT writes them.

mod adapter;
mod config;
mod fetch;
mod generate;
mod llama;
mod weights;

pub use adapter::{LoraAdapter, LoraConfig, LoraLayer};
pub use config::LlamaConfig;
pub use fetch::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, cache_dir, cached_default_model, default_model};
pub use generate::{FinishReason, Flow, Generated, GenerationConfig, Prompt};
pub use llama::{KvState, Llama, Logits, Sequence};
pub use weights::{LayerWeights, Linear, LoadOptions, ModelWeights, PROJECTIONS, Weight, unpermute_order};
