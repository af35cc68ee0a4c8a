//! Token selection on every device in `Device::all()`, at SmolLM2's vocabulary (49152):
//! `sampling/<device>`: argmax, and sample with temperature alone, with top-k 50 and with
//! top-p 0.9 (top-k and top-p together as generation uses them), in bytes of logits per
//! second (the row counted once; the filters read it again per bisection step). Rows per
//! second are rows / time.
//!
//! Rows: 1 (one sequence decoding) and 64 (a batch); 4 rows of 4096 on software adapters.
//! `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::{SamplingParams, argmax, sample};
use kiln::{DType, Device, DeviceKind, Tensor};

fn bench_sampling(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (vocab, row_counts) = match info.kind {
            DeviceKind::SoftwareAdapter => (4096, vec![4]),
            _ => (49152, vec![1, 64]),
        };
        let mut group = c.benchmark_group(format!("sampling/{device}"));
        common::configure(&mut group, 3);
        let settings = [
            ("temperature", SamplingParams { temperature: 0.8, ..Default::default() }),
            ("top_k50", SamplingParams { temperature: 0.8, top_k: 50, ..Default::default() }),
            ("top_p0.9", SamplingParams { temperature: 0.8, top_p: 0.9, ..Default::default() }),
            ("top_k50_top_p0.9", SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.9, seed: 1 }),
        ];
        for rows in row_counts {
            for dtype in [DType::F32, DType::BF16] {
                let x = Tensor::randn(&[rows, vocab], 0.0, 3.0, 1, dtype, &device).expect("logits");
                let id = format!("{rows}x{vocab}/{dtype}");
                group.throughput(Throughput::Bytes(x.size_in_bytes() as u64));
                group.bench_function(BenchmarkId::new("argmax", &id), |b| {
                    b.iter(|| {
                        let y = argmax(&x).expect("argmax");
                        device.synchronize().expect("sync");
                        y
                    })
                });
                for (name, params) in &settings {
                    let mut step = 0u64;
                    group.bench_function(BenchmarkId::new(*name, &id), |b| {
                        b.iter(|| {
                            step += 1;
                            let y = sample(&x, params, step).expect("sample");
                            device.synchronize().expect("sync");
                            y
                        })
                    });
                }
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_sampling);
criterion_main!(benches);
