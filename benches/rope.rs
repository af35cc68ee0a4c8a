//! Rotary embeddings on every device in `Device::all()`, in bytes read and written per
//! second (x read, the result written, one u32 position per token), beside a copy of the
//! same tensor (its bytes read + written, as STREAM counts them) in the same group:
//! - `rope/<device>`: forward at SmolLM2's shape (9 heads × 64, θ 10⁵) and Llama 3.1 8B's
//!   (32 × 128, llama3 scaling), HalfSplit and Interleaved, bf16 and f32, 512 tokens
//!   (64 on software adapters); the backward at the larger shape.
//!
//! `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::rope::{RopeConfig, RopeScaling, rope, rope_backward};
use kiln::{DType, Device, DeviceKind, Tensor};
use rayon::prelude::*;

fn bench_rope(c: &mut Criterion) {
    let llama31 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let seq = if info.kind == DeviceKind::SoftwareAdapter { 64 } else { 512 };
        let mut group = c.benchmark_group(format!("rope/{device}"));
        common::configure(&mut group, 2);
        let shapes = [
            ("9x64", 9, 64, RopeConfig::new(100000.0)),
            ("32x128", 32, 128, RopeConfig::new(500000.0).with_scaling(llama31)),
        ];
        for (name, heads, head_dim, cfg) in shapes {
            let shape = [1, seq, heads, head_dim];
            let pos: Vec<u32> = (0..seq as u32).collect();
            let positions = Tensor::from_slice(&pos, &[1, seq], &device).expect("positions");
            for dtype in [DType::BF16, DType::F32] {
                let x = Tensor::randn(&shape, 0.0, 1.0, 1, dtype, &device).expect("x");
                let id = format!("b1_s{seq}_{name}_{dtype}");
                group.throughput(Throughput::Bytes((2 * x.size_in_bytes() + 4 * seq) as u64));
                let layouts = [("half_split", cfg), ("interleaved", cfg.interleaved())];
                for (layout, cfg) in layouts {
                    group.bench_function(BenchmarkId::new(format!("rope_{layout}"), &id), |b| {
                        b.iter(|| {
                            let y = rope(&x, &positions, &cfg).expect("rope");
                            device.synchronize().expect("sync");
                            y
                        })
                    });
                }
                if heads == 32 {
                    group.bench_function(BenchmarkId::new("rope_backward_half_split", &id), |b| {
                        b.iter(|| {
                            let y = rope_backward(&x, &positions, &cfg).expect("rope_backward");
                            device.synchronize().expect("sync");
                            y
                        })
                    });
                }
                group.throughput(Throughput::Bytes(2 * x.size_in_bytes() as u64));
                if device.is_cpu() {
                    // Into memory already touched, on every thread, as the op writes.
                    let src = vec![1u8; x.size_in_bytes()];
                    let mut dst = vec![0u8; x.size_in_bytes()];
                    group.bench_function(BenchmarkId::new("copy", &id), |b| {
                        b.iter(|| {
                            dst.par_chunks_mut(1 << 14)
                                .zip(src.par_chunks(1 << 14))
                                .for_each(|(d, s)| d.copy_from_slice(s))
                        })
                    });
                } else {
                    group.bench_function(BenchmarkId::new("copy", &id), |b| {
                        b.iter(|| {
                            let y = x.copy().expect("copy");
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

criterion_group!(benches, bench_rope);
criterion_main!(benches);
