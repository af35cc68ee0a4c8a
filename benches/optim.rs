//! The fused AdamW step on every device in `Device::all()`, in bytes read and written per
//! second, over 100M parameters (25 tensors of 4M; 2M parameters on software adapters):
//! - `plain`: f32 gradients, no working copy, no clipping — the configuration of
//!   `torch.optim.AdamW(fused=True)`: 28 bytes per parameter (read θ, g, m, v; write θ, m, v);
//! - `mixed`: bf16 gradients, a bf16 working copy, global-norm clipping: 30 bytes per
//!   parameter (the norm pass reads the gradients once more).
//!
//! Beside them, a device-to-device copy of 400 MB (read + written), the bandwidth to compare
//! with. `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::optim::{AdamWHyper, ParamSlot, adamw_step};
use kiln::{DType, Device, DeviceKind, Tensor};
use rayon::prelude::*;

struct Param {
    master: Tensor,
    m: Tensor,
    v: Tensor,
    grad: Tensor,
    working: Option<Tensor>,
}

fn bench_optim(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (tensors, size) = if info.kind == DeviceKind::SoftwareAdapter { (8, 1 << 18) } else { (25, 4_000_000) };
        let total = (tensors * size) as u64;
        let mut group = c.benchmark_group(format!("adamw/{device}"));
        common::configure(&mut group, 5);
        for (name, grad_dtype, working, clip, bytes_per_param) in
            [("plain", DType::F32, None, None, 28u64), ("mixed", DType::BF16, Some(DType::BF16), Some(1.0), 30)]
        {
            let mut params: Vec<Param> = (0..tensors)
                .map(|j| {
                    let master = Tensor::randn(&[size], 0.0, 1.0, j as u64, DType::F32, &device).expect("master");
                    Param {
                        working: working.map(|d| master.to_dtype(d).expect("working")),
                        m: Tensor::zeros(&[size], DType::F32, &device).expect("m"),
                        v: Tensor::zeros(&[size], DType::F32, &device).expect("v"),
                        grad: Tensor::randn(&[size], 0.0, 0.1, 100 + j as u64, grad_dtype, &device).expect("grad"),
                        master,
                    }
                })
                .collect();
            let hyper = AdamWHyper { max_grad_norm: clip, ..AdamWHyper::default() };
            group.throughput(Throughput::Bytes(bytes_per_param * total));
            let mut t = 0u64;
            group.bench_function(BenchmarkId::new(name, format!("{}M", total / 1_000_000)), |b| {
                b.iter(|| {
                    t += 1;
                    let mut slots: Vec<ParamSlot<'_>> = params
                        .iter_mut()
                        .map(|p| ParamSlot {
                            master: &mut p.master,
                            m: &mut p.m,
                            v: &mut p.v,
                            grad: &p.grad,
                            working: p.working.as_mut(),
                            anchor: None,
                            fisher: None,
                        })
                        .collect();
                    let report = adamw_step(&mut slots, &hyper, t).expect("step");
                    device.synchronize().expect("sync");
                    report
                })
            });
        }
        let bytes = 400_000_000usize.min(tensors * size * 4);
        group.throughput(Throughput::Bytes(2 * bytes as u64));
        if device.is_cpu() {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            group.bench_function(BenchmarkId::new("copy", bytes / 1_000_000), |b| {
                b.iter(|| {
                    dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s))
                })
            });
        } else {
            let t = Tensor::zeros(&[bytes / 4], DType::F32, &device).expect("copy source");
            group.bench_function(BenchmarkId::new("copy", bytes / 1_000_000), |b| {
                b.iter(|| {
                    let c = t.copy().expect("copy");
                    device.synchronize().expect("sync");
                    c
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_optim);
criterion_main!(benches);
