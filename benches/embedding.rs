//! Token embeddings on every device in `Device::all()`, in bytes moved per second:
//! - `embedding/<device>/gather_<dtype>`: rows of a dense table gathered by id (rows read +
//!   written);
//! - `embedding/<device>/qgather_<format>_bf16`: rows of a quantized table decoded to bf16
//!   (blocks read + bf16 written);
//! - `embedding/<device>/backward_bf16`: the deterministic scatter-add of a bf16 gradient
//!   into the f32 table gradient (dy read + gradient written);
//! - `embedding/<device>/copy`: a device-to-device copy of the dense bf16 output, the
//!   memory system's own figure (bytes read + written, as STREAM counts them).
//!
//! Every GPU call includes copying the ids to the host, where they are checked. Sizes:
//! SmolLM2's table (49152 × 576) and 4096 tokens on the CPU and GPUs; 4096 × 576 and 256
//! tokens on software adapters. `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::{QTensor, QuantFormat, embedding, embedding_backward, qembedding};
use kiln::{DType, Device, DeviceKind, Tensor};

fn ids(tokens: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..tokens)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn bench_embedding(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (vocab, dim, tokens) = match info.kind {
            DeviceKind::SoftwareAdapter => (4096, 576, 256),
            _ => (49152, 576, 4096),
        };
        let shape = format!("{vocab}x{dim}/t{tokens}");
        let id_tensor = Tensor::from_slice(&ids(tokens, vocab), &[tokens], &device).expect("ids");
        let table = Tensor::randn(&[vocab, dim], 0.0, 0.05, 1, DType::F32, &Device::Cpu).expect("table");
        let mut group = c.benchmark_group(format!("embedding/{device}"));
        common::configure(&mut group, 3);
        for dtype in [DType::F32, DType::BF16] {
            let t = table.to_dtype(dtype).and_then(|t| t.to_device(&device)).expect("dense table");
            group.throughput(Throughput::Bytes((2 * tokens * dim * dtype.size_in_bytes()) as u64));
            group.bench_function(BenchmarkId::new(format!("gather_{dtype}"), &shape), |b| {
                b.iter(|| {
                    let y = embedding(&t, &id_tensor).expect("embedding");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QTensor::quantize(&table, format).and_then(|q| q.to_device(&device)).expect("quantized table");
            let row_bytes = q.size_in_bytes() / vocab;
            group.throughput(Throughput::Bytes((tokens * (row_bytes + 2 * dim)) as u64));
            group.bench_function(BenchmarkId::new(format!("qgather_{format}_bf16"), &shape), |b| {
                b.iter(|| {
                    let y = qembedding(&q, &id_tensor, DType::BF16).expect("qembedding");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        let dy = Tensor::randn(&[tokens, dim], 0.0, 1.0, 2, DType::BF16, &device).expect("dy");
        group.throughput(Throughput::Bytes((tokens * dim * 2 + vocab * dim * 4) as u64));
        group.bench_function(BenchmarkId::new("backward_bf16", &shape), |b| {
            b.iter(|| {
                let g = embedding_backward(&dy, &id_tensor, vocab).expect("embedding_backward");
                device.synchronize().expect("sync");
                g
            })
        });
        let out = Tensor::zeros(&[tokens, dim], DType::BF16, &device).expect("output");
        group.throughput(Throughput::Bytes(2 * out.size_in_bytes() as u64));
        group.bench_function(BenchmarkId::new("copy", &shape), |b| {
            b.iter(|| {
                let y = out.copy().expect("copy");
                device.synchronize().expect("sync");
                y
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_embedding);
criterion_main!(benches);
