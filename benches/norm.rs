//! RMSNorm on every device in `Device::all()`, in bytes read and written per second:
//! `rms_norm` (x, w → y, rstd), `add_rms_norm` (x, r, w → h, y, rstd) and
//! `rms_norm_backward` (dy, x, w, rstd → dx, dw; dw's partial sums not counted), for rows
//! of d = 576 (SmolLM2), 2048 and 4096 in f32 and bf16 (w in f32 beside bf16, as GGUF
//! stores norms). Beside them the copies of `common::copy`, the bandwidth to compare with.
//! 4M elements per tensor (16 MB of f32: the host allocator reuses such buffers instead of mapping fresh pages each call), 64K on software adapters. `KILN_BENCH_QUICK=1`
//! shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::norm::{add_rms_norm, rms_norm, rms_norm_backward};
use kiln::{DType, Device, DeviceKind, Tensor};

#[path = "common/copy.rs"]
mod copy;

fn bench_norm(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let elems = if info.kind == DeviceKind::SoftwareAdapter { 1 << 16 } else { 1 << 22 };
        let mut group = c.benchmark_group(format!("norm/{device}"));
        common::configure(&mut group, 3);
        for d in [576usize, 2048, 4096] {
            let rows = elems / d;
            for (xt, wt) in [(DType::F32, DType::F32), (DType::BF16, DType::F32)] {
                let id = format!("{rows}x{d}/{xt}");
                let (xs, ws) = (xt.size_in_bytes(), wt.size_in_bytes());
                let x = Tensor::randn(&[rows, d], 0.0, 1.0, 1, xt, &device).expect("x");
                let r = Tensor::randn(&[rows, d], 0.0, 1.0, 2, xt, &device).expect("r");
                let w = Tensor::randn(&[d], 1.0, 0.1, 3, wt, &device).expect("w");
                let n = (rows * d) as u64;
                group.throughput(Throughput::Bytes(2 * n * xs as u64 + (d * ws + rows * 4) as u64));
                group.bench_function(BenchmarkId::new("rms_norm", &id), |b| {
                    b.iter(|| {
                        let out = rms_norm(&x, &w, 1e-5).expect("rms_norm");
                        device.synchronize().expect("sync");
                        out
                    })
                });
                group.throughput(Throughput::Bytes(4 * n * xs as u64 + (d * ws + rows * 4) as u64));
                group.bench_function(BenchmarkId::new("add_rms_norm", &id), |b| {
                    b.iter(|| {
                        let out = add_rms_norm(&x, &r, &w, 1e-5).expect("add_rms_norm");
                        device.synchronize().expect("sync");
                        out
                    })
                });
                let rstd = rms_norm(&x, &w, 1e-5).expect("rstd").rstd;
                group.throughput(Throughput::Bytes(3 * n * xs as u64 + (2 * d * ws + rows * 4) as u64));
                group.bench_function(BenchmarkId::new("rms_norm_backward", &id), |b| {
                    b.iter(|| {
                        let g = rms_norm_backward(&r, &x, &w, &rstd).expect("backward");
                        device.synchronize().expect("sync");
                        g
                    })
                });
                copy::copy_lines(&mut group, &device, &x, &id);
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_norm);
criterion_main!(benches);
