//! Quantized products on every device in `Device::all()`:
//! - `quant_gemv/<device>`: y = x·Wᵀ for one token, in bytes of W read per second, beside
//!   the f16 dense product of the same shape (its W bytes) and a device-to-device copy
//!   (bytes read + written, as STREAM counts them). On the CPU also `<format>_int8x`, the
//!   product with 8-bit activations (`QMatmulOptions::int8_activations`).
//! - `quant_gemm/<device>`: 16 and 64 token rows (512 on GPUs), in FLOP/s (criterion's
//!   elem/s column), beside the f16 dense product of the same shape.
//!
//! Sizes follow the device: 8192×8192 on GPUs and the CPU, small on software
//! adapters. `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::{MatmulOptions, QMatmulOptions, QTensor, QuantFormat, matmul_with, qmatmul, qmatmul_with};
use kiln::{DType, Device, DeviceKind, Tensor};
use rayon::prelude::*;

fn bench_quant(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (rows, cols, token_counts) = match info.kind {
            DeviceKind::Cpu => (8192, 8192, vec![16, 64]),
            DeviceKind::SoftwareAdapter => (256, 512, vec![16]),
            _ => (8192, 8192, vec![16, 64, 512]),
        };
        let shape = format!("{rows}x{cols}");
        let w = Tensor::randn(&[rows, cols], 0.0, 0.02, 1, DType::F32, &Device::Cpu).expect("weights");
        let dense = w.to_dtype(DType::F16).and_then(|t| t.to_device(&device)).expect("dense weights");
        let quantized: Vec<(QuantFormat, QTensor)> = QuantFormat::ALL
            .into_iter()
            .map(|f| (f, QTensor::quantize(&w, f).and_then(|q| q.to_device(&device)).expect("quantize")))
            .collect();

        let mut group = c.benchmark_group(format!("quant_gemv/{device}"));
        common::configure(&mut group, 3);
        let x = Tensor::randn(&[1, cols], 0.0, 1.0, 2, DType::F16, &device).expect("x");
        for (format, q) in &quantized {
            group.throughput(Throughput::Bytes(q.size_in_bytes() as u64));
            group.bench_function(BenchmarkId::new(format.name(), &shape), |b| {
                b.iter(|| {
                    let y = qmatmul(&x, q).expect("qmatmul");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        if device.is_cpu() {
            // 8-bit activations change the kernel only where integer products pay: the CPU.
            for (format, q) in quantized.iter().filter(|(f, _)| f.ggml_block_bytes().is_some()) {
                group.throughput(Throughput::Bytes(q.size_in_bytes() as u64));
                let options = QMatmulOptions::default().int8_activations();
                group.bench_function(BenchmarkId::new(format!("{format}_int8x"), &shape), |b| {
                    b.iter(|| qmatmul_with(&x, q, options).expect("qmatmul"))
                });
            }
        }
        group.throughput(Throughput::Bytes(dense.size_in_bytes() as u64));
        group.bench_function(BenchmarkId::new("dense_f16", &shape), |b| {
            b.iter(|| {
                let y = matmul_with(&x, &dense, MatmulOptions::nt()).expect("matmul");
                device.synchronize().expect("sync");
                y
            })
        });
        group.throughput(Throughput::Bytes(2 * dense.size_in_bytes() as u64));
        if device.is_cpu() {
            // Into memory already touched, on every thread, as the GEMV reads.
            let src = vec![1u8; dense.size_in_bytes()];
            let mut dst = vec![0u8; dense.size_in_bytes()];
            group.bench_function(BenchmarkId::new("copy", &shape), |b| {
                b.iter(|| {
                    dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s))
                })
            });
        } else {
            group.bench_function(BenchmarkId::new("copy", &shape), |b| {
                b.iter(|| {
                    let y = dense.copy().expect("copy");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group(format!("quant_gemm/{device}"));
        common::configure(&mut group, 3);
        for tokens in token_counts {
            let x = Tensor::randn(&[tokens, cols], 0.0, 1.0, 3, DType::F16, &device).expect("x");
            group.throughput(Throughput::Elements(2 * (tokens * rows * cols) as u64));
            let id = format!("{shape}/t{tokens}");
            for (format, q) in &quantized {
                group.bench_function(BenchmarkId::new(format.name(), &id), |b| {
                    b.iter(|| {
                        let y = qmatmul(&x, q).expect("qmatmul");
                        device.synchronize().expect("sync");
                        y
                    })
                });
            }
            group.bench_function(BenchmarkId::new("dense_f16", &id), |b| {
                b.iter(|| {
                    let y = matmul_with(&x, &dense, MatmulOptions::nt()).expect("matmul");
                    device.synchronize().expect("sync");
                    y
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_quant);
criterion_main!(benches);
