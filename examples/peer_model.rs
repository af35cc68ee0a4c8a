//! kiln's side of the Llama peer comparison (`examples/peer_llama_cpp.py` runs it next to
//! llama.cpp): SmolLM2-135M-Instruct Q4_1 on the CPU, the workload of `benches/model.rs`.
//!
//! `cargo run --release --example peer_model [-- --json]`. Prints tokens/s of
//! - prefill: a 512-token prompt into an empty cache (last logits);
//! - decode at batch 1 and 8: 32 steps, one token per sequence per step, after 128 prefilled
//!   positions per sequence (every sequence's logits each step);
//! - the batch-8 decode with rank-16 adapters on all seven projections: 8 sequences on 8
//!   different adapters, and on one adapter.
//!
//! After a warm-up, prefill is the best of `RUNS` runs (on a shared machine the fastest run
//! is the one least disturbed by other work) and decode is timed step by step over `RUNS`
//! runs of 32 steps, taking the median step (robust to the other processes' bursts, which
//! stall single steps for up to seconds). The cache is rewound between runs.

#[path = "../benches/common/llama.rs"]
mod workload;

use kiln::Device;
use kiln::model::{Llama, Logits, Sequence};
use std::time::Instant;
use workload::{DECODE_CONTEXT, PROMPT_LEN};

const RUNS: usize = 5;
const DECODE_STEPS: usize = 32;

/// The fastest of `RUNS` runs of `f` after one untimed run, in seconds.
fn best(mut f: impl FnMut() -> kiln::Result<()>) -> kiln::Result<f64> {
    f()?;
    let mut fastest = f64::INFINITY;
    for _ in 0..RUNS {
        let t = Instant::now();
        f()?;
        fastest = fastest.min(t.elapsed().as_secs_f64());
    }
    Ok(fastest)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn prefill_tokens_per_s(model: &Llama) -> kiln::Result<f64> {
    let prompt = workload::token_ids(0, PROMPT_LEN);
    let mut state = model.new_state(1, PROMPT_LEN)?;
    let secs = best(|| {
        state.truncate(0, 0)?;
        model.forward(&[Sequence::new(&prompt)], Some(&mut state), Logits::Last).map(drop)
    })?;
    Ok(PROMPT_LEN as f64 / secs)
}

fn decode_tokens_per_s(model: &Llama, adapters: &[Option<&str>]) -> kiln::Result<f64> {
    let mut state = workload::prefilled(model, adapters, DECODE_STEPS)?;
    let mut steps = Vec::with_capacity(RUNS * DECODE_STEPS);
    for run in 0..=RUNS {
        workload::rewind(&mut state)?;
        for step in 0..DECODE_STEPS {
            let t = Instant::now();
            workload::decode_step(model, &mut state, adapters, step)?;
            // Run 0 is the warm-up.
            if run > 0 {
                steps.push(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(adapters.len() as f64 / median(steps))
}

fn main() -> kiln::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let Some(mut model) = workload::load_default(&Device::Cpu) else { std::process::exit(2) };
    let threads = rayon::current_num_threads();
    let prefill = prefill_tokens_per_s(&model)?;
    let decode1 = decode_tokens_per_s(&model, &[None])?;
    let decode8 = decode_tokens_per_s(&model, &[None; 8])?;
    let names = workload::load_random_adapters(&mut model, 8)?;
    let one = decode_tokens_per_s(&model, &[Some(names[0].as_str()); 8])?;
    let eight: Vec<Option<&str>> = names.iter().map(|n| Some(n.as_str())).collect();
    let eight = decode_tokens_per_s(&model, &eight)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "threads": threads, "prompt_len": PROMPT_LEN, "decode_context": DECODE_CONTEXT,
                "decode_steps": DECODE_STEPS, "runs": RUNS,
                "prefill": prefill, "decode_b1": decode1, "decode_b8": decode8,
                "decode_b8_one_adapter": one, "decode_b8_eight_adapters": eight,
            })
        );
    } else {
        println!(
            "kiln, SmolLM2-135M Q4_1 on the CPU, {threads} threads (prefill: best of {RUNS}; decode: median step)"
        );
        println!("prefill {PROMPT_LEN} tokens:         {prefill:8.1} tokens/s");
        println!("decode batch 1 (ctx {DECODE_CONTEXT}, {DECODE_STEPS} steps): {decode1:8.1} tokens/s");
        println!("decode batch 8 (ctx {DECODE_CONTEXT}, {DECODE_STEPS} steps): {decode8:8.1} tokens/s");
        println!("decode batch 8, one adapter:    {one:8.1} tokens/s");
        println!("decode batch 8, eight adapters: {eight:8.1} tokens/s ({:.2}x one adapter)", eight / one);
    }
    Ok(())
}
