//! Attention forward against a naive f64 attention: sequence 1, odd lengths, q_len ≠ kv_len,
//! the tuned head dims and a generic one, GQA ratios 1, 4 and 8, causal or not, every dtype,
//! padded batches, fully masked rows and bad input.

#[macro_use]
mod common;

use common::{U32, assert_close};
use kiln::ops::attention::{AttentionOptions, attention};
use kiln::{DType, Device, Error, Tensor};

struct Case {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    causal: bool,
    dtype: DType,
}

/// Naive attention in f64: (o, lse, Σ |p·v| per output element for the tolerance).
fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], lens: &[usize]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    reference64(c, &wide(q), &wide(k), &wide(v), lens)
}

fn reference64(c: &Case, q: &[f64], k: &[f64], v: &[f64], lens: &[usize]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = c.dim;
    let scale = 1.0 / (d as f64).sqrt();
    let mut o = vec![0f64; c.batch * c.q_len * c.heads * d];
    let mut mass = vec![0f64; o.len()];
    let mut lse = vec![f64::NEG_INFINITY; c.batch * c.heads * c.q_len];
    for b in 0..c.batch {
        for h in 0..c.heads {
            let kh = h / (c.heads / c.kv_heads);
            for i in 0..c.q_len {
                let len = lens[b];
                if i >= len.min(c.q_len) {
                    continue;
                }
                let mut end = len.min(c.kv_len);
                if c.causal {
                    end = end.min((i as i64 + c.kv_len as i64 - c.q_len as i64 + 1).max(0) as usize);
                }
                let qb = ((b * c.q_len + i) * c.heads + h) * d;
                let scores: Vec<f64> = (0..end)
                    .map(|j| {
                        let kb = ((b * c.kv_len + j) * c.kv_heads + kh) * d;
                        (0..d).map(|x| q[qb + x] * k[kb + x]).sum::<f64>() * scale
                    })
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[(b * c.heads + h) * c.q_len + i] = m + sum.ln();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / sum;
                    let kb = ((b * c.kv_len + j) * c.kv_heads + kh) * d;
                    for x in 0..d {
                        o[qb + x] += p * v[kb + x];
                        mass[qb + x] += (p * v[kb + x]).abs();
                    }
                }
            }
        }
    }
    (o, lse, mass)
}

fn check(device: &Device, c: &Case, lens: Option<Vec<usize>>) {
    let qs = [c.batch, c.q_len, c.heads, c.dim];
    let ks = [c.batch, c.kv_len, c.kv_heads, c.dim];
    let host = |t: &Tensor| t.to_vec_f32().unwrap();
    let q = Tensor::randn(&qs, 0.0, 1.0, 1, c.dtype, &Device::Cpu).unwrap();
    let k = Tensor::randn(&ks, 0.0, 1.0, 2, c.dtype, &Device::Cpu).unwrap();
    let v = Tensor::randn(&ks, 0.0, 1.0, 3, c.dtype, &Device::Cpu).unwrap();
    let full_lens = lens.clone().unwrap_or(vec![usize::MAX; c.batch]);
    let (want_o, want_lse, mass) = reference(c, &host(&q), &host(&k), &host(&v), &full_lens);
    // Softmax weights and the weighted sum in f32: a few roundings per visible key plus the
    // exponentials' own error, relative to Σ|p·v|; the output's rounding on top.
    let steps = c.kv_len as f64 + c.dim as f64;
    let atol: Vec<f64> = mass.iter().map(|m| 16.0 * steps * U32 * (m + 1e-30)).collect();
    let lse_atol: Vec<f64> = want_lse.iter().map(|l| 16.0 * steps * U32 * (1.0 + l.abs())).collect();
    let options = AttentionOptions { causal: c.causal, scale: None, seq_lens: lens };
    let out = attention(
        &q.to_device(device).unwrap(),
        &k.to_device(device).unwrap(),
        &v.to_device(device).unwrap(),
        &options,
    )
    .unwrap();
    assert_eq!(out.o.shape(), &qs);
    let what = format!(
        "{device} b{} q{} kv{} h{}/{} d{} causal {} {}",
        c.batch, c.q_len, c.kv_len, c.heads, c.kv_heads, c.dim, c.causal, c.dtype
    );
    // CUDA's tensor-core kernel rounds the softmax weights p to q's half type before
    // P·V, as FlashAttention does: one more relative rounding of every term.
    let atol = match device {
        Device::Cuda(_) if c.dtype != DType::F32 => {
            atol.iter().zip(&mass).map(|(a, m)| a + 2.0 * c.dtype.unit_roundoff() * m).collect()
        }
        _ => atol.clone(),
    };
    assert_close(&format!("{what} o"), &host(&out.o), &want_o, &atol, c.dtype, 2.0);
    let lse = out.lse.to_vec::<f32>().unwrap();
    for (i, (g, w)) in lse.iter().zip(&want_lse).enumerate() {
        if w.is_infinite() {
            assert!(g.is_infinite() && *g < 0.0, "{what} lse[{i}] = {g}, want −∞");
        } else {
            assert!((*g as f64 - w).abs() <= lse_atol[i], "{what} lse[{i}]: {g} vs {w}");
        }
    }
}

fn forward_matches_naive_attention(device: &Device) {
    let mut cases = Vec::new();
    for (q_len, kv_len) in [(1, 1), (1, 9), (5, 5), (3, 7), (7, 3)] {
        for causal in [false, true] {
            cases.push(Case { batch: 2, q_len, kv_len, heads: 4, kv_heads: 1, dim: 64, causal, dtype: DType::F32 });
        }
    }
    for dim in [64, 80, 96, 128, 17, 256] {
        cases.push(Case {
            batch: 1,
            q_len: 6,
            kv_len: 6,
            heads: 2,
            kv_heads: 2,
            dim,
            causal: true,
            dtype: DType::BF16,
        });
    }
    for (heads, kv_heads) in [(4, 4), (8, 2), (8, 1)] {
        for dtype in DType::ALL {
            cases.push(Case { batch: 1, q_len: 4, kv_len: 9, heads, kv_heads, dim: 32, causal: true, dtype });
        }
    }
    // Past the tensor-core kernel's 64-row and 64-key tiles, in both directions of the
    // causal offset, with grouped-query heads.
    for (q_len, kv_len, dim, dtype) in
        [(70, 130, 64, DType::BF16), (130, 70, 128, DType::F16), (65, 65, 80, DType::BF16)]
    {
        for causal in [false, true] {
            cases.push(Case { batch: 2, q_len, kv_len, heads: 4, kv_heads: 2, dim, causal, dtype });
        }
    }
    // f32 with 16+ query rows: the CPU's tiled forward (the row kernel takes fewer rows), a
    // tile and a partial one, both causal offsets, and the training shape's head grouping.
    for (q_len, kv_len) in [(16, 16), (70, 130), (130, 70), (67, 67)] {
        for causal in [false, true] {
            cases.push(Case { batch: 2, q_len, kv_len, heads: 9, kv_heads: 3, dim: 64, causal, dtype: DType::F32 });
        }
    }
    for c in &cases {
        check(device, c, None);
    }
    let long =
        Case { batch: 3, q_len: 70, kv_len: 70, heads: 2, kv_heads: 1, dim: 96, causal: true, dtype: DType::BF16 };
    check(device, &long, Some(vec![70, 66, 3]));
    let long_f32 = Case { dtype: DType::F32, heads: 6, kv_heads: 2, ..long };
    check(device, &long_f32, Some(vec![70, 17, 0]));
}

fn padded_rows_give_what_the_unpadded_sequence_gives(device: &Device) {
    let c = Case { batch: 3, q_len: 7, kv_len: 7, heads: 2, kv_heads: 1, dim: 16, causal: true, dtype: DType::F32 };
    check(device, &c, Some(vec![7, 3, 0]));
    // Sequence 1 padded to 7 equals the same sequence alone at length 3.
    let q = Tensor::randn(&[1, 7, 2, 16], 0.0, 1.0, 4, DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::randn(&[1, 7, 1, 16], 0.0, 1.0, 5, DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::randn(&[1, 7, 1, 16], 0.0, 1.0, 6, DType::F32, &Device::Cpu).unwrap();
    let cut = |t: &Tensor, heads: usize| {
        let h = t.to_vec::<f32>().unwrap();
        Tensor::from_slice(&h[..3 * heads * 16], &[1, 3, heads, 16], &Device::Cpu).unwrap()
    };
    let on = |t: &Tensor| t.to_device(device).unwrap();
    let padded =
        attention(&on(&q), &on(&k), &on(&v), &AttentionOptions { causal: true, scale: None, seq_lens: Some(vec![3]) })
            .unwrap();
    let alone = attention(
        &on(&cut(&q, 2)),
        &on(&cut(&k, 1)),
        &on(&cut(&v, 1)),
        &AttentionOptions { causal: true, ..Default::default() },
    )
    .unwrap();
    let p = padded.o.to_vec::<f32>().unwrap();
    assert_eq!(&p[..3 * 2 * 16], alone.o.to_vec::<f32>().unwrap().as_slice(), "{device}");
    assert!(p[3 * 2 * 16..].iter().all(|&x| x == 0.0), "{device}: padding rows are zero");
}

fn whatever_padding_holds_never_reaches_real_rows(device: &Device) {
    use kiln::ops::attention::attention_backward;
    // Sequence 1 is 33 long in a batch padded to 70; its padding holds NaN in one copy of
    // the inputs and zeros in the other. Forward and backward must agree bit for bit, with
    // zeros in the padding rows.
    let (len, full, heads, dim) = (33usize, 70usize, 2usize, 64usize);
    let shape = [2, full, heads, dim];
    let host = |seed: u64, pad: f32| {
        let mut v = Tensor::randn(&shape, 0.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
        v[(full + len) * heads * dim..].iter_mut().for_each(|x| *x = pad);
        v
    };
    let options = AttentionOptions { causal: true, scale: None, seq_lens: Some(vec![full, len]) };
    let run = |pad: f32| {
        let t = |seed| Tensor::from_f32(&host(seed, pad), &shape, DType::BF16, device).unwrap();
        let (q, k, v, d_o) = (t(31), t(32), t(33), t(34));
        let fwd = attention(&q, &k, &v, &options).unwrap();
        let grads = attention_backward(&q, &k, &v, &fwd, &d_o, &options).unwrap();
        [
            fwd.o.to_vec_f32().unwrap(),
            grads.dq.to_vec_f32().unwrap(),
            grads.dk.to_vec_f32().unwrap(),
            grads.dv.to_vec_f32().unwrap(),
        ]
    };
    let (clean, dirty) = (run(0.0), run(f32::NAN));
    for (name, (c, d)) in ["o", "dq", "dk", "dv"].iter().zip(clean.iter().zip(&dirty)) {
        let same = c.iter().zip(d).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{device} {name}: NaN in the padding changed the result");
        assert!(c[(full + len) * heads * dim..].iter().all(|&x| x == 0.0), "{device} {name}: padding rows are zero");
    }
}

fn bad_input_is_an_error(device: &Device) {
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, device).unwrap();
    let o = AttentionOptions::default();
    assert!(
        matches!(attention(&t(&[1, 2, 3, 8]), &t(&[1, 2, 2, 8]), &t(&[1, 2, 2, 8]), &o), Err(Error::Shape(_))),
        "3 heads over 2"
    );
    assert!(matches!(attention(&t(&[1, 2, 2, 8]), &t(&[1, 2, 2, 4]), &t(&[1, 2, 2, 4]), &o), Err(Error::Shape(_))));
    assert!(matches!(
        attention(&t(&[1, 2, 2, 300]), &t(&[1, 2, 2, 300]), &t(&[1, 2, 2, 300]), &o),
        Err(Error::Shape(_))
    ));
    let lens = AttentionOptions { seq_lens: Some(vec![1, 2]), ..Default::default() };
    assert!(matches!(attention(&t(&[1, 2, 2, 8]), &t(&[1, 2, 2, 8]), &t(&[1, 2, 2, 8]), &lens), Err(Error::Shape(_))));
    let h = Tensor::zeros(&[1, 2, 2, 8], DType::BF16, device).unwrap();
    assert!(matches!(attention(&t(&[1, 2, 2, 8]), &h, &h, &o), Err(Error::DType(_))));
    if !device.is_cpu() {
        let c = Tensor::zeros(&[1, 2, 2, 8], DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros(&[1, 2, 2, 8], DType::F32, device).unwrap();
        assert!(matches!(attention(&c, &g, &g, &o), Err(Error::DeviceMismatch(_))));
    }
}

fn backward_matches_finite_differences_on_every_device(device: &Device) {
    use kiln::ops::attention::attention_backward;
    for (causal, lens) in [(true, None), (false, Some(vec![5, 3])), (true, Some(vec![4, 2]))] {
        let c = Case { batch: 2, q_len: 3, kv_len: 5, heads: 4, kv_heads: 2, dim: 8, causal, dtype: DType::F32 };
        let qs = [c.batch, c.q_len, c.heads, c.dim];
        let ks = [c.batch, c.kv_len, c.kv_heads, c.dim];
        let q = Tensor::randn(&qs, 0.0, 1.0, 11, DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::randn(&ks, 0.0, 1.0, 12, DType::F32, &Device::Cpu).unwrap();
        let v = Tensor::randn(&ks, 0.0, 1.0, 13, DType::F32, &Device::Cpu).unwrap();
        let r = Tensor::randn(&qs, 0.0, 1.0, 14, DType::F32, &Device::Cpu).unwrap();
        let wide = |t: &Tensor| t.to_vec::<f32>().unwrap().into_iter().map(|x| x as f64).collect::<Vec<f64>>();
        let (q64, k64, v64, r64) = (wide(&q), wide(&k), wide(&v), wide(&r));
        let full_lens = lens.clone().unwrap_or(vec![usize::MAX; c.batch]);
        // L = Σ O ⊙ R, so dL/dO = R.
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            reference64(&c, q, k, v, &full_lens).0.iter().zip(&r64).map(|(o, r)| o * r).sum()
        };
        let fd = |which: usize| -> Vec<f64> {
            let base = [&q64, &k64, &v64];
            (0..base[which].len())
                .map(|i| {
                    let h = 1e-5;
                    let (mut up, mut down): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                        (base.iter().map(|x| x.to_vec()).collect(), base.iter().map(|x| x.to_vec()).collect());
                    up[which][i] += h;
                    down[which][i] -= h;
                    (loss(&up[0], &up[1], &up[2]) - loss(&down[0], &down[1], &down[2])) / (2.0 * h)
                })
                .collect()
        };
        let want = [fd(0), fd(1), fd(2)];
        let options = AttentionOptions { causal, scale: None, seq_lens: lens.clone() };
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let (q, k, v) = (on(&q), on(&k), on(&v));
        let fwd = attention(&q, &k, &v, &options).unwrap();
        let grads = attention_backward(&q, &k, &v, &fwd, &on(&r), &options).unwrap();
        for (name, got, want) in [("dq", &grads.dq, &want[0]), ("dk", &grads.dk, &want[1]), ("dv", &grads.dv, &want[2])]
        {
            let got = got.to_vec::<f32>().unwrap();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-3 * (1.0 + w.abs()),
                    "{device} causal {causal} {lens:?} {name}[{i}]: {g} vs {w}"
                );
            }
        }
    }
}

/// The backward pass in half precision against an f64 backward of the same (rounded)
/// inputs, across the tensor-core kernels' 64-row and 64-key tiles. Tolerances: f32
/// accumulation over each gradient's terms, and on CUDA one rounding of p and of dS to the
/// half type (mma operands) and of O (through D = rowsum(dO ⊙ O)).
fn half_precision_backward_matches_f64(device: &Device) {
    use kiln::ops::attention::attention_backward;
    for (q_len, kv_len, dim, causal, dtype) in
        [(66, 66, 64, true, DType::BF16), (40, 66, 128, true, DType::F16), (66, 40, 64, false, DType::BF16)]
    {
        let (batch, heads, kv_heads) = (2, 2, 2);
        let qs = [batch, q_len, heads, dim];
        let ks = [batch, kv_len, kv_heads, dim];
        let cpu = Device::Cpu;
        let q = Tensor::randn(&qs, 0.0, 1.0, 21, dtype, &cpu).unwrap();
        let k = Tensor::randn(&ks, 0.0, 1.0, 22, dtype, &cpu).unwrap();
        let v = Tensor::randn(&ks, 0.0, 1.0, 23, dtype, &cpu).unwrap();
        let d_o = Tensor::randn(&qs, 0.0, 1.0, 24, dtype, &cpu).unwrap();
        let wide = |t: &Tensor| t.to_vec_f32().unwrap().into_iter().map(|x| x as f64).collect::<Vec<f64>>();
        let (qv, kv, vv, dov) = (wide(&q), wide(&k), wide(&v), wide(&d_o));
        let scale = 1.0 / (dim as f64).sqrt();
        let d = dim;
        let qa = |b: usize, i: usize, h: usize| ((b * q_len + i) * heads + h) * d;
        let ka = |b: usize, j: usize, h: usize| ((b * kv_len + j) * kv_heads + h) * d;
        let visible = |i: usize| if causal { (i + kv_len).saturating_sub(q_len) + 1 } else { kv_len };
        let (mut dq, mut dk, mut dv) = (vec![0f64; qv.len()], vec![0f64; kv.len()], vec![0f64; vv.len()]);
        let (mut mq, mut mk, mut mv) = (vec![0f64; qv.len()], vec![0f64; kv.len()], vec![0f64; vv.len()]);
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..q_len {
                    let end = visible(i).min(kv_len);
                    let dot =
                        |x: &[f64], xa: usize, y: &[f64], ya: usize| (0..d).map(|c| x[xa + c] * y[ya + c]).sum::<f64>();
                    let s: Vec<f64> = (0..end).map(|j| dot(&qv, qa(b, i, h), &kv, ka(b, j, h)) * scale).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                    // O, then D = dO·O and |dO|·|O| for the tolerance.
                    let o: Vec<f64> = (0..d).map(|c| (0..end).map(|j| p[j] * vv[ka(b, j, h) + c]).sum()).collect();
                    let dd: f64 = (0..d).map(|c| dov[qa(b, i, h) + c] * o[c]).sum();
                    let dd_abs: f64 = (0..d).map(|c| (dov[qa(b, i, h) + c] * o[c]).abs()).sum();
                    for j in 0..end {
                        let dp = dot(&dov, qa(b, i, h), &vv, ka(b, j, h));
                        let dp_abs: f64 = (0..d).map(|c| (dov[qa(b, i, h) + c] * vv[ka(b, j, h) + c]).abs()).sum();
                        let ds = p[j] * (dp - dd);
                        let ds_mass = p[j] * (dp_abs + dd_abs);
                        for c in 0..d {
                            dq[qa(b, i, h) + c] += scale * ds * kv[ka(b, j, h) + c];
                            mq[qa(b, i, h) + c] += scale * ds_mass * kv[ka(b, j, h) + c].abs();
                            dk[ka(b, j, h) + c] += scale * ds * qv[qa(b, i, h) + c];
                            mk[ka(b, j, h) + c] += scale * ds_mass * qv[qa(b, i, h) + c].abs();
                            dv[ka(b, j, h) + c] += p[j] * dov[qa(b, i, h) + c];
                            mv[ka(b, j, h) + c] += p[j] * dov[qa(b, i, h) + c].abs();
                        }
                    }
                }
            }
        }
        let options = AttentionOptions { causal, ..Default::default() };
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let (q, k, v) = (on(&q), on(&k), on(&v));
        let fwd = attention(&q, &k, &v, &options).unwrap();
        let grads = attention_backward(&q, &k, &v, &fwd, &on(&d_o), &options).unwrap();
        let half = match device {
            Device::Cuda(_) => 2.0 * dtype.unit_roundoff(),
            _ => 0.0,
        };
        // O itself carries the forward's error (its own output rounding included).
        let o_err = 2.0 * dtype.unit_roundoff();
        let steps = (q_len.max(kv_len) + dim) as f64;
        for (name, got, want, mass) in
            [("dq", &grads.dq, &dq, &mq), ("dk", &grads.dk, &dk, &mk), ("dv", &grads.dv, &dv, &mv)]
        {
            let extra = if name == "dv" { half } else { half + o_err };
            let atol: Vec<f64> = mass.iter().map(|m| (16.0 * steps * U32 + extra) * m).collect();
            let what = format!("{device} {name} q{q_len} kv{kv_len} d{dim} causal {causal} {dtype}");
            assert_close(&what, &got.to_vec::<f32>().unwrap(), want, &atol, DType::F32, 2.0);
        }
    }
}

device_tests!(
    forward_matches_naive_attention,
    padded_rows_give_what_the_unpadded_sequence_gives,
    whatever_padding_holds_never_reaches_real_rows,
    bad_input_is_an_error,
    backward_matches_finite_differences_on_every_device,
    half_precision_backward_matches_f64,
);

mod decode {
    use super::*;
    use kiln::ops::attention::{DECODE_SPLIT, DecodeOptions, KvCache, attention_decode};

    /// Sequences of different lengths (one past several splits) in one cache; each appends
    /// its newest `q_lens[b]` rows, then decodes them. Every row must equal the f64 causal
    /// attention of that sequence alone at its position; padding rows give zeros and −∞.
    #[allow(clippy::too_many_arguments)]
    fn check_decode(
        device: &Device,
        lens: &[usize],
        q_len: usize,
        q_lens: &[usize],
        heads: usize,
        kv_heads: usize,
        dim: usize,
        dtype: DType,
    ) {
        let batch = lens.len();
        let capacity = lens.iter().max().unwrap() + 5;
        let cpu = Device::Cpu;
        let host = |t: &Tensor| t.to_vec_f32().unwrap();
        // The whole of every sequence's keys and values, padded to the longest.
        let longest = *lens.iter().max().unwrap();
        let k_all = Tensor::randn(&[batch, longest, kv_heads, dim], 0.0, 1.0, 11, dtype, &cpu).unwrap();
        let v_all = Tensor::randn(&[batch, longest, kv_heads, dim], 0.0, 1.0, 12, dtype, &cpu).unwrap();
        let q = Tensor::randn(&[batch, q_len, heads, dim], 0.0, 1.0, 13, dtype, &cpu).unwrap();
        let (kh, vh, qh) = (host(&k_all), host(&v_all), host(&q));
        let row = kv_heads * dim;
        // Rows [from, to) of every sequence as an append batch [batch, n, kv_heads, dim].
        let rows_of = |all: &[f32], from: &[usize], to: &[usize]| -> (Tensor, Vec<usize>) {
            let n = from.iter().zip(to).map(|(f, t)| t - f).max().unwrap().max(1);
            let mut out = vec![0f32; batch * n * row];
            for b in 0..batch {
                let src = &all[(b * longest + from[b]) * row..(b * longest + to[b]) * row];
                out[b * n * row..b * n * row + src.len()].copy_from_slice(src);
            }
            let counts = from.iter().zip(to).map(|(f, t)| t - f).collect();
            (Tensor::from_f32(&out, &[batch, n, kv_heads, dim], dtype, &cpu).unwrap(), counts)
        };
        let prefix: Vec<usize> = lens.iter().zip(q_lens).map(|(l, q)| l - q).collect();
        let zero = vec![0; batch];
        let mut cache = KvCache::new(batch, capacity, kv_heads, dim, dtype, device).unwrap();
        // The prompt first, then the new tokens: two appends, as a server does.
        for (from, to) in [(&zero, &prefix), (&prefix, &lens.to_vec())] {
            let (k_new, counts) = rows_of(&kh, from, to);
            let (v_new, _) = rows_of(&vh, from, to);
            cache.append(&k_new.to_device(device).unwrap(), &v_new.to_device(device).unwrap(), Some(&counts)).unwrap();
        }
        assert_eq!(cache.lens(), lens);
        let options = DecodeOptions { scale: None, q_lens: Some(q_lens.to_vec()) };
        let out = attention_decode(&q.to_device(device).unwrap(), &cache, &options).unwrap();
        assert_eq!((out.o.shape(), out.o.dtype()), (&[batch, q_len, heads, dim][..], dtype));
        let (o, lse) = (host(&out.o), out.lse.to_vec::<f32>().unwrap());
        for b in 0..batch {
            // Sequence b alone: its q_lens[b] rows against its lens[b] keys, causal.
            let c = Case { batch: 1, q_len: q_lens[b], kv_len: lens[b], heads, kv_heads, dim, causal: true, dtype };
            let qb: Vec<f32> = qh[b * q_len * heads * dim..][..q_lens[b] * heads * dim].to_vec();
            let kb = &kh[b * longest * row..][..lens[b] * row];
            let vb = &vh[b * longest * row..][..lens[b] * row];
            let (want_o, want_lse, mass) = reference(&c, &qb, kb, vb, &[usize::MAX]);
            let steps = (lens[b] + dim) as f64;
            let atol: Vec<f64> = mass.iter().map(|m| 16.0 * steps * U32 * (m + 1e-30)).collect();
            let what =
                format!("{device} decode seq {b} of {lens:?} q_lens {q_lens:?} h{heads}/{kv_heads} d{dim} {dtype}");
            let got = &o[b * q_len * heads * dim..][..q_lens[b] * heads * dim];
            assert_close(&format!("{what} o"), got, &want_o, &atol, dtype, 2.0);
            let pad = &o[(b * q_len + q_lens[b]) * heads * dim..(b + 1) * q_len * heads * dim];
            assert!(pad.iter().all(|&x| x == 0.0), "{what}: padding rows must be zeros");
            for h in 0..heads {
                for i in 0..q_len {
                    let g = lse[(b * heads + h) * q_len + i];
                    if i >= q_lens[b] {
                        assert!(g == f32::NEG_INFINITY, "{what}: padding lse {g}");
                    } else {
                        let w = want_lse[h * q_lens[b] + i];
                        let tol = 16.0 * steps * U32 * (1.0 + w.abs());
                        assert!((g as f64 - w).abs() <= tol, "{what} lse h{h} i{i}: {g} vs {w}");
                    }
                }
            }
        }
    }

    fn decode_equals_the_last_rows_of_full_attention(device: &Device) {
        let long = 8 * DECODE_SPLIT + 37;
        for (dim, dtype) in [(64, DType::F32), (80, DType::BF16), (128, DType::F16), (33, DType::F32)] {
            check_decode(device, &[1, 300, long], 1, &[1, 1, 1], 8, 2, dim, dtype);
        }
        // A few new tokens per sequence, a different number for each, GQA ratios 1 and 8.
        check_decode(device, &[7, long, 260], 3, &[3, 1, 2], 4, 4, 64, DType::F32);
        check_decode(device, &[5, DECODE_SPLIT], 4, &[4, 4], 8, 1, 96, DType::BF16);
    }

    fn the_cache_appends_in_place_and_refuses_what_does_not_fit(device: &Device) {
        let mut cache = KvCache::new(2, 4, 1, 2, DType::F32, device).unwrap();
        let new = |n: usize, v: f32| Tensor::full(&[2, n, 1, 2], v, DType::F32, device).unwrap();
        cache.append(&new(3, 1.0), &new(3, 2.0), Some(&[3, 1])).unwrap();
        let shared = cache.k().clone();
        cache.append(&new(1, 5.0), &new(1, 6.0), None).unwrap();
        assert_eq!(cache.lens(), &[4, 2]);
        let k = cache.k().to_vec::<f32>().unwrap();
        assert_eq!(k, [1., 1., 1., 1., 1., 1., 5., 5., 1., 1., 5., 5., 0., 0., 0., 0.], "{device}");
        // A tensor taken from the cache earlier keeps its values.
        assert_eq!(shared.to_vec::<f32>().unwrap()[6..10], [0., 0., 1., 1.], "{device}");
        // Past the capacity: an error, and nothing written.
        match cache.append(&new(1, 9.0), &new(1, 9.0), None) {
            Err(Error::Shape(m)) => assert!(m.contains("sequence 0"), "{m}"),
            other => panic!("expected a capacity error, got {other:?}"),
        }
        assert_eq!(cache.lens(), &[4, 2]);
        assert_eq!(cache.k().to_vec::<f32>().unwrap(), k);
        let wrong = Tensor::full(&[2, 1, 1, 3], 0.0, DType::F32, device).unwrap();
        assert!(matches!(cache.append(&wrong, &wrong, None), Err(Error::Shape(_))));
        let half = Tensor::full(&[2, 1, 1, 2], 0.0, DType::BF16, device).unwrap();
        assert!(matches!(cache.append(&half, &half, None), Err(Error::DType(_))));
        assert!(cache.append(&new(2, 0.0), &new(2, 0.0), Some(&[0, 3])).is_err());
        cache.truncate(0, 1).unwrap();
        assert_eq!(cache.lens(), &[1, 2]);
        assert!(cache.truncate(1, 3).is_err() && cache.truncate(2, 0).is_err());
        assert!(KvCache::new(1, 8, 1, 300, DType::F32, device).is_err());
    }

    #[test]
    fn decode_rejects_what_does_not_fit_the_cache() {
        let cpu = Device::Cpu;
        let mut cache = KvCache::new(2, 8, 2, 4, DType::F32, &cpu).unwrap();
        let kv = Tensor::full(&[2, 2, 2, 4], 0.5, DType::F32, &cpu).unwrap();
        cache.append(&kv, &kv, None).unwrap();
        let q = |b: usize, n: usize, h: usize, d: usize| Tensor::zeros(&[b, n, h, d], DType::F32, &cpu).unwrap();
        let plain = DecodeOptions::default();
        assert!(matches!(attention_decode(&q(3, 1, 4, 4), &cache, &plain), Err(Error::Shape(_))));
        assert!(matches!(attention_decode(&q(2, 1, 3, 4), &cache, &plain), Err(Error::Shape(_))));
        assert!(matches!(attention_decode(&q(2, 1, 4, 5), &cache, &plain), Err(Error::Shape(_))));
        // More query rows than cached rows, or a q_lens vector of the wrong length.
        assert!(matches!(attention_decode(&q(2, 3, 4, 4), &cache, &plain), Err(Error::Shape(_))));
        let wrong = DecodeOptions { scale: None, q_lens: Some(vec![1]) };
        assert!(matches!(attention_decode(&q(2, 1, 4, 4), &cache, &wrong), Err(Error::Shape(_))));
        let half = Tensor::zeros(&[2, 1, 4, 4], DType::BF16, &cpu).unwrap();
        assert!(matches!(attention_decode(&half, &cache, &plain), Err(Error::DType(_))));
    }

    device_tests!(
        decode_equals_the_last_rows_of_full_attention,
        the_cache_appends_in_place_and_refuses_what_does_not_fit
    );
}
