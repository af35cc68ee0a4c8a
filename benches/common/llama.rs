//! The Llama workload shared by `benches/model.rs` and `examples/peer_model.rs` (and, by its
//! formula, `examples/peer_llama_cpp.py`): SmolLM2-135M-Instruct from the cached default GGUF,
//! fixed token ids, and random rank-16 adapters on all seven projections of every layer.

use kiln::model::{KvState, Llama, LoadOptions, Logits, LoraAdapter, LoraConfig, LoraLayer, Sequence};
use kiln::{DType, Device, Result, Tensor};
use std::collections::BTreeMap;

/// The prompt whose prefill is measured.
pub const PROMPT_LEN: usize = 512;
/// Positions each sequence holds before the measured decode steps.
pub const DECODE_CONTEXT: usize = 128;
/// Rank of the random adapters.
pub const ADAPTER_RANK: usize = 16;

/// `len` token ids of sequence `seq`: `1000 + (7919·i + 104729·seq) mod 40000`, ordinary
/// tokens of SmolLM2's vocabulary (none special). The Python peer uses the same formula.
pub fn token_ids(seq: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| token_id(seq, i)).collect()
}

/// Token `i` of sequence `seq` (see [`token_ids`]).
pub fn token_id(seq: usize, i: usize) -> u32 {
    1000 + ((7919 * i + 104729 * seq) % 40000) as u32
}

/// The default model on `device`, or `None` (saying why on stderr) when it is not cached:
/// the bench never downloads. `cargo run --release --example generate -- --prompt hi` fetches
/// it once.
pub fn load_default(device: &Device) -> Option<Llama> {
    let Some(path) = kiln::model::cached_default_model() else {
        eprintln!(
            "skipping the Llama model: {} is not cached (run `cargo run --release --example generate -- --prompt hi` \
             once to fetch it)",
            kiln::model::DEFAULT_MODEL_FILE
        );
        return None;
    };
    match Llama::load(&path, &LoadOptions::new(device)) {
        Ok(model) => Some(model),
        Err(e) => {
            eprintln!("skipping the Llama model on {device}: loading {} failed: {e}", path.display());
            None
        }
    }
}

/// A rank-16 adapter on q, k, v, o, gate, up and down of every layer, with small random
/// values (A and B ~ N(0, 0.02²), alpha 32), seeded by `seed`.
pub fn random_adapter(model: &Llama, seed: u64) -> Result<LoraAdapter> {
    let r = ADAPTER_RANK;
    let device = model.device();
    let mut layers = BTreeMap::new();
    for (i, (module, linear)) in model.projections().into_iter().enumerate() {
        let [out, inp] = linear.weight.shape();
        let base = seed * 1_000_000 + 2 * i as u64;
        let a = Tensor::randn(&[r, inp], 0.0, 0.02, base, DType::F32, device)?;
        let b = Tensor::randn(&[out, r], 0.0, 0.02, base + 1, DType::F32, device)?;
        layers.insert(module, LoraLayer { a, b });
    }
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    Ok(LoraAdapter { config: LoraConfig::new(r, 2.0 * r as f32, &targets), layers })
}

/// Loads `count` random adapters named `a0`, `a1`, ….
pub fn load_random_adapters(model: &mut Llama, count: usize) -> Result<Vec<String>> {
    (0..count)
        .map(|i| {
            let name = format!("a{i}");
            let adapter = random_adapter(model, 1 + i as u64)?;
            model.load_adapter(&name, adapter)?;
            Ok(name)
        })
        .collect()
}

/// A state for `adapters.len()` sequences, each prefilled with its own `DECODE_CONTEXT`
/// tokens and run with `adapters[i]`, with room for `steps` more tokens.
pub fn prefilled(model: &Llama, adapters: &[Option<&str>], steps: usize) -> Result<KvState> {
    let prompts: Vec<Vec<u32>> = (0..adapters.len()).map(|i| token_ids(i, DECODE_CONTEXT)).collect();
    let batch: Vec<Sequence<'_>> =
        prompts.iter().zip(adapters).map(|(p, &a)| Sequence::new(p).with_adapter(a)).collect();
    let mut state = model.new_state(adapters.len(), DECODE_CONTEXT + steps)?;
    model.forward(&batch, Some(&mut state), Logits::Last)?;
    Ok(state)
}

/// Decode step `step` (0-based) after [`prefilled`]: one token per sequence, the next of its
/// id sequence, logits of every sequence.
pub fn decode_step(model: &Llama, state: &mut KvState, adapters: &[Option<&str>], step: usize) -> Result<Tensor> {
    let next: Vec<[u32; 1]> = (0..adapters.len()).map(|i| [token_id(i, DECODE_CONTEXT + step)]).collect();
    let batch: Vec<Sequence<'_>> = next.iter().zip(adapters).map(|(t, &a)| Sequence::new(t).with_adapter(a)).collect();
    model.forward(&batch, Some(state), Logits::Last)
}

/// Drops every sequence back to its `DECODE_CONTEXT` prefilled positions.
pub fn rewind(state: &mut KvState) -> Result<()> {
    (0..state.batch()).try_for_each(|b| state.truncate(b, DECODE_CONTEXT))
}
