//! LoRA on every device in `Device::all()`, FLOP/s of the base product (criterion's elem/s):
//! - `lora_layer/<device>`: the base product x·Wᵀ alone, the fused `lora_forward`
//!   (`fused_r*`) and the unfused sequence peers run (`unfused_r*`: base product, shrink,
//!   expand, scale and add, each a kernel writing its result) at ranks 8, 16 and 64;
//! - `lora_batched/<device>`: 32 rows served with 1, 8 and 32 distinct adapters (rank 16).
//!
//! Sizes follow the device: 4096×4096 and 512 tokens on GPUs, 1024×1024 and 128 tokens on
//! the CPU, 128×128 and 16 tokens on software adapters. `KILN_BENCH_QUICK=1` shortens runs.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::lora::{AdapterSet, BaseWeight, LoraLinear, lora_batched, lora_forward};
use kiln::ops::{MatmulOptions, add, matmul_with, scale};
use kiln::{DType, Device, DeviceKind, Tensor};

fn bench_lora(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (dim, tokens) = match info.kind {
            DeviceKind::Cpu => (1024, 128),
            DeviceKind::SoftwareAdapter => (128, 16),
            _ => (4096, 512),
        };
        let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
        let x = Tensor::randn(&[tokens, dim], 0.0, 1.0, 1, dtype, &device).expect("x");
        let w = Tensor::randn(&[dim, dim], 0.0, 0.02, 2, dtype, &device).expect("w");
        let mut group = c.benchmark_group(format!("lora_layer/{device}"));
        common::configure(&mut group, 3);
        group.throughput(Throughput::Elements(2 * (tokens * dim * dim) as u64));
        let shape = format!("{dim}x{dim}/t{tokens}");
        group.bench_function(BenchmarkId::new("base", &shape), |b| {
            b.iter(|| {
                let y = matmul_with(&x, &w, MatmulOptions::nt()).expect("matmul");
                device.synchronize().expect("sync");
                y
            })
        });
        for r in [8, 16, 64] {
            let a = Tensor::randn(&[r, dim], 0.0, 0.02, 3, dtype, &device).expect("a");
            let bm = Tensor::randn(&[dim, r], 0.0, 0.02, 4, dtype, &device).expect("b");
            let layer =
                LoraLinear { base: BaseWeight::Dense(&w), bias: None, a: &a, b: &bm, scale: 2.0, dropout: None };
            group.bench_function(BenchmarkId::new(format!("fused_r{r}"), &shape), |b| {
                b.iter(|| {
                    let y = lora_forward(&x, &layer).expect("lora");
                    device.synchronize().expect("sync");
                    y
                })
            });
            let f32_out = MatmulOptions::nt().out_dtype(DType::F32);
            let b32 = bm.to_dtype(DType::F32).expect("b f32");
            group.bench_function(BenchmarkId::new(format!("unfused_r{r}"), &shape), |b| {
                b.iter(|| {
                    let base = matmul_with(&x, &w, f32_out).expect("base");
                    let xa = matmul_with(&x, &a, f32_out).expect("shrink");
                    let delta = matmul_with(&xa, &b32, MatmulOptions::nt()).expect("expand");
                    let y = add(&base, &scale(&delta, 2.0).expect("scale")).expect("add").to_dtype(dtype).expect("y");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group(format!("lora_batched/{device}"));
        common::configure(&mut group, 3);
        let rows = 32;
        let xb = Tensor::randn(&[rows, dim], 0.0, 1.0, 5, DType::F32, &device).expect("x");
        let yb = Tensor::zeros(&[rows, dim], DType::F32, &device).expect("y");
        group.throughput(Throughput::Elements(2 * (rows * 2 * 16 * dim) as u64));
        for distinct in [1usize, 8, 32] {
            let adapters: Vec<(Tensor, Tensor, f32)> = (0..distinct)
                .map(|i| {
                    (
                        Tensor::randn(&[16, dim], 0.0, 0.02, 10 + i as u64, DType::F32, &device).expect("a"),
                        Tensor::randn(&[dim, 16], 0.0, 0.02, 50 + i as u64, DType::F32, &device).expect("b"),
                        1.0,
                    )
                })
                .collect();
            let refs: Vec<(&Tensor, &Tensor, f32)> = adapters.iter().map(|(a, b, s)| (a, b, *s)).collect();
            let set = AdapterSet::new(&refs).expect("set");
            let index: Vec<i32> = (0..rows).map(|t| (t % distinct) as i32).collect();
            group.bench_function(BenchmarkId::new(format!("adapters{distinct}"), format!("{dim}/r16")), |b| {
                b.iter(|| {
                    let y = lora_batched(&xb, &yb, &set, &index).expect("batched");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_lora);
criterion_main!(benches);
