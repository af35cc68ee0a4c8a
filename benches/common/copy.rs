//! The reference lines of the bandwidth benches: copies of `bytes` bytes (read + written).

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Throughput};
use kiln::{Device, Tensor};
use rayon::prelude::*;

/// `copy`: `Tensor::copy` of `t` (a new tensor, the device-to-device copy on GPUs, as the
/// ops allocate their outputs), and on the CPU `copy_touched` too: a parallel copy into
/// memory already touched, the host's bandwidth with nothing allocated.
pub fn copy_lines(group: &mut BenchmarkGroup<'_, WallTime>, device: &Device, t: &Tensor, id: &str) {
    let bytes = t.size_in_bytes();
    group.throughput(Throughput::Bytes(2 * bytes as u64));
    group.bench_function(BenchmarkId::new("copy", id), |b| {
        b.iter(|| {
            let y = t.copy().expect("copy");
            device.synchronize().expect("sync");
            y
        })
    });
    if device.is_cpu() {
        let src = vec![1u8; bytes];
        let mut dst = vec![0u8; bytes];
        group.bench_function(BenchmarkId::new("copy_touched", id), |b| {
            b.iter(|| dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s)))
        });
    }
}
