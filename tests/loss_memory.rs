//! Peak device memory of the chunked linear_cross_entropy, measured with the device's pool
//! counters. A file of its own: the pool counts every tensor on the device, so no other
//! test may run beside it.

#[macro_use]
mod common;

use kiln::ops::loss::{Head, IGNORE_INDEX, LinearCrossEntropyOptions, linear_cross_entropy};
use kiln::ops::{QTensor, QuantFormat};
use kiln::{DType, Device, Tensor};
use std::sync::Mutex;

/// The tests of this file run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn make_targets(n: usize, vocab: usize) -> Vec<i32> {
    (0..n).map(|i| if i % 5 == 3 { IGNORE_INDEX } else { ((i * 7919) % vocab) as i32 }).collect()
}

fn head(n: usize, d: usize, vocab: usize, seed: u64, dtype: DType, device: &Device) -> (Tensor, Tensor) {
    let h = Tensor::randn(&[n, d], 0.0, 1.0, seed, dtype, device).unwrap();
    let w = Tensor::randn(&[vocab, d], 0.0, 1.5 / (d as f32).sqrt(), seed + 1, dtype, device).unwrap();
    (h, w)
}

/// The chunked head's peak device memory stays within one chunk of logits (and its
/// gradient and weight rows) plus O(n·d), far below the `[n, vocab]` logits.
fn peak_memory_is_one_chunk(device: &Device) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if device.is_cpu() {
        assert!(device.memory_usage().is_err(), "the CPU keeps no pool");
        return;
    }
    let (n, d, vocab, chunk) = (64, 32, 16384, 256);
    let targets = Tensor::from_slice(&make_targets(n, vocab), &[n], device).unwrap();
    let (h, w) = head(n, d, vocab, 2, DType::F32, device);
    let q = QTensor::quantize(&w, QuantFormat::Q8_0).unwrap();
    let logits_bytes = n * vocab * 4;
    for quantized in [false, true] {
        let head = if quantized { Head::Quantized(&q) } else { Head::Dense(&w) };
        device.synchronize().unwrap();
        device.reset_peak_memory().unwrap();
        let before = device.memory_usage().unwrap();
        let out = linear_cross_entropy(&h, head, &targets, LinearCrossEntropyOptions::default().chunk_columns(chunk))
            .unwrap();
        let after = device.memory_usage().unwrap();
        let extra = after.peak_bytes - before.live_bytes;
        // One chunk of f32 logits and its f32 gradient, the chunk's rows of W, and a few
        // [n, d] f32 buffers (dh's accumulator, a product, h in f32), plus pool rounding.
        let bound = 2 * n * chunk * 4 + chunk * d * 4 + 6 * n * d * 4 + 16 * 256;
        assert!(extra <= bound, "{device} quantized={quantized}: peak {extra} bytes above the inputs, bound {bound}");
        assert!(extra * 8 <= logits_bytes, "{device}: {extra} bytes is not under 1/8 of the logits' {logits_bytes}");
        drop(out);
    }
}

device_tests!(peak_memory_is_one_chunk);
