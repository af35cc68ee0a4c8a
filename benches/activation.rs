//! SwiGLU and tanh-GELU on every device in `Device::all()`, in bytes read and written per
//! second: `swiglu` (g, u → y), `swiglu_backward` (dy, g, u → dg, du), `gelu` (x → y) and
//! `gelu_backward` (dy, x → dx), over [rows, d] with d = 576 and 1536 (SmolLM2's hidden
//! and MLP widths) and 2048, in f32 and bf16. Beside them the copies of `common::copy`, the
//! bandwidth to compare with. 4M elements per tensor (16 MB of f32: the host allocator reuses such buffers instead of mapping fresh pages each call), 64K on software adapters.
//! `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::activation::{gelu, gelu_backward, swiglu, swiglu_backward};
use kiln::{DType, Device, DeviceKind, Tensor};

#[path = "common/copy.rs"]
mod copy;

fn bench_activation(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let elems = if info.kind == DeviceKind::SoftwareAdapter { 1 << 16 } else { 1 << 22 };
        let mut group = c.benchmark_group(format!("activation/{device}"));
        common::configure(&mut group, 3);
        for d in [576usize, 1536, 2048] {
            let rows = elems / d;
            for dtype in [DType::F32, DType::BF16] {
                let id = format!("{rows}x{d}/{dtype}");
                let t = |seed| Tensor::randn(&[rows, d], 0.0, 2.0, seed, dtype, &device).expect("input");
                let (a, b2, dy) = (t(1), t(2), t(3));
                let bytes = (rows * d * dtype.size_in_bytes()) as u64;
                let cases: [(&str, u64); 4] =
                    [("swiglu", 3), ("swiglu_backward", 5), ("gelu", 2), ("gelu_backward", 3)];
                for (name, tensors) in cases {
                    group.throughput(Throughput::Bytes(tensors * bytes));
                    group.bench_function(BenchmarkId::new(name, &id), |b| {
                        b.iter(|| {
                            let out = match name {
                                "swiglu" => vec![swiglu(&a, &b2).expect("swiglu")],
                                "swiglu_backward" => {
                                    let (dg, du) = swiglu_backward(&dy, &a, &b2).expect("swiglu_backward");
                                    vec![dg, du]
                                }
                                "gelu" => vec![gelu(&a).expect("gelu")],
                                _ => vec![gelu_backward(&dy, &a).expect("gelu_backward")],
                            };
                            device.synchronize().expect("sync");
                            out
                        })
                    });
                }
                copy::copy_lines(&mut group, &device, &a, &id);
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_activation);
criterion_main!(benches);
