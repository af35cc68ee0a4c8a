//! Rotary embeddings: the CPU against a naive f64 reference and against transformers' and
//! Meta's own code (tests/fixtures/make_rope.py), every other device against the CPU, the
//! layouts' relation through llama.cpp's q/k permutation, the backward against finite
//! differences, and the errors.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::rope::{RopeConfig, RopeLayout, RopeScaling, rope, rope_backward};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// Llama 3.1's scaling.
const LLAMA31: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

fn positions(pos: &[u32], batch: usize, seq: usize, device: &Device) -> Tensor {
    Tensor::from_slice(pos, &[batch, seq], device).unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().unwrap().into_iter().map(|v| v as f64).collect()
}

/// The contract computed naively in f64 from x as stored: angles are the f32 products
/// f32(position) · inv_freq (what transformers computes), rotated exactly. Returns the
/// result and, per element, the absolute tolerance of f32 arithmetic: cos and sin within 2
/// ulp of 1 and the rotation's roundings, relative to |a| + |b| of the element's pair.
fn reference(x: &[f64], shape: &[usize], pos: &[u32], cfg: &RopeConfig, backward: bool) -> (Vec<f64>, Vec<f64>) {
    let (heads, head_dim) = (shape[2], shape[3]);
    let inv = cfg.inv_freq(head_dim).unwrap();
    let half = inv.len();
    let rot = 2 * half;
    let mut want = x.to_vec();
    let mut atol = vec![0.0; x.len()];
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for (i, &f) in inv.iter().enumerate() {
                let angle = ((p as f32) * f) as f64;
                let (sin, cos) = angle.sin_cos();
                let sin = if backward { -sin } else { sin };
                let (ia, ib) = match cfg.layout {
                    RopeLayout::HalfSplit => (base + i, base + i + half),
                    RopeLayout::Interleaved => (base + 2 * i, base + 2 * i + 1),
                };
                let (a, b) = (x[ia], x[ib]);
                want[ia] = a * cos - b * sin;
                want[ib] = b * cos + a * sin;
                let tol = 6.0 * U32 * (a.abs() + b.abs());
                atol[ia] = tol;
                atol[ib] = tol;
            }
            assert!(rot <= head_dim);
        }
    }
    (want, atol)
}

/// Runs `rope` (or its backward) on `device`; on the CPU checks it against the reference,
/// elsewhere against the CPU.
fn check(device: &Device, what: &str, x: &Tensor, pos: &[u32], cfg: &RopeConfig, backward: bool) {
    let shape = x.shape().to_vec();
    let (batch, seq) = (shape[0], shape[1]);
    let run = |d: &Device| {
        let x = x.to_device(d).unwrap();
        let p = positions(pos, batch, seq, d);
        if backward { rope_backward(&x, &p, cfg) } else { rope(&x, &p, cfg) }.unwrap()
    };
    let cpu = run(&Device::Cpu);
    assert_eq!((cpu.shape(), cpu.dtype()), (&shape[..], x.dtype()), "{what}");
    let (want, atol) = reference(&host(x), &shape, pos, cfg, backward);
    let cpu_out = cpu.to_vec_f32().unwrap();
    if device.is_cpu() {
        assert_close(&format!("cpu {what}"), &cpu_out, &want, &atol, x.dtype(), 1.0);
        return;
    }
    let got = run(device);
    assert_eq!((got.shape(), got.dtype()), (&shape[..], x.dtype()), "{device} {what}");
    let cpu_ref: Vec<f64> = cpu_out.iter().map(|&v| v as f64).collect();
    let atol2: Vec<f64> = atol.iter().map(|t| 2.0 * t).collect();
    assert_close(
        &format!("{device} {what}"),
        &got.to_vec_f32().unwrap(),
        &cpu_ref,
        &atol2,
        x.dtype(),
        BACKEND_ROUNDINGS,
    );
}

fn configs() -> impl Strategy<Value = (f64, RopeLayout, RopeScaling)> {
    let theta = prop::sample::select(vec![10000.0, 500000.0, 100000.0, 1e6, 1234.5]);
    let layout = prop::sample::select(vec![RopeLayout::HalfSplit, RopeLayout::Interleaved]);
    let scaling = prop::sample::select(vec![
        RopeScaling::None,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Linear { factor: 2.5 },
        LLAMA31,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    ]);
    (theta, layout, scaling)
}

/// Positions: small, up to 100000, or anywhere in u32 (float32 rounds those past 2²⁴).
fn position_values(n: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(prop_oneof![4 => 0u32..8192, 4 => 0u32..=100_000, 1 => any::<u32>()], n)
}

fn rope_matches_reference(device: &Device) {
    let dims = prop::sample::select(vec![2usize, 6, 14, 64, 128]);
    let shapes = (
        prop::sample::select(vec![1usize, 2, 3]),
        prop::sample::select(vec![1usize, 2, 5, 7]),
        prop::sample::select(vec![1usize, 3, 9]),
        dims,
    );
    let cases =
        (shapes, configs(), prop::sample::select(DType::ALL.to_vec()), any::<u64>(), any::<bool>(), 0.0f64..1.0)
            .prop_flat_map(|(s, c, d, seed, partial, frac)| {
                (Just((s, c, d, seed, partial, frac)), position_values(s.0 * s.1))
            });
    proptest!(common::cases(32), |((((batch, seq, heads, head_dim), (theta, layout, scaling), dtype, seed, partial, frac), pos) in cases)| {
        // A partial rotary dimension: any even value in 2..=head_dim.
        let rot = if partial { 2 * (1 + ((head_dim / 2 - 1) as f64 * frac) as usize) } else { head_dim };
        let cfg = RopeConfig { theta, rotary_dim: Some(rot), layout, scaling };
        let x = Tensor::randn(&[batch, seq, heads, head_dim], 0.0, 1.0, seed, dtype, &Device::Cpu).unwrap();
        for backward in [false, true] {
            let what = format!("{} [{batch}, {seq}, {heads}, {head_dim}] rot {rot} {dtype} {cfg:?} at {pos:?}",
                if backward { "rope_backward" } else { "rope" });
            check(device, &what, &x, &pos, &cfg, backward);
        }
    });
}

/// The shapes real models use: SmolLM2 (9 heads × 64, θ 10⁵), Llama 3.1 (32 × 128, llama3
/// scaling), a partial rotary dim, decoding one token at a large offset.
fn rope_matches_reference_at_model_shapes(device: &Device) {
    let smol = RopeConfig::new(100000.0);
    let llama = RopeConfig::new(500000.0).with_scaling(LLAMA31);
    let cases: [(&[usize], RopeConfig, u32); 5] = [
        (&[1, 17, 9, 64], smol, 0),
        (&[1, 17, 9, 64], smol.interleaved(), 90000),
        (&[2, 5, 32, 128], llama, 100),
        (&[1, 3, 4, 128], llama.with_rotary_dim(32), 7),
        (&[3, 1, 32, 128], llama, 99_990),
    ];
    // Heads past the kernels' tables and by-value frequencies: CUDA carries 256 frequencies
    // in the launch and tables 1024 at a time, WGSL tables 512 and computes the rest per
    // element.
    let long = RopeConfig::new(10000.0);
    let long_cases: [(&[usize], RopeConfig, u32); 4] = [
        (&[1, 3, 2, 600], long, 5),
        (&[1, 3, 2, 2100], long, 50_000),
        (&[2, 2, 1, 2100], long.interleaved().with_rotary_dim(2060), 1),
        (&[1, 2, 3, 1030], long.with_rotary_dim(1026), 99_000),
    ];
    for (shape, cfg, start) in cases.into_iter().chain(long_cases) {
        let tokens = shape[0] * shape[1];
        let pos: Vec<u32> = (0..tokens as u32).map(|t| start + 3 * t).collect();
        for dtype in DType::ALL {
            let x = Tensor::randn(shape, 0.0, 1.0, 7, dtype, &Device::Cpu).unwrap();
            check(device, &format!("{shape:?} {dtype} {cfg:?}"), &x, &pos, &cfg, false);
        }
    }
}

/// transformers (HalfSplit: default, linear, llama3, partial rotary) and Meta's llama code
/// (Interleaved): the inverse frequencies within one ulp (torch's vectorised pow can miss
/// the correctly rounded value kiln takes), and the outputs within the f32 roundings plus
/// what a one-ulp frequency difference turns into at each position.
fn rope_matches_transformers(device: &Device) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rope.safetensors");
    let file = kiln::io::SafetensorsFile::open(path).unwrap();
    let x = file.tensor("x", &Device::Cpu).unwrap();
    let pos: Vec<u32> = file.tensor("positions", &Device::Cpu).unwrap().to_vec().unwrap();
    let head_dim = x.shape()[3];
    let cases = [
        ("default", RopeConfig::new(10000.0)),
        ("linear", RopeConfig::new(10000.0).with_scaling(RopeScaling::Linear { factor: 4.0 })),
        ("llama3", RopeConfig::new(500000.0).with_scaling(LLAMA31)),
        ("partial", RopeConfig::new(10000.0).with_rotary_dim(16)),
        ("interleaved", RopeConfig::new(10000.0).interleaved()),
    ];
    for (name, cfg) in cases {
        let theirs: Vec<f32> = file.tensor(&format!("{name}.inv_freq"), &Device::Cpu).unwrap().to_vec().unwrap();
        let ours = cfg.inv_freq(head_dim).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let mut freq_diff = vec![0.0f64; ours.len()];
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps <= 1, "{name}: inv_freq[{i}] {a} vs transformers' {b}");
            freq_diff[i] = (*a as f64 - *b as f64).abs();
        }
        // Where the frequencies differ, the angles differ by position · Δf (after the same
        // f32 rounding, up to one ulp of the angle more).
        let want = host(&file.tensor(&format!("{name}.out"), &Device::Cpu).unwrap());
        let xs = host(&x);
        let (_, mut atol) = reference(&xs, x.shape(), &pos, &cfg, false);
        let (heads, half) = (x.shape()[2], ours.len());
        for (t, &p) in pos.iter().enumerate() {
            let pf = p as f32 as f64;
            for h in 0..heads {
                let base = (t * heads + h) * head_dim;
                for (i, d) in freq_diff.iter().enumerate() {
                    if *d == 0.0 {
                        continue;
                    }
                    let angle = pf * ours[i] as f64;
                    let delta = pf * d + 2.0 * U32 * angle;
                    let (ia, ib) = match cfg.layout {
                        RopeLayout::HalfSplit => (base + i, base + i + half),
                        RopeLayout::Interleaved => (base + 2 * i, base + 2 * i + 1),
                    };
                    let extra = delta * (xs[ia].abs() + xs[ib].abs());
                    atol[ia] += extra;
                    atol[ib] += extra;
                }
            }
        }
        // Both sides round in f32: twice the reference's allowance.
        let atol: Vec<f64> = atol.iter().map(|t| 2.0 * t).collect();
        let got = rope(&x.to_device(device).unwrap(), &positions(&pos, 2, 4, device), &cfg).unwrap();
        assert_close(
            &format!("{device} {name} vs transformers"),
            &got.to_vec_f32().unwrap(),
            &want,
            &atol,
            DType::F32,
            BACKEND_ROUNDINGS,
        );
        let exact = freq_diff.iter().filter(|d| **d == 0.0).count();
        println!("{device} {name}: {exact} of {} inverse frequencies equal transformers' bit for bit", ours.len());
    }
}

/// kiln's inverse frequencies against the formulas in f64: 1/θ^(2i/rot) within the f32
/// roundings of the exponent (relative 2i/rot · ln θ · u) and of the power and reciprocal.
fn inv_freq_follows_the_formulas(device: &Device) {
    if !device.is_cpu() {
        return; // host arithmetic
    }
    for theta in [10000.0f64, 500000.0, 1e6, 3.5] {
        for rot in [2usize, 6, 16, 64, 128, 256] {
            let inv = RopeConfig::new(theta).inv_freq(rot).unwrap();
            for (i, &f) in inv.iter().enumerate() {
                let e = 2.0 * i as f64 / rot as f64;
                let want = 1.0 / theta.powf(e);
                let tol = want * U32 * (e * theta.ln() + 3.0);
                assert!((f as f64 - want).abs() <= tol, "θ {theta} rot {rot} i {i}: {f} vs {want}");
            }
            let linear =
                RopeConfig::new(theta).with_scaling(RopeScaling::Linear { factor: 8.0 }).inv_freq(rot).unwrap();
            assert!(linear.iter().zip(&inv).all(|(l, f)| *l == f / 8.0), "linear 8 divides by 8 exactly");
        }
    }
    // Llama 3.1: high frequencies kept, low ones divided by 8, the medium band between.
    let base = RopeConfig::new(500000.0).inv_freq(128).unwrap();
    let scaled = RopeConfig::new(500000.0).with_scaling(LLAMA31).inv_freq(128).unwrap();
    for (f, s) in base.iter().zip(&scaled) {
        // The rule in f64 (transformers' in f32 sits within its roundings).
        let (f, s) = (*f as f64, *s as f64);
        let wavelen = std::f64::consts::TAU / f;
        let smooth = ((8192.0 / wavelen - 1.0) / 3.0).clamp(0.0, 1.0);
        let want = (1.0 - smooth) * f / 8.0 + smooth * f;
        assert!((s - want).abs() <= 8.0 * U32 * want, "{s} vs {want} at wavelength {wavelen}");
    }
}

/// llama.cpp's converter permutes each head's q/k rows so that HF's half-split pairs (i,
/// i + d/2) become adjacent (2i, 2i + 1): `reshape(n_head, 2, d/2, ..).swapaxes(1, 2)`.
/// HalfSplit rope on x equals un-permuting Interleaved rope on the permuted x, bit for bit.
fn layouts_agree_through_llama_cpp_permutation(device: &Device) {
    for (heads, head_dim, rotary_dim) in [(3, 64, None), (2, 128, None), (1, 6, None)] {
        let (batch, seq) = (2, 3);
        let x = Tensor::randn(&[batch, seq, heads, head_dim], 0.0, 1.0, 5, DType::F32, &Device::Cpu).unwrap();
        let pos = positions(&[0, 7, 100_000, 3, 4, 65_537], batch, seq, device);
        // permuted[2i + s] = x[s · d/2 + i]
        let permute = |v: &[f32], forward: bool| -> Vec<f32> {
            let mut out = v.to_vec();
            for (o, r) in out.chunks_mut(head_dim).zip(v.chunks(head_dim)) {
                for s in 0..2 {
                    for i in 0..head_dim / 2 {
                        let (gguf, hf) = (2 * i + s, s * head_dim / 2 + i);
                        if forward { o[gguf] = r[hf] } else { o[hf] = r[gguf] }
                    }
                }
            }
            out
        };
        let xv = x.to_vec::<f32>().unwrap();
        let xp = Tensor::from_slice(&permute(&xv, true), x.shape(), device).unwrap();
        let cfg = RopeConfig { rotary_dim, ..RopeConfig::new(10000.0) };
        let half_split = rope(&x.to_device(device).unwrap(), &pos, &cfg).unwrap().to_vec::<f32>().unwrap();
        let interleaved = rope(&xp, &pos, &cfg.interleaved()).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(permute(&interleaved, false), half_split, "{device} heads {heads} head_dim {head_dim}");
    }
}

/// rope_backward ∘ rope is the identity up to f32 roundings (two rotations).
fn backward_undoes_forward(device: &Device) {
    let cfg = RopeConfig::new(500000.0).with_scaling(LLAMA31).with_rotary_dim(48);
    let (batch, seq, heads, head_dim) = (2, 5, 3, 64);
    let x = Tensor::randn(&[batch, seq, heads, head_dim], 0.0, 1.0, 9, DType::F32, device).unwrap();
    let pos = positions(&[0, 1, 2, 3, 100_000, 11, 4095, 8191, 65_536, 99_999], batch, seq, device);
    let y = rope(&x, &pos, &cfg).unwrap();
    let back = rope_backward(&y, &pos, &cfg).unwrap().to_vec_f32().unwrap();
    let xs = host(&x);
    // Each rotation's error is within 6u (|a| + |b|) of its pair.
    let largest = xs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let atol: Vec<f64> = xs.iter().map(|v| 24.0 * U32 * (v.abs() + largest)).collect();
    assert_close(&format!("{device} backward ∘ forward"), &back, &xs, &atol, DType::F32, 1.0);
    // Features past rotary_dim pass through both ways unchanged.
    let yv = y.to_vec_f32().unwrap();
    for (i, (a, b)) in yv.iter().zip(x.to_vec_f32().unwrap()).enumerate() {
        if i % head_dim >= 48 {
            assert_eq!(*a, b, "{device} pass-through feature {i}");
        }
    }
}

/// The backward against central differences in f64 of L(x) = Σ w ⊙ rope(x) on the CPU
/// (rope is linear in x, so the differences carry only the forward's roundings).
fn backward_matches_finite_differences(device: &Device) {
    if !device.is_cpu() {
        return; // the other devices' backward is checked against the CPU's
    }
    for cfg in [
        RopeConfig::new(10000.0).with_rotary_dim(4),
        RopeConfig::new(10000.0).interleaved(),
        RopeConfig::new(500000.0).with_scaling(LLAMA31),
    ] {
        let shape = [1, 3, 2, 6];
        let pos = positions(&[5, 1000, 99_999], 1, 3, device);
        let x = host(&Tensor::randn(&shape, 0.0, 1.0, 3, DType::F32, device).unwrap());
        let w = host(&Tensor::randn(&shape, 0.0, 1.0, 4, DType::F32, device).unwrap());
        let loss = |x: &[f64]| -> f64 {
            let xt = Tensor::from_f32(&x.iter().map(|v| *v as f32).collect::<Vec<_>>(), &shape, DType::F32, device);
            let y = host(&rope(&xt.unwrap(), &pos, &cfg).unwrap());
            y.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let dy =
            Tensor::from_f32(&w.iter().map(|v| *v as f32).collect::<Vec<_>>(), &shape, DType::F32, device).unwrap();
        let dx = host(&rope_backward(&dy, &pos, &cfg).unwrap());
        let h = 0.25;
        for j in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[j] += h;
            down[j] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h);
            let scale: f64 = w.iter().map(|v| v.abs()).sum::<f64>() * (x[j].abs() + 1.0);
            assert!(
                (fd - dx[j]).abs() <= 1e-5 * scale,
                "{cfg:?} element {j}: finite difference {fd}, backward {}",
                dx[j]
            );
        }
    }
}

fn rope_errors_are_clear(device: &Device) {
    let x = |shape: &[usize]| Tensor::zeros(shape, DType::F32, device).unwrap();
    let p = positions(&[0, 1, 2, 3, 4, 5], 2, 3, device);
    let ok = RopeConfig::default();
    let shape_err = |r: kiln::Result<Tensor>, what: &str| match r {
        Err(Error::Shape(m)) => assert!(m.contains(what), "{device}: {m:?} should name {what}"),
        other => panic!("{device}: {what}: expected Err(Shape), got {other:?}"),
    };
    shape_err(rope(&x(&[2, 3, 2, 7]), &p, &ok), "head_dim 7");
    shape_err(rope(&x(&[2, 3, 2, 8]), &p, &ok.with_rotary_dim(3)), "rotary_dim 3");
    shape_err(rope(&x(&[2, 3, 2, 8]), &p, &ok.with_rotary_dim(10)), "rotary_dim 10");
    shape_err(rope(&x(&[2, 3, 2, 8]), &p, &ok.with_rotary_dim(0)), "rotary_dim 0");
    shape_err(rope(&x(&[6, 2, 8]), &p, &ok), "[batch, seq, heads, head_dim]");
    shape_err(rope(&x(&[3, 2, 2, 8]), &p, &ok), "positions");
    shape_err(rope(&x(&[2, 3, 2, 8]), &positions(&[0; 6], 1, 6, device), &ok), "positions");
    let flat = Tensor::from_slice(&[0u32; 6], &[6], device).unwrap();
    shape_err(rope_backward(&x(&[2, 3, 2, 8]), &flat, &ok), "rope_backward: positions");
    let invalid = |cfg: RopeConfig, what: &str| match rope(&x(&[2, 3, 2, 8]), &p, &cfg) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(what), "{device}: {m:?} should name {what}"),
        other => panic!("{device}: {what}: expected Err(InvalidArgument), got {other:?}"),
    };
    for theta in [f64::NAN, 0.0, -1.0, f64::INFINITY, 1e39] {
        invalid(RopeConfig::new(theta), "theta");
    }
    for factor in [0.0, -2.0, f64::NAN] {
        invalid(ok.with_scaling(RopeScaling::Linear { factor }), "linear scaling factor");
    }
    let l3 = |factor, low_freq_factor, high_freq_factor, original_max_position_embeddings| {
        ok.with_scaling(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        })
    };
    invalid(l3(0.0, 1.0, 4.0, 8192), "llama3 factor");
    invalid(l3(8.0, 0.0, 4.0, 8192), "low_freq_factor");
    invalid(l3(8.0, 4.0, 4.0, 8192), "high_freq_factor");
    invalid(l3(8.0, 1.0, 4.0, 0), "original_max_position_embeddings");
    invalid(RopeConfig::new(1e-30), "past 2^64");
    let dtype_err = |r: kiln::Result<Tensor>, what: &str| match r {
        Err(Error::DType(m)) => assert!(m.contains(what), "{device}: {m:?} should name {what}"),
        other => panic!("{device}: {what}: expected Err(DType), got {other:?}"),
    };
    let f32_pos = Tensor::zeros(&[2, 3], DType::F32, device).unwrap();
    let i32_pos = Tensor::zeros(&[2, 3], DType::I32, device).unwrap();
    dtype_err(rope(&x(&[2, 3, 2, 8]), &f32_pos, &ok), "positions must be u32");
    dtype_err(rope(&x(&[2, 3, 2, 8]), &i32_pos, &ok), "positions must be u32");
    dtype_err(rope(&Tensor::zeros(&[2, 3, 2, 8], DType::U32, device).unwrap(), &p, &ok), "integers");
    // Empty dimensions give empty results.
    for shape in [[0, 3, 2, 8], [2, 3, 0, 8], [2, 3, 2, 0]] {
        let pos = positions(&vec![0; shape[0] * 3], shape[0], 3, device);
        assert_eq!(rope(&x(&shape), &pos, &ok).unwrap().shape(), &shape, "{device}");
    }
    if !device.is_cpu() {
        let cpu_pos = positions(&[0; 6], 2, 3, &Device::Cpu);
        assert!(matches!(rope(&x(&[2, 3, 2, 8]), &cpu_pos, &ok), Err(Error::DeviceMismatch(_))), "{device}");
    }
}

device_tests!(
    rope_matches_reference,
    rope_matches_reference_at_model_shapes,
    rope_matches_transformers,
    inv_freq_follows_the_formulas,
    layouts_agree_through_llama_cpp_permutation,
    backward_undoes_forward,
    backward_matches_finite_differences,
    rope_errors_are_clear,
);
