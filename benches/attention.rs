//! Attention on every device in `Device::all()`:
//! - `attention_fwd/<device>` and `attention_bwd/<device>`: causal, in FLOP/s of the
//!   unmasked work only (criterion's elem/s column): 4·b·h·d·Σ visible keys forward, 2.5×
//!   that backward (FlashAttention's convention);
//! - `attention_fwd/cpu/causal_gqa`: the forward at a training shape with grouped-query
//!   heads (batch 4, sequence 256, 9 heads over 3 kv heads of 64);
//! - `attention_decode/<device>`: one new token per sequence against the KV cache, in bytes
//!   of cache read per second (K and V), beside a device-to-device copy of the same bytes
//!   (counted read + written, as STREAM does).
//!
//! Shapes follow the device: on GPUs bf16, batch 4, 32 heads of 128, sequence 4096, and decode at
//! batch 1 against an 8192-token cache with 8 kv heads; smaller in f32 on the CPU and on
//! software adapters. `KILN_BENCH_QUICK=1` shortens runs.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::attention::{AttentionOptions, DecodeOptions, KvCache, attention, attention_backward, attention_decode};
use kiln::{DType, Device, DeviceKind, Tensor};

fn bench_attention(c: &mut Criterion) {
    for device in Device::all() {
        let Ok(info) = device.info() else { continue };
        // (batch, seq, heads, head dim, dtype), then (cache length, heads, kv heads) for decode.
        let ((batch, seq, heads, dim, dtype), (cache_len, d_heads, d_kv)) = match info.kind {
            DeviceKind::Cpu => ((1, 256, 8, 64, DType::F32), (4096, 8, 2)),
            DeviceKind::SoftwareAdapter => ((1, 64, 2, 64, DType::F32), (512, 4, 1)),
            _ => ((4, 4096, 32, 128, DType::BF16), (8192, 32, 8)),
        };
        let shape = [batch, seq, heads, dim];
        let q = Tensor::randn(&shape, 0.0, 1.0, 1, dtype, &device).expect("q");
        let k = Tensor::randn(&shape, 0.0, 1.0, 2, dtype, &device).expect("k");
        let v = Tensor::randn(&shape, 0.0, 1.0, 3, dtype, &device).expect("v");
        let options = AttentionOptions { causal: true, ..Default::default() };
        // Causal: row i sees i + 1 keys.
        let visible = (seq * (seq + 1) / 2) as u64;
        let fwd_flops = 4 * (batch * heads * dim) as u64 * visible;
        let label = format!("b{batch}/s{seq}/h{heads}/d{dim}/{dtype}");

        let mut group = c.benchmark_group(format!("attention_fwd/{device}"));
        common::configure(&mut group, 3);
        group.throughput(Throughput::Elements(fwd_flops));
        group.bench_function(BenchmarkId::new("causal", &label), |b| {
            b.iter(|| {
                let out = attention(&q, &k, &v, &options).expect("forward");
                device.synchronize().expect("sync");
                out
            })
        });
        group.finish();

        let forward = attention(&q, &k, &v, &options).expect("forward");
        let d_o = Tensor::randn(&shape, 0.0, 1.0, 4, dtype, &device).expect("dO");
        let mut group = c.benchmark_group(format!("attention_bwd/{device}"));
        common::configure(&mut group, 3);
        group.throughput(Throughput::Elements(fwd_flops * 5 / 2));
        group.bench_function(BenchmarkId::new("causal", &label), |b| {
            b.iter(|| {
                let grads = attention_backward(&q, &k, &v, &forward, &d_o, &options).expect("backward");
                device.synchronize().expect("sync");
                grads
            })
        });
        group.finish();

        if info.kind == DeviceKind::Cpu {
            bench_training_shape(c, &device);
        }

        let mut cache = KvCache::new(1, cache_len, d_kv, dim, dtype, &device).expect("cache");
        let kv = Tensor::randn(&[1, cache_len, d_kv, dim], 0.0, 1.0, 5, dtype, &device).expect("kv");
        cache.append(&kv, &kv, None).expect("fill the cache");
        let q1 = Tensor::randn(&[1, 1, d_heads, dim], 0.0, 1.0, 6, dtype, &device).expect("q");
        let label = format!("b1/cache{cache_len}/h{d_heads}/kv{d_kv}/d{dim}/{dtype}");
        let mut group = c.benchmark_group(format!("attention_decode/{device}"));
        common::configure(&mut group, 3);
        group.throughput(Throughput::Bytes(2 * kv.size_in_bytes() as u64));
        group.bench_function(BenchmarkId::new("decode", &label), |b| {
            b.iter(|| {
                let out = attention_decode(&q1, &cache, &DecodeOptions::default()).expect("decode");
                device.synchronize().expect("sync");
                out
            })
        });
        // The same bytes copied, each read once and written once.
        group.bench_function(BenchmarkId::new("copy", &label), |b| {
            b.iter(|| {
                let y = kv.copy().expect("copy");
                device.synchronize().expect("sync");
                y
            })
        });
        group.finish();
    }
}

/// The forward at a small model's training shape on the CPU: batch 4, sequence 256, 9
/// query heads over 3 kv heads of 64, causal.
fn bench_training_shape(c: &mut Criterion, device: &Device) {
    let (batch, seq, heads, kv_heads, dim) = (4, 256, 9, 3, 64);
    let q = Tensor::randn(&[batch, seq, heads, dim], 0.0, 1.0, 1, DType::F32, device).expect("q");
    let k = Tensor::randn(&[batch, seq, kv_heads, dim], 0.0, 1.0, 2, DType::F32, device).expect("k");
    let v = Tensor::randn(&[batch, seq, kv_heads, dim], 0.0, 1.0, 3, DType::F32, device).expect("v");
    let options = AttentionOptions { causal: true, ..Default::default() };
    let visible = (seq * (seq + 1) / 2) as u64;
    let mut group = c.benchmark_group(format!("attention_fwd/{device}"));
    common::configure(&mut group, 3);
    group.throughput(Throughput::Elements(4 * (batch * heads * dim) as u64 * visible));
    let label = format!("b{batch}/s{seq}/h{heads}/kv{kv_heads}/d{dim}/f32");
    group.bench_function(BenchmarkId::new("causal_gqa", label), |b| {
        b.iter(|| attention(&q, &k, &v, &options).expect("forward"))
    });
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
