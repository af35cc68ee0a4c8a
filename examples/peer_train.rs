//! kiln's side of the training-step peer comparison (`examples/peer_train.py` runs it next to
//! PyTorch + PEFT): one LoRA training step on SmolLM2-135M-Instruct (the cached default GGUF,
//! its Q4_1 weights kept quantized), rank 16 on all seven projections of every layer, a batch
//! of 4 sequences of 256 tokens, on the CPU.
//!
//! `cargo run --release --example peer_train -- [--dtype f32|bf16] [--checkpointing] [--steps N]`
//! prints one JSON line: tokens/s (the median of N timed steps after one untimed step), the
//! loss, and the process's peak resident memory (VmHWM), so each configuration runs in a
//! process of its own.

#[path = "../benches/common/llama.rs"]
#[allow(dead_code)]
mod workload;

use kiln::model::{StepOptions, TrainSequence, Trainable};
use kiln::{DType, Device};
use std::time::Instant;

const BATCH: usize = 4;
const SEQ_LEN: usize = 256;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn main() -> kiln::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let dtype = match flag("--dtype").as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some(other) => {
            eprintln!("--dtype takes f32 or bf16, not {other}");
            std::process::exit(2);
        }
    };
    let checkpointing = args.iter().any(|a| a == "--checkpointing");
    let steps: usize = flag("--steps").and_then(|s| s.parse().ok()).unwrap_or(3);

    let device = Device::Cpu;
    let Some(path) = kiln::model::cached_default_model() else {
        eprintln!("{} is not cached: run the generate example once", kiln::model::DEFAULT_MODEL_FILE);
        std::process::exit(1);
    };
    let model = kiln::model::Llama::load(&path, &kiln::model::LoadOptions::new(&device).dtype(dtype))?;
    let adapter = workload::random_adapter(&model, 1)?;
    let batch: Vec<TrainSequence> =
        (0..BATCH).map(|s| TrainSequence::causal(&workload::token_ids(s, SEQ_LEN))).collect();
    let options = StepOptions::default().checkpointing(checkpointing);
    let mut times = Vec::new();
    let mut loss = f32::NAN;
    for step in 0..=steps {
        let t = Instant::now();
        let out = model.train_step(&batch, Trainable::Lora(&adapter), &options)?;
        let secs = t.elapsed().as_secs_f64();
        eprintln!("step {step}: {secs:.3} s, peak RSS {:.0} MiB", peak_rss_mib());
        if step > 0 {
            times.push(secs);
        }
        loss = out.loss;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"peer\": \"kiln\", \"dtype\": \"{}\", \"checkpointing\": {checkpointing}, \"tokens_per_s\": {:.1}, \
         \"step_s\": {median:.3}, \"loss\": {loss:.4}, \"peak_rss_mib\": {:.0}, \"threads\": {}}}",
        if dtype == DType::F32 { "f32" } else { "bf16" },
        (BATCH * SEQ_LEN) as f64 / median,
        peak_rss_mib(),
        rayon::current_num_threads()
    );
    Ok(())
}
