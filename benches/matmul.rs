//! Dense matmul throughput on every device in `Device::all()`, in FLOP/s (criterion's
//! "elem/s" column counts floating-point operations: 2·m·n·k per product).
//!
//! Sizes follow the device: up to 4096³ on GPUs, up to 1024³ on the CPU, small ones on
//! software adapters such as lavapipe, which prove correctness rather than speed.
//! `KILN_BENCH_QUICK=1` shortens the measurement (the GPU check uses it).

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::{MatmulOptions, matmul_with};
use kiln::{DType, Device, DeviceKind, Tensor};

fn sizes(kind: DeviceKind) -> Vec<usize> {
    match kind {
        DeviceKind::Cpu => vec![256, 512, 1024],
        DeviceKind::SoftwareAdapter => vec![64, 128],
        _ => vec![1024, 2048, 4096],
    }
}

fn bench_matmul(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let mut group = c.benchmark_group(format!("matmul/{device}"));
        common::configure(&mut group, 3);
        let dtypes: &[DType] = if info.kind == DeviceKind::Cpu { &[DType::F32, DType::BF16] } else { &DType::ALL };
        for &dtype in dtypes {
            for n in sizes(info.kind) {
                // A·Bᵀ, the layout of activations times a [out, in] weight.
                let a = Tensor::randn(&[n, n], 0.0, 1.0, 1, dtype, &device).expect("input a");
                let b = Tensor::randn(&[n, n], 0.0, 1.0, 2, dtype, &device).expect("input b");
                let options = MatmulOptions::nt();
                group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
                group.bench_with_input(BenchmarkId::new(format!("{dtype}_nt"), n), &n, |bench, _| {
                    bench.iter(|| {
                        let out = matmul_with(&a, &b, options).expect("matmul");
                        device.synchronize().expect("synchronize");
                        out
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
