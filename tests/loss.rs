//! cross_entropy and linear_cross_entropy: the CPU against a naive f64 reference (log-softmax
//! in f64) and against PyTorch (tests/fixtures/make_loss.py), gradients against finite
//! differences in f64, the fused head against the unfused logits → cross_entropy, every
//! other device against the CPU, peak device memory of the chunked head, and bad inputs.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::loss::{
    CrossEntropyOptions, Head, IGNORE_INDEX, LinearCrossEntropyOptions, cross_entropy, cross_entropy_with,
    linear_cross_entropy,
};
use kiln::ops::{QTensor, QuantFormat};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().unwrap().into_iter().map(|x| x as f64).collect()
}

/// Targets for `n` rows over `vocab` classes: about a quarter ignored, the rest in range.
fn make_targets(n: usize, vocab: usize, seed: u64) -> Vec<i32> {
    (0..n)
        .map(|i| {
            let h = (seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            if (h >> 60) < 4 { IGNORE_INDEX } else { ((h >> 20) % vocab.max(1) as u64) as i32 }
        })
        .collect()
}

fn targets_on(t: &[i32], device: &Device) -> Tensor {
    Tensor::from_slice(t, &[t.len()], device).unwrap()
}

/// The f64 reference: `(loss, dlogits, per-row lse)` of mean cross-entropy.
fn reference(x: &[f64], t: &[i32], vocab: usize, grad_scale: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let n = t.len();
    let counted = t.iter().filter(|&&v| v != IGNORE_INDEX).count();
    let mut loss = 0.0;
    let mut g = vec![0.0; n * vocab];
    let mut lses = vec![0.0; n];
    for r in 0..n {
        let row = &x[r * vocab..(r + 1) * vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        lses[r] = lse;
        if t[r] == IGNORE_INDEX {
            continue;
        }
        loss += lse - row[t[r] as usize];
        for j in 0..vocab {
            let onehot = if j as i32 == t[r] { 1.0 } else { 0.0 };
            g[r * vocab + j] = ((row[j] - lse).exp() - onehot) * grad_scale / counted as f64;
        }
    }
    (if counted == 0 { 0.0 } else { loss / counted as f64 }, g, lses)
}

/// Bounds of the f32 computation: per row, the error of its lse (a few roundings of the
/// max and the target logit, the sum over `vocab` terms); per element, that error carried
/// into softmax, times the gradient's factor.
fn ce_tolerances(x: &[f64], t: &[i32], vocab: usize, lses: &[f64], factor: f64) -> (f64, Vec<f64>) {
    let n = t.len();
    let row_err: Vec<f64> = (0..n)
        .map(|r| {
            let row = &x[r * vocab..(r + 1) * vocab];
            let big = row.iter().fold(0f64, |m, v| m.max(v.abs()));
            U32 * (8.0 * (big + 1.0) + 2.0 * vocab as f64 + 16.0)
        })
        .collect();
    let counted: Vec<usize> = (0..n).filter(|&r| t[r] != IGNORE_INDEX).collect();
    let loss_atol = counted.iter().map(|&r| 2.0 * row_err[r]).sum::<f64>() / counted.len().max(1) as f64;
    let mut atol = vec![0.0; n * vocab];
    for r in 0..n {
        for j in 0..vocab {
            let p = (x[r * vocab + j] - lses[r]).exp();
            let onehot = if j as i32 == t[r] { 1.0 } else { 0.0 };
            // The statistics' error through softmax, and the f32 roundings of p − onehot
            // and of the product with the factor.
            atol[r * vocab + j] =
                factor.abs() * (p * (row_err[r] + 8.0 * U32) + 2.0 * U32 * (p - onehot).abs()) + 1e-30;
        }
    }
    (loss_atol, atol)
}

fn shapes() -> impl Strategy<Value = (usize, usize)> {
    prop::sample::select(vec![(1, 1), (1, 2), (3, 7), (7, 31), (13, 257), (2, 1000), (5, 4099), (2, 49152)])
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F32, DType::F16, DType::BF16])
}

fn cross_entropy_matches_reference(device: &Device) {
    proptest!(common::cases(16), |((n, vocab) in shapes(), dtype in dtypes(), seed in any::<u64>(), grad_scale in prop::sample::select(vec![1.0f32, 0.25, 3.0]))| {
        let t = make_targets(n, vocab, seed);
        let make = |d: &Device| {
            let logits = Tensor::randn(&[n, vocab], 0.0, 3.0, seed, dtype, d).unwrap();
            cross_entropy_with(&logits, &targets_on(&t, d), CrossEntropyOptions::default().grad_scale(grad_scale)).unwrap()
        };
        let x = host(&Tensor::randn(&[n, vocab], 0.0, 3.0, seed, dtype, &Device::Cpu).unwrap());
        let (loss, g, lses) = reference(&x, &t, vocab, grad_scale as f64);
        let counted = t.iter().filter(|&&v| v != IGNORE_INDEX).count();
        let factor = if counted == 0 { 0.0 } else { grad_scale as f64 / counted as f64 };
        let (loss_atol, atol) = ce_tolerances(&x, &t, vocab, &lses, factor);
        let cpu = make(&Device::Cpu);
        prop_assert_eq!(cpu.counted, counted);
        prop_assert_eq!(cpu.loss.shape(), &[] as &[usize]);
        prop_assert_eq!(cpu.dlogits.dtype(), dtype);
        let what = format!("{n}x{vocab} {dtype} scale {grad_scale}");
        if device.is_cpu() {
            assert_close(&format!("cpu loss {what}"), &cpu.loss.to_vec_f32().unwrap(), &[loss], &[loss_atol], DType::F32, 1.0);
            assert_close(&format!("cpu dlogits {what}"), &cpu.dlogits.to_vec_f32().unwrap(), &g, &atol, dtype, 1.0);
            return Ok(());
        }
        let out = make(device);
        prop_assert_eq!(out.dlogits.shape(), &[n, vocab][..]);
        let atol2: Vec<f64> = atol.iter().map(|a| 2.0 * a).collect();
        assert_close(&format!("{device} loss {what}"), &out.loss.to_vec_f32().unwrap(), &host(&cpu.loss), &[2.0 * loss_atol], DType::F32, BACKEND_ROUNDINGS);
        assert_close(&format!("{device} dlogits {what}"), &out.dlogits.to_vec_f32().unwrap(), &host(&cpu.dlogits), &atol2, dtype, BACKEND_ROUNDINGS);
    });
}

fn all_ignored_gives_zero_loss_and_gradient(device: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        let logits = Tensor::randn(&[4, 9], 0.0, 1.0, 3, dtype, device).unwrap();
        let t = targets_on(&[IGNORE_INDEX; 4], device);
        let out = cross_entropy(&logits, &t).unwrap();
        assert_eq!(out.counted, 0);
        assert_eq!(out.loss.to_vec_f32().unwrap(), [0.0]);
        assert!(out.dlogits.to_vec_f32().unwrap().iter().all(|&v| v == 0.0), "{device} {dtype}");
        let h = Tensor::randn(&[4, 8], 0.0, 1.0, 4, dtype, device).unwrap();
        let w = Tensor::randn(&[9, 8], 0.0, 1.0, 5, dtype, device).unwrap();
        let fused =
            linear_cross_entropy(&h, Head::Dense(&w), &t, LinearCrossEntropyOptions::default().head_grad()).unwrap();
        assert_eq!(fused.loss.to_vec_f32().unwrap(), [0.0]);
        assert!(fused.dh.to_vec_f32().unwrap().iter().all(|&v| v == 0.0));
        assert!(fused.dw.unwrap().to_vec_f32().unwrap().iter().all(|&v| v == 0.0));
    }
    // No rows at all.
    let empty = cross_entropy(&Tensor::zeros(&[0, 5], DType::F32, device).unwrap(), &targets_on(&[], device)).unwrap();
    assert_eq!(empty.loss.to_vec_f32().unwrap(), [0.0]);
    assert_eq!(empty.dlogits.shape(), &[0, 5]);
}

/// The PyTorch fixture: cross_entropy and the fused head on torch's inputs.
fn matches_torch(device: &Device) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/loss_torch.safetensors");
    let f = kiln::io::load(path, device).unwrap();
    let get = |k: &str| f.get(k).unwrap_or_else(|| panic!("fixture lacks {k}"));
    let out = cross_entropy(get("plain.logits"), get("plain.targets")).unwrap();
    let close = |what: &str, got: &Tensor, want: &Tensor, atol: f64| {
        let want = host(want);
        assert_close(
            &format!("{device} {what}"),
            &got.to_vec_f32().unwrap(),
            &want,
            &vec![atol; want.len()],
            DType::F32,
            4.0,
        );
    };
    close("torch loss", &out.loss.reshape(&[1]).unwrap(), &get("plain.loss").reshape(&[1]).unwrap(), 2e-6);
    close("torch dlogits", &out.dlogits, get("plain.dlogits"), 1e-7);
    for chunk in [4, 16, 64] {
        let options = LinearCrossEntropyOptions::default().chunk_columns(chunk).head_grad();
        let fused = linear_cross_entropy(get("linear.h"), Head::Dense(get("linear.w")), get("linear.targets"), options)
            .unwrap();
        close("torch fused loss", &fused.loss.reshape(&[1]).unwrap(), &get("linear.loss").reshape(&[1]).unwrap(), 1e-5);
        close("torch fused dh", &fused.dh, get("linear.dh"), 1e-6);
        close("torch fused dw", fused.dw.as_ref().unwrap(), get("linear.dw"), 1e-6);
    }
}

/// Dense heads: `(h, w)` of `dtype` on `device`, from seeds.
fn head(n: usize, d: usize, vocab: usize, seed: u64, dtype: DType, device: &Device) -> (Tensor, Tensor) {
    let h = Tensor::randn(&[n, d], 0.0, 1.0, seed, dtype, device).unwrap();
    let w = Tensor::randn(&[vocab, d], 0.0, 1.5 / (d as f32).sqrt(), seed + 1, dtype, device).unwrap();
    (h, w)
}

/// The f64 reference of the head: loss, dh, dW from `h` and `W` as stored.
struct HeadRef {
    loss: f64,
    dh: Vec<f64>,
    dw: Vec<f64>,
    loss_atol: f64,
    dh_atol: Vec<f64>,
    dw_atol: Vec<f64>,
}

/// `g_dtype` is the dtype the gradient chunks are rounded to before the backward products
/// (relative error its unit roundoff, absolute half its smallest subnormal); f32 for the
/// unrounded reference of the unfused pair and the quantized heads.
#[allow(clippy::too_many_arguments)]
fn head_reference(h: &[f64], w: &[f64], t: &[i32], n: usize, d: usize, vocab: usize, g_dtype: DType) -> HeadRef {
    let g_round = if g_dtype == DType::F32 { 0.0 } else { g_dtype.unit_roundoff() };
    let g_subnormal = match g_dtype {
        DType::F16 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-133),
        _ => 0.0,
    };
    let mut logits = vec![0.0; n * vocab];
    let mut logit_err = vec![0f64; n];
    for i in 0..n {
        for j in 0..vocab {
            let (mut s, mut a) = (0.0, 0.0);
            for k in 0..d {
                s += h[i * d + k] * w[j * d + k];
                a += (h[i * d + k] * w[j * d + k]).abs();
            }
            logits[i * vocab + j] = s;
            logit_err[i] = logit_err[i].max((d as f64 + 2.0) * U32 * a);
        }
    }
    let (loss, g, lses) = reference(&logits, t, vocab, 1.0);
    let counted = t.iter().filter(|&&v| v != IGNORE_INDEX).count().max(1) as f64;
    let (ce_loss_atol, _) = ce_tolerances(&logits, t, vocab, &lses, 1.0 / counted);
    // Error of each gradient element: the logits' error carried through softmax, the
    // statistics' error, and the rounding of g to the products' dtype.
    let mut g_err = vec![0.0; n * vocab];
    for i in 0..n {
        for j in 0..vocab {
            let p = (logits[i * vocab + j] - lses[i]).exp();
            let e = if t[i] == IGNORE_INDEX {
                0.0
            } else {
                p / counted * (3.0 * logit_err[i] + (2.0 * vocab as f64 + 32.0) * U32)
            };
            g_err[i * vocab + j] = e + g_round * g[i * vocab + j].abs() + g_subnormal / 2.0;
        }
    }
    let mut dh = vec![0.0; n * d];
    let mut dh_atol = vec![0.0; n * d];
    let mut dw = vec![0.0; vocab * d];
    let mut dw_atol = vec![0.0; vocab * d];
    for i in 0..n {
        for j in 0..vocab {
            let (gv, ge) = (g[i * vocab + j], g_err[i * vocab + j]);
            for k in 0..d {
                dh[i * d + k] += gv * w[j * d + k];
                dh_atol[i * d + k] += ge * w[j * d + k].abs() + (vocab as f64 + 4.0) * U32 * (gv * w[j * d + k]).abs();
                dw[j * d + k] += gv * h[i * d + k];
                dw_atol[j * d + k] += ge * h[i * d + k].abs() + (n as f64 + 4.0) * U32 * (gv * h[i * d + k]).abs();
            }
        }
    }
    let loss_atol = ce_loss_atol + 2.0 * logit_err.iter().cloned().fold(0.0, f64::max);
    HeadRef { loss, dh, dw, loss_atol, dh_atol, dw_atol }
}

fn head_shapes() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    // (n, d, vocab, chunk): chunks that divide the vocabulary and ones that do not, a single
    // chunk, single rows and columns, primes, and SmolLM2's vocabulary with few rows.
    prop::sample::select(vec![
        (1, 1, 1, 1),
        (1, 8, 5, 4),
        (3, 16, 37, 8),
        (7, 32, 64, 16),
        (13, 24, 101, 32),
        (5, 64, 300, 1000),
        (2, 32, 49152, 4096),
        (2, 64, 4099, 1024),
    ])
}

fn linear_cross_entropy_matches_reference(device: &Device) {
    proptest!(common::cases(10), |((n, d, vocab, chunk) in head_shapes(), dtype in dtypes(), seed in any::<u64>())| {
        let t = make_targets(n, vocab, seed);
        let options = LinearCrossEntropyOptions::default().chunk_columns(chunk).head_grad();
        let make = |dev: &Device| {
            let (h, w) = head(n, d, vocab, seed, dtype, dev);
            linear_cross_entropy(&h, Head::Dense(&w), &targets_on(&t, dev), options).unwrap()
        };
        let (h, w) = head(n, d, vocab, seed, dtype, &Device::Cpu);
        let r = head_reference(&host(&h), &host(&w), &t, n, d, vocab, dtype);
        let cpu = make(&Device::Cpu);
        let what = format!("n {n} d {d} vocab {vocab} chunk {chunk} {dtype}");
        let cpu_dw = cpu.dw.clone().unwrap();
        if device.is_cpu() {
            assert_close(&format!("cpu loss {what}"), &cpu.loss.to_vec_f32().unwrap(), &[r.loss], &[r.loss_atol], DType::F32, 1.0);
            assert_close(&format!("cpu dh {what}"), &cpu.dh.to_vec_f32().unwrap(), &r.dh, &r.dh_atol, dtype, 1.0);
            assert_close(&format!("cpu dw {what}"), &cpu_dw.to_vec_f32().unwrap(), &r.dw, &r.dw_atol, dtype, 1.0);
            return Ok(());
        }
        let out = make(device);
        let twice = |v: &[f64]| v.iter().map(|a| 2.0 * a).collect::<Vec<f64>>();
        assert_close(&format!("{device} loss {what}"), &out.loss.to_vec_f32().unwrap(), &host(&cpu.loss), &[2.0 * r.loss_atol], DType::F32, BACKEND_ROUNDINGS);
        assert_close(&format!("{device} dh {what}"), &out.dh.to_vec_f32().unwrap(), &host(&cpu.dh), &twice(&r.dh_atol), dtype, BACKEND_ROUNDINGS);
        assert_close(&format!("{device} dw {what}"), &out.dw.unwrap().to_vec_f32().unwrap(), &host(&cpu_dw), &twice(&r.dw_atol), dtype, BACKEND_ROUNDINGS);
    });
}

/// The fused head equals the unfused pair (f32 logits from matmul, then cross_entropy, then
/// the two backward products), checked in f64 on the stored inputs; on every device.
fn fused_equals_unfused(device: &Device) {
    let (n, d, vocab) = (6, 48, 211);
    let t = make_targets(n, vocab, 9);
    let targets = targets_on(&t, device);
    let (h, w) = head(n, d, vocab, 21, DType::F32, device);
    let logits = kiln::ops::matmul_with(&h, &w, kiln::ops::MatmulOptions::nt()).unwrap();
    let unfused = cross_entropy(&logits, &targets).unwrap();
    let dh = kiln::ops::matmul(&unfused.dlogits, &w).unwrap();
    let dw = kiln::ops::matmul_with(&unfused.dlogits, &h, kiln::ops::MatmulOptions::tn()).unwrap();
    let r = head_reference(&host(&h), &host(&w), &t, n, d, vocab, DType::F32);
    for chunk in [7, 64, 211, 4096] {
        let fused = linear_cross_entropy(
            &h,
            Head::Dense(&w),
            &targets,
            LinearCrossEntropyOptions::default().chunk_columns(chunk).head_grad(),
        )
        .unwrap();
        let what = format!("{device} chunk {chunk}");
        // Both within the f32 bounds of the f64 value, so within twice of each other.
        let twice = |v: &[f64]| v.iter().map(|a| 2.0 * a).collect::<Vec<f64>>();
        assert_close(
            &format!("{what} fused vs unfused loss"),
            &fused.loss.to_vec_f32().unwrap(),
            &host(&unfused.loss),
            &[2.0 * r.loss_atol],
            DType::F32,
            2.0,
        );
        assert_close(
            &format!("{what} fused vs unfused dh"),
            &fused.dh.to_vec_f32().unwrap(),
            &host(&dh),
            &twice(&r.dh_atol),
            DType::F32,
            2.0,
        );
        assert_close(
            &format!("{what} fused vs unfused dw"),
            &fused.dw.unwrap().to_vec_f32().unwrap(),
            &host(&dw),
            &twice(&r.dw_atol),
            DType::F32,
            2.0,
        );
        assert_close(
            &format!("{what} fused vs f64"),
            &fused.dh.to_vec_f32().unwrap(),
            &r.dh,
            &r.dh_atol,
            DType::F32,
            1.0,
        );
    }
}

/// Quantized heads: the fused head on a QTensor equals the f64 reference on its dequantized
/// weights (no dW: a quantized head is frozen).
fn quantized_head_matches_reference(device: &Device) {
    for (format, (n, d, vocab, chunk)) in [
        (QuantFormat::Q8_0, (5, 64, 301, 64)),
        (QuantFormat::Q4_0, (3, 32, 97, 16)),
        (QuantFormat::Q4_1, (2, 96, 131, 32)),
        (QuantFormat::Nf4, (4, 64, 130, 32)),
        (QuantFormat::Nf4DoubleQuant, (3, 64, 700, 8)),
    ] {
        let t = make_targets(n, vocab, 4);
        for dtype in [DType::F32, DType::BF16] {
            let make = |dev: &Device| {
                let (h, w) = head(n, d, vocab, 8, dtype, dev);
                let q = QTensor::quantize(&w, format).unwrap();
                let options = LinearCrossEntropyOptions::default().chunk_columns(chunk);
                (linear_cross_entropy(&h, Head::Quantized(&q), &targets_on(&t, dev), options).unwrap(), q, h)
            };
            let (cpu, q, h) = make(&Device::Cpu);
            assert!(cpu.dw.is_none());
            let wq = host(&q.dequantize(DType::F32).unwrap());
            let r = head_reference(&host(&h), &wq, &t, n, d, vocab, DType::F32);
            let what = format!("{format} {dtype} n {n} d {d} vocab {vocab} chunk {chunk}");
            if device.is_cpu() {
                assert_close(
                    &format!("cpu loss {what}"),
                    &cpu.loss.to_vec_f32().unwrap(),
                    &[r.loss],
                    &[r.loss_atol],
                    DType::F32,
                    1.0,
                );
                assert_close(&format!("cpu dh {what}"), &cpu.dh.to_vec_f32().unwrap(), &r.dh, &r.dh_atol, dtype, 1.0);
                continue;
            }
            let (out, _, _) = make(device);
            let twice: Vec<f64> = r.dh_atol.iter().map(|a| 2.0 * a).collect();
            assert_close(
                &format!("{device} loss {what}"),
                &out.loss.to_vec_f32().unwrap(),
                &host(&cpu.loss),
                &[2.0 * r.loss_atol],
                DType::F32,
                BACKEND_ROUNDINGS,
            );
            assert_close(
                &format!("{device} dh {what}"),
                &out.dh.to_vec_f32().unwrap(),
                &host(&cpu.dh),
                &twice,
                dtype,
                BACKEND_ROUNDINGS,
            );
        }
    }
}

/// The outputs are written in full: poisoned buffers (NaN) must not show through.
fn outputs_are_written_in_full(device: &Device) {
    kiln::set_poison_outputs(true);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // Odd sizes, so 16-bit gradients have words spanning rows.
        let logits = Tensor::randn(&[5, 7], 0.0, 1.0, 2, dtype, device).unwrap();
        let out = cross_entropy(&logits, &targets_on(&[1, IGNORE_INDEX, 6, 0, 3], device)).unwrap();
        assert!(out.dlogits.to_vec_f32().unwrap().iter().all(|v| v.is_finite()), "{device} {dtype}");
        assert!(out.loss.to_vec_f32().unwrap()[0].is_finite());
        let (h, w) = head(5, 3, 7, 3, dtype, device);
        let options = LinearCrossEntropyOptions::default().chunk_columns(4).head_grad();
        let fused =
            linear_cross_entropy(&h, Head::Dense(&w), &targets_on(&[6, 0, IGNORE_INDEX, 3, 4], device), options)
                .unwrap();
        assert!(fused.dh.to_vec_f32().unwrap().iter().all(|v| v.is_finite()), "{device} {dtype} dh");
        assert!(fused.dw.unwrap().to_vec_f32().unwrap().iter().all(|v| v.is_finite()), "{device} {dtype} dw");
    }
}

/// dlogits, dh and dW against central differences of the f64 loss, which is what the
/// analytic gradients must be the derivative of.
fn gradients_match_finite_differences(device: &Device) {
    if !device.is_cpu() {
        return; // The f64 differences check the CPU; other devices are checked against it.
    }
    let (n, d, vocab) = (3, 5, 7);
    let t = vec![2, IGNORE_INDEX, 6];
    let (h, w) = head(n, d, vocab, 33, DType::F32, device);
    let (hv, wv) = (host(&h), host(&w));
    let loss_of = |hv: &[f64], wv: &[f64]| -> f64 {
        let mut logits = vec![0.0; n * vocab];
        for i in 0..n {
            for j in 0..vocab {
                logits[i * vocab + j] = (0..d).map(|k| hv[i * d + k] * wv[j * d + k]).sum();
            }
        }
        reference(&logits, &t, vocab, 1.0).0
    };
    let fused = linear_cross_entropy(
        &h,
        Head::Dense(&w),
        &targets_on(&t, device),
        LinearCrossEntropyOptions::default().chunk_columns(4).head_grad(),
    )
    .unwrap();
    let eps = 1e-5;
    let check = |what: &str, got: Vec<f32>, base: &[f64], perturb: &dyn Fn(&[f64]) -> f64| {
        for (i, &g) in got.iter().enumerate() {
            let (mut up, mut down) = (base.to_vec(), base.to_vec());
            up[i] += eps;
            down[i] -= eps;
            let fd = (perturb(&up) - perturb(&down)) / (2.0 * eps);
            assert!((g as f64 - fd).abs() <= 1e-5 + 1e-4 * fd.abs(), "{what}[{i}]: {g} vs finite difference {fd}");
        }
    };
    check("dh", fused.dh.to_vec_f32().unwrap(), &hv, &|x| loss_of(x, &wv));
    check("dw", fused.dw.unwrap().to_vec_f32().unwrap(), &wv, &|x| loss_of(&hv, x));
    let logits = Tensor::randn(&[n, vocab], 0.0, 2.0, 5, DType::F32, device).unwrap();
    let lv = host(&logits);
    let out = cross_entropy(&logits, &targets_on(&t, device)).unwrap();
    check("dlogits", out.dlogits.to_vec_f32().unwrap(), &lv, &|x| reference(x, &t, vocab, 1.0).0);
}

/// Bad inputs are `Err` naming what is wrong, on every device.
fn bad_inputs_are_refused(device: &Device) {
    let logits = Tensor::randn(&[3, 5], 0.0, 1.0, 1, DType::F32, device).unwrap();
    let expect = |r: kiln::Result<kiln::ops::loss::CrossEntropy>, what: &str, needle: &str| match r {
        Err(e) => assert!(e.to_string().contains(needle), "{device} {what}: {e} lacks {needle:?}"),
        Ok(_) => panic!("{device} {what} was accepted"),
    };
    expect(cross_entropy(&logits, &targets_on(&[0, 5, 1], device)), "target = vocab", "row 1");
    expect(cross_entropy(&logits, &targets_on(&[0, 1, -3], device)), "negative target", "-3 at row 2");
    expect(cross_entropy(&logits, &targets_on(&[0, 1], device)), "short targets", "[3]");
    let ft = Tensor::zeros(&[3], DType::F32, device).unwrap();
    assert!(matches!(cross_entropy(&logits, &ft), Err(Error::DType(_))), "{device} float targets");
    let ut = Tensor::from_slice(&[0u32, 1, 2], &[3], device).unwrap();
    assert!(matches!(cross_entropy(&logits, &ut), Err(Error::DType(_))), "{device} u32 targets");
    assert!(matches!(cross_entropy(&logits.reshape(&[15]).unwrap(), &ft), Err(Error::Shape(_) | Error::DType(_))));
    let t = targets_on(&[0, 1, 2], device);
    assert!(cross_entropy_with(&logits, &t, CrossEntropyOptions::default().grad_scale(f32::NAN)).is_err());
    if !device.is_cpu() {
        let cpu_t = targets_on(&[0, 1, 2], &Device::Cpu);
        assert!(matches!(cross_entropy(&logits, &cpu_t), Err(Error::DeviceMismatch(_))));
    }
    let (h, w) = head(3, 8, 5, 1, DType::F32, device);
    let lce =
        |h: &Tensor, head: Head<'_>, t: &Tensor, o: LinearCrossEntropyOptions| linear_cross_entropy(h, head, t, o);
    let o = LinearCrossEntropyOptions::default();
    assert!(lce(&h, Head::Dense(&w), &targets_on(&[0, 9, 1], device), o).unwrap_err().to_string().contains("row 1"));
    assert!(matches!(lce(&h, Head::Dense(&w), &t, o.chunk_columns(0)), Err(Error::InvalidArgument(_))));
    let w_bf = w.to_dtype(DType::BF16).unwrap();
    assert!(matches!(lce(&h, Head::Dense(&w_bf), &t, o), Err(Error::DType(_))));
    let w_bad = Tensor::zeros(&[5, 7], DType::F32, device).unwrap();
    assert!(matches!(lce(&h, Head::Dense(&w_bad), &t, o), Err(Error::Shape(_))));
    let q = QTensor::quantize(&Tensor::zeros(&[5, 32], DType::F32, device).unwrap(), QuantFormat::Q8_0).unwrap();
    assert!(matches!(lce(&h, Head::Quantized(&q), &t, o), Err(Error::Shape(_))), "{device} quantized d differs");
    let h32 = Tensor::zeros(&[3, 32], DType::F32, device).unwrap();
    assert!(matches!(lce(&h32, Head::Quantized(&q), &t, o.head_grad()), Err(Error::InvalidArgument(_))));
}

device_tests!(
    cross_entropy_matches_reference,
    all_ignored_gives_zero_loss_and_gradient,
    matches_torch,
    linear_cross_entropy_matches_reference,
    fused_equals_unfused,
    quantized_head_matches_reference,
    outputs_are_written_in_full,
    gradients_match_finite_differences,
    bad_inputs_are_refused,
);
