//! Attention forward against a naive f64 attention: sequence 1, odd lengths, q_len ≠ kv_len,
//! the tuned head dims and a generic one, GQA ratios 1, 4 and 8, causal or not, every dtype,
//! padded batches, fully masked rows and bad input.

mod common;

use common::{U32, assert_close, devices, gpu_devices};
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

fn check(c: &Case, lens: Option<Vec<usize>>) {
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
    for device in devices() {
        let out = attention(
            &q.to_device(&device).unwrap(),
            &k.to_device(&device).unwrap(),
            &v.to_device(&device).unwrap(),
            &options,
        )
        .unwrap();
        assert_eq!(out.o.shape(), &qs);
        let what = format!(
            "{device} b{} q{} kv{} h{}/{} d{} causal {} {}",
            c.batch, c.q_len, c.kv_len, c.heads, c.kv_heads, c.dim, c.causal, c.dtype
        );
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
}

#[test]
fn forward_matches_naive_attention() {
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
    for c in &cases {
        check(c, None);
    }
}

#[test]
fn padded_rows_give_what_the_unpadded_sequence_gives() {
    let c = Case { batch: 3, q_len: 7, kv_len: 7, heads: 2, kv_heads: 1, dim: 16, causal: true, dtype: DType::F32 };
    check(&c, Some(vec![7, 3, 0]));
    // Sequence 1 padded to 7 equals the same sequence alone at length 3.
    let q = Tensor::randn(&[1, 7, 2, 16], 0.0, 1.0, 4, DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::randn(&[1, 7, 1, 16], 0.0, 1.0, 5, DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::randn(&[1, 7, 1, 16], 0.0, 1.0, 6, DType::F32, &Device::Cpu).unwrap();
    let cut = |t: &Tensor, heads: usize| {
        let h = t.to_vec::<f32>().unwrap();
        Tensor::from_slice(&h[..3 * heads * 16], &[1, 3, heads, 16], &Device::Cpu).unwrap()
    };
    for device in devices() {
        let on = |t: &Tensor| t.to_device(&device).unwrap();
        let padded = attention(
            &on(&q),
            &on(&k),
            &on(&v),
            &AttentionOptions { causal: true, scale: None, seq_lens: Some(vec![3]) },
        )
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
}

#[test]
fn bad_input_is_an_error() {
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
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
    let h = Tensor::zeros(&[1, 2, 2, 8], DType::BF16, &Device::Cpu).unwrap();
    assert!(matches!(attention(&t(&[1, 2, 2, 8]), &h, &h, &o), Err(Error::DType(_))));
    for device in gpu_devices() {
        let g = Tensor::zeros(&[1, 2, 2, 8], DType::F32, &device).unwrap();
        assert!(matches!(attention(&t(&[1, 2, 2, 8]), &g, &g, &o), Err(Error::DeviceMismatch(_))));
    }
}

#[test]
fn backward_matches_finite_differences_on_every_device() {
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
        for device in devices() {
            let on = |t: &Tensor| t.to_device(&device).unwrap();
            let (q, k, v) = (on(&q), on(&k), on(&v));
            let fwd = attention(&q, &k, &v, &options).unwrap();
            let grads = attention_backward(&q, &k, &v, &fwd, &on(&r), &options).unwrap();
            for (name, got, want) in
                [("dq", &grads.dq, &want[0]), ("dk", &grads.dk, &want[1]), ("dv", &grads.dv, &want[2])]
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
}
