//! Cross-entropy on every device in `Device::all()`:
//! - `cross_entropy/<device>`: loss and dlogits from `[n, vocab]` logits, in bytes per
//!   second (logits read once and dlogits written once; the kernels read the logits twice).
//! - `linear_cross_entropy/<device>`: the chunked head (`fused`) against the unfused pair
//!   (f32 logits from matmul, cross_entropy, then the backward products), with a frozen head
//!   (`dh` only) and a trained one (`dh` and `dW`). Throughput is the unfused pair's FLOP
//!   for both, so the elem/s column compares their times. Before timing, each prints the
//!   peak memory one call holds beyond its inputs: the process heap on the CPU (a counting
//!   allocator), the buffer pool on GPUs (`Device::memory_usage`).
//!
//! Sizes: n = 512, d = 576, vocab = 49152 (SmolLM2's head) on the CPU and GPUs; small on
//! software adapters. `KILN_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::loss::{Head, IGNORE_INDEX, LinearCrossEntropyOptions, cross_entropy, linear_cross_entropy};
use kiln::ops::{MatmulOptions, matmul, matmul_with};
use kiln::{DType, Device, DeviceKind, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes live and the most live at once.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes `run` holds beyond what was live before it (its outputs included).
fn peak_of<T>(device: &Device, run: impl FnOnce() -> T) -> usize {
    if device.is_cpu() {
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let out = run();
        let peak = PEAK.load(Ordering::Relaxed);
        drop(out);
        peak - before
    } else {
        device.synchronize().expect("sync");
        device.reset_peak_memory().expect("pool");
        let before = device.memory_usage().expect("pool").live_bytes;
        let out = run();
        device.synchronize().expect("sync");
        let peak = device.memory_usage().expect("pool").peak_bytes;
        drop(out);
        peak - before
    }
}

fn targets(n: usize, vocab: usize, device: &Device) -> Tensor {
    let t: Vec<i32> = (0..n).map(|i| if i % 10 == 9 { IGNORE_INDEX } else { ((i * 7919) % vocab) as i32 }).collect();
    Tensor::from_slice(&t, &[n], device).expect("targets")
}

fn bench_cross_entropy(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (n, vocab) = match info.kind {
            DeviceKind::SoftwareAdapter => (16, 8192),
            _ => (512, 49152),
        };
        let mut group = c.benchmark_group(format!("cross_entropy/{device}"));
        common::configure(&mut group, 3);
        let t = targets(n, vocab, &device);
        for dtype in [DType::F32, DType::BF16] {
            let logits = Tensor::randn(&[n, vocab], 0.0, 3.0, 1, dtype, &device).expect("logits");
            group.throughput(Throughput::Bytes(2 * logits.size_in_bytes() as u64));
            group.bench_function(BenchmarkId::new(dtype.to_string(), format!("{n}x{vocab}")), |b| {
                b.iter(|| {
                    let out = cross_entropy(&logits, &t).expect("cross_entropy");
                    device.synchronize().expect("sync");
                    out
                })
            });
        }
        group.finish();
    }
}

fn bench_linear_cross_entropy(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        let (n, d, vocab) = match info.kind {
            DeviceKind::SoftwareAdapter => (16, 64, 8192),
            _ => (512, 576, 49152),
        };
        let shape = format!("n{n}_d{d}_vocab{vocab}");
        let h = Tensor::randn(&[n, d], 0.0, 1.0, 1, DType::F32, &device).expect("h");
        let w = Tensor::randn(&[vocab, d], 0.0, 0.05, 2, DType::F32, &device).expect("w");
        let t = targets(n, vocab, &device);
        let mut group = c.benchmark_group(format!("linear_cross_entropy/{device}"));
        common::configure(&mut group, 10);
        for head_grad in [false, true] {
            let label = if head_grad { "trained_head" } else { "frozen_head" };
            let products = if head_grad { 3 } else { 2 };
            group.throughput(Throughput::Elements((2 * n * d * vocab * products) as u64));
            let unfused = || {
                let logits = matmul_with(&h, &w, MatmulOptions::nt()).expect("logits");
                let ce = cross_entropy(&logits, &t).expect("cross_entropy");
                drop(logits);
                let dh = matmul(&ce.dlogits, &w).expect("dh");
                let dw = head_grad.then(|| matmul_with(&ce.dlogits, &h, MatmulOptions::tn()).expect("dw"));
                device.synchronize().expect("sync");
                (ce.loss, dh, dw)
            };
            let mut options = LinearCrossEntropyOptions::default();
            if head_grad {
                options = options.head_grad();
            }
            let fused = || {
                let out = linear_cross_entropy(&h, Head::Dense(&w), &t, options).expect("fused");
                device.synchronize().expect("sync");
                out
            };
            let (peak_unfused, peak_fused) = (peak_of(&device, unfused), peak_of(&device, fused));
            println!(
                "linear_cross_entropy/{device}/{label}/{shape}: peak memory beyond the inputs: unfused {:.1} MiB, \
                 fused {:.1} MiB (chunk {} columns), ratio {:.3}",
                peak_unfused as f64 / (1 << 20) as f64,
                peak_fused as f64 / (1 << 20) as f64,
                options.chunk_columns,
                peak_fused as f64 / peak_unfused.max(1) as f64
            );
            group.bench_function(BenchmarkId::new(format!("unfused_{label}"), &shape), |b| b.iter(unfused));
            group.bench_function(BenchmarkId::new(format!("fused_{label}"), &shape), |b| b.iter(fused));
        }
        group.finish();
    }
}

criterion_group!(benches, bench_cross_entropy, bench_linear_cross_entropy);
criterion_main!(benches);
