//! The Llama model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, the cached default model;
//! skipped with a printed reason when it is not cached), tokens/s via criterion's elem/s:
//! - `llama_prefill/<device>`: a 512-token prompt into an empty KV cache, last logits;
//! - `llama_decode/<device>`: one decode step at batch 1 and batch 8 against 128 cached
//!   positions per sequence (the cache is rewound after each step, so every step is alike);
//! - `llama_adapters/<device>`: the batch-8 step with rank-16 adapters on all seven projections,
//!   8 sequences on 8 different adapters against the same 8 sequences on one adapter.
//!
//! Runs on the CPU and on GPUs (CUDA, wgpu hardware adapters). Software wgpu adapters
//! (lavapipe) are skipped: a 512-token SmolLM2 prefill takes minutes there, and it measures
//! nothing a GPU would. `examples/peer_llama_cpp.py` runs llama.cpp on the same file and
//! workload. `KILN_BENCH_QUICK=1` shortens runs.

mod common;
#[path = "common/llama.rs"]
mod workload;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::model::{Logits, Sequence};
use kiln::{Device, DeviceKind};
use workload::{DECODE_CONTEXT, PROMPT_LEN};

fn bench_model(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        if info.kind == DeviceKind::SoftwareAdapter {
            eprintln!("skipping the Llama model on {device}: a software adapter is far too slow for SmolLM2");
            continue;
        }
        let Some(mut model) = workload::load_default(&device) else { continue };

        let mut group = c.benchmark_group(format!("llama_prefill/{device}"));
        common::configure(&mut group, 20);
        let prompt = workload::token_ids(0, PROMPT_LEN);
        let mut state = model.new_state(1, PROMPT_LEN).expect("state");
        group.throughput(Throughput::Elements(PROMPT_LEN as u64));
        group.bench_function(BenchmarkId::new("smollm2_q4_1", format!("t{PROMPT_LEN}")), |b| {
            b.iter(|| {
                state.truncate(0, 0).expect("rewind");
                let logits = model.forward(&[Sequence::new(&prompt)], Some(&mut state), Logits::Last).expect("prefill");
                device.synchronize().expect("sync");
                logits
            })
        });
        group.finish();

        let mut group = c.benchmark_group(format!("llama_decode/{device}"));
        common::configure(&mut group, 5);
        for batch in [1usize, 8] {
            let adapters = vec![None; batch];
            let mut state = workload::prefilled(&model, &adapters, 1).expect("prefill");
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(format!("b{batch}"), format!("ctx{DECODE_CONTEXT}")), |b| {
                b.iter(|| {
                    let logits = workload::decode_step(&model, &mut state, &adapters, 0).expect("decode");
                    device.synchronize().expect("sync");
                    workload::rewind(&mut state).expect("rewind");
                    logits
                })
            });
        }
        group.finish();

        let names = workload::load_random_adapters(&mut model, 8).expect("adapters");
        let mut group = c.benchmark_group(format!("llama_adapters/{device}"));
        common::configure(&mut group, 5);
        group.throughput(Throughput::Elements(8));
        let one: Vec<Option<&str>> = vec![Some(names[0].as_str()); 8];
        let eight: Vec<Option<&str>> = names.iter().map(|n| Some(n.as_str())).collect();
        for (label, adapters) in [("one_adapter", &one), ("eight_adapters", &eight)] {
            let mut state = workload::prefilled(&model, adapters, 1).expect("prefill");
            group.bench_function(BenchmarkId::new(label, format!("b8/r{}", workload::ADAPTER_RANK)), |b| {
                b.iter(|| {
                    let logits = workload::decode_step(&model, &mut state, adapters, 0).expect("decode");
                    device.synchronize().expect("sync");
                    workload::rewind(&mut state).expect("rewind");
                    logits
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_model);
criterion_main!(benches);
