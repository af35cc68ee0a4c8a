//! The training step end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, the cached default model;
//! skipped with a printed reason when it is not cached), LoRA rank 16 on all seven
//! projections of every layer, tokens/s via criterion's elem/s:
//! - `train_step/<device>`: forward, fused loss head and backward over a batch of 4
//!   sequences of 256 tokens (the workload of `examples/peer_train.rs`), f32 and bf16
//!   activations, and f32 with activation checkpointing.
//!
//! Runs on the CPU and on GPUs (CUDA, wgpu hardware adapters); software wgpu adapters are
//! skipped (minutes per step). `examples/peer_train.py` runs PyTorch + PEFT on the same
//! workload and reports the ratios and peak memory. `KILN_BENCH_QUICK=1` shortens runs.

mod common;
#[path = "common/llama.rs"]
#[allow(dead_code)]
mod workload;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::model::{Llama, LoadOptions, StepOptions, TrainSequence, Trainable};
use kiln::{DType, Device, DeviceKind};

const BATCH: usize = 4;
const SEQ_LEN: usize = 256;

fn bench_train(c: &mut Criterion) {
    let Some(path) = kiln::model::cached_default_model() else {
        eprintln!("skipping the training step: {} is not cached", kiln::model::DEFAULT_MODEL_FILE);
        return;
    };
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        if info.kind == DeviceKind::SoftwareAdapter {
            eprintln!("skipping the training step on {device}: a software adapter is far too slow for SmolLM2");
            continue;
        }
        let mut group = c.benchmark_group(format!("train_step/{device}"));
        common::configure(&mut group, 60);
        group.throughput(Throughput::Elements((BATCH * SEQ_LEN) as u64));
        let batch: Vec<TrainSequence> =
            (0..BATCH).map(|s| TrainSequence::causal(&workload::token_ids(s, SEQ_LEN))).collect();
        for (label, dtype, checkpointing) in
            [("f32", DType::F32, false), ("bf16", DType::BF16, false), ("f32_checkpointing", DType::F32, true)]
        {
            let model = match Llama::load(&path, &LoadOptions::new(&device).dtype(dtype)) {
                Ok(model) => model,
                Err(e) => {
                    eprintln!("skipping the training step on {device}: {e}");
                    continue;
                }
            };
            let adapter = workload::random_adapter(&model, 1).expect("adapter");
            let options = StepOptions::default().checkpointing(checkpointing);
            group.bench_function(
                BenchmarkId::new("smollm2_q4_1_lora_r16", format!("{label}/b{BATCH}x{SEQ_LEN}")),
                |b| {
                    b.iter(|| {
                        let out = model.train_step(&batch, Trainable::Lora(&adapter), &options).expect("step");
                        device.synchronize().expect("sync");
                        out.loss
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench_train);
criterion_main!(benches);
