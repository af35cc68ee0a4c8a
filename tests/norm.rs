//! RMSNorm: the CPU against a naive f64 reference (forward, fused residual add, backward),
//! the backward against central finite differences in f64, every other device against the
//! CPU, dw's bits the same on every run, torch's numbers (tests/fixtures/make_norm_act.py),
//! and bad inputs refused.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::norm::{add_rms_norm, rms_norm, rms_norm_backward};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().unwrap().into_iter().map(|x| x as f64).collect()
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

/// Leading dimensions (rows kept small for lavapipe) and the normalised dimension: 1,
/// primes, and the widths of real models (SmolLM2's 576 and 1536, 2048, 4096).
fn shapes() -> impl Strategy<Value = Vec<usize>> {
    let lead = prop::sample::select(vec![vec![], vec![1], vec![3], vec![2, 3], vec![7]]);
    let d = prop::sample::select(vec![1usize, 2, 7, 31, 64, 127, 576, 1536, 2048, 4096]);
    (lead, d).prop_map(|(mut lead, d)| {
        lead.push(d);
        lead
    })
}

/// y and rstd of the f64 reference, from the values as stored.
fn reference_forward(x: &[f64], w: &[f64], d: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = Vec::new();
    for row in x.chunks(d) {
        let s = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        rstd.push(s);
        y.extend(row.iter().zip(w).map(|(v, wj)| v * s * wj));
    }
    (y, rstd)
}

/// Error bounds of the f32 forward, relative to |y| and rstd: Σx² over d positive terms
/// in any order (d·u, halved by the square root), the mean, eps, the root and the
/// reciprocal (3u), then x·rstd·w (2u).
fn forward_atol(want: &[f64], d: usize) -> Vec<f64> {
    want.iter().map(|v| U32 * (d as f64 / 2.0 + 6.0) * v.abs()).collect()
}

struct Inputs {
    x: Tensor,
    w: Tensor,
}

fn inputs(shape: &[usize], xt: DType, wt: DType, seed: u64) -> Inputs {
    let d = *shape.last().unwrap();
    Inputs {
        x: Tensor::randn(shape, 0.5, 2.0, seed, xt, &Device::Cpu).unwrap(),
        w: Tensor::randn(&[d], 1.0, 0.5, seed ^ 0x5eed, wt, &Device::Cpu).unwrap(),
    }
}

/// Checks a device's output against the CPU's: twice the CPU's bound plus the roundings a
/// backend may take either way.
fn against_cpu(what: &str, got: &Tensor, cpu: &Tensor, atol: &[f64]) {
    assert_eq!(got.shape(), cpu.shape(), "{what}");
    assert_eq!(got.dtype(), cpu.dtype(), "{what}");
    let twice: Vec<f64> = atol.iter().map(|t| 2.0 * t).collect();
    assert_close(what, &got.to_vec_f32().unwrap(), &host(cpu), &twice, cpu.dtype(), BACKEND_ROUNDINGS);
}

fn forward_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), xt in dtypes(), wt in dtypes(), seed in any::<u64>())| {
        let d = *shape.last().unwrap();
        let eps = 1e-5f32;
        let inp = inputs(&shape, xt, wt, seed);
        let cpu = rms_norm(&inp.x, &inp.w, eps).unwrap();
        let (want_y, want_rstd) = reference_forward(&host(&inp.x), &host(&inp.w), d, eps as f64);
        let (atol_y, atol_r) = (forward_atol(&want_y, d), forward_atol(&want_rstd, d));
        let what = format!("rms_norm {shape:?} x {xt} w {wt}");
        assert_eq!(cpu.rstd.shape(), &shape[..shape.len() - 1]);
        if device.is_cpu() {
            assert_close(&format!("cpu {what} y"), &cpu.y.to_vec_f32().unwrap(), &want_y, &atol_y, xt, 1.0);
            assert_close(&format!("cpu {what} rstd"), &cpu.rstd.to_vec_f32().unwrap(), &want_rstd, &atol_r, DType::F32, 1.0);
            return Ok(());
        }
        let out = rms_norm(&inp.x.to_device(device).unwrap(), &inp.w.to_device(device).unwrap(), eps).unwrap();
        against_cpu(&format!("{device} {what} y"), &out.y, &cpu.y, &atol_y);
        against_cpu(&format!("{device} {what} rstd"), &out.rstd, &cpu.rstd, &atol_r);
    });
}

fn add_rms_norm_matches_reference(device: &Device) {
    proptest!(common::cases(16), |(shape in shapes(), xt in dtypes(), wt in dtypes(), seed in any::<u64>())| {
        let d = *shape.last().unwrap();
        let eps = 1e-6f32;
        let inp = inputs(&shape, xt, wt, seed);
        let r = Tensor::randn(&shape, 0.0, 3.0, seed ^ 0xadd, xt, &Device::Cpu).unwrap();
        let cpu = add_rms_norm(&inp.x, &r, &inp.w, eps).unwrap();
        let want_h: Vec<f64> = host(&inp.x).iter().zip(host(&r)).map(|(a, b)| a + b).collect();
        let atol_h: Vec<f64> = want_h.iter().map(|v| U32 * v.abs()).collect();
        // y is the norm of h as stored (checked above), which the reference takes.
        let (want_y, want_rstd) = reference_forward(&host(&cpu.h), &host(&inp.w), d, eps as f64);
        let (atol_y, atol_r) = (forward_atol(&want_y, d), forward_atol(&want_rstd, d));
        let what = format!("add_rms_norm {shape:?} x {xt} w {wt}");
        if device.is_cpu() {
            assert_close(&format!("cpu {what} h"), &cpu.h.to_vec_f32().unwrap(), &want_h, &atol_h, xt, 1.0);
            assert_close(&format!("cpu {what} y"), &cpu.y.to_vec_f32().unwrap(), &want_y, &atol_y, xt, 1.0);
            assert_close(&format!("cpu {what} rstd"), &cpu.rstd.to_vec_f32().unwrap(), &want_rstd, &atol_r, DType::F32, 1.0);
            return Ok(());
        }
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let out = add_rms_norm(&on(&inp.x), &on(&r), &on(&inp.w), eps).unwrap();
        against_cpu(&format!("{device} {what} h"), &out.h, &cpu.h, &atol_h);
        // A half-way sum may round the other way on a device: y and rstd then follow that h.
        let one_ulp: Vec<f64> = want_y.iter().map(|v| 2.0 * xt.unit_roundoff() * v.abs()).collect();
        let atol_y: Vec<f64> = atol_y.iter().zip(&one_ulp).map(|(a, b)| a + b).collect();
        let atol_r: Vec<f64> = want_rstd.iter().zip(&atol_r).map(|(s, a)| a + 2.0 * xt.unit_roundoff() * s).collect();
        against_cpu(&format!("{device} {what} y"), &out.y, &cpu.y, &atol_y);
        against_cpu(&format!("{device} {what} rstd"), &out.rstd, &cpu.rstd, &atol_r);
    });
}

/// dx and dw of the f64 reference with the forward's rstd as given, and their f32 error
/// bounds (see the comments inside).
struct BackwardRef {
    dx: Vec<f64>,
    dw: Vec<f64>,
    atol_dx: Vec<f64>,
    atol_dw: Vec<f64>,
}

fn reference_backward(dy: &[f64], x: &[f64], w: &[f64], rstd: &[f64], d: usize) -> BackwardRef {
    let rows = rstd.len();
    let (mut dx, mut atol_dx) = (Vec::new(), Vec::new());
    let (mut dw, mut dw_abs) = (vec![0.0; d], vec![0.0; d]);
    for r in 0..rows {
        let s = rstd[r];
        let (dyr, xr) = (&dy[r * d..(r + 1) * d], &x[r * d..(r + 1) * d]);
        let g: Vec<f64> = dyr.iter().zip(w).map(|(a, b)| a * b).collect();
        let xh: Vec<f64> = xr.iter().map(|v| v * s).collect();
        let c = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64;
        let mean_abs = g.iter().zip(&xh).map(|(a, b)| (a * b).abs()).sum::<f64>() / d as f64;
        for j in 0..d {
            dx.push(s * (g[j] - xh[j] * c));
            // g and x̂ (1u each), their products summed over d in any order (d·u) and the
            // mean (1u); x̂·c, the difference and the product by rstd (3u).
            atol_dx.push(
                U32 * s * (3.0 * g[j].abs() + 5.0 * (xh[j] * c).abs() + xh[j].abs() * (d as f64 + 4.0) * mean_abs),
            );
            dw[j] += dyr[j] * xh[j];
            dw_abs[j] += (dyr[j] * xh[j]).abs();
        }
    }
    // Each term 2u, summed over the rows in any grouping (rows · u).
    let atol_dw = dw_abs.iter().map(|a| U32 * (rows as f64 + 3.0) * a).collect();
    BackwardRef { dx, dw, atol_dx, atol_dw }
}

fn backward_matches_reference(device: &Device) {
    proptest!(common::cases(20), |(shape in shapes(), xt in dtypes(), wt in dtypes(), seed in any::<u64>())| {
        let d = *shape.last().unwrap();
        let inp = inputs(&shape, xt, wt, seed);
        let dy = Tensor::randn(&shape, 0.0, 1.0, seed ^ 0xd1, xt, &Device::Cpu).unwrap();
        let rstd = rms_norm(&inp.x, &inp.w, 1e-5).unwrap().rstd;
        let cpu = rms_norm_backward(&dy, &inp.x, &inp.w, &rstd).unwrap();
        let want = reference_backward(&host(&dy), &host(&inp.x), &host(&inp.w), &host(&rstd), d);
        let what = format!("rms_norm_backward {shape:?} x {xt} w {wt}");
        assert_eq!(cpu.dw.shape(), &[d]);
        assert_eq!(cpu.dw.dtype(), wt);
        if device.is_cpu() {
            assert_close(&format!("cpu {what} dx"), &cpu.dx.to_vec_f32().unwrap(), &want.dx, &want.atol_dx, xt, 1.0);
            assert_close(&format!("cpu {what} dw"), &cpu.dw.to_vec_f32().unwrap(), &want.dw, &want.atol_dw, wt, 1.0);
            return Ok(());
        }
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let out = rms_norm_backward(&on(&dy), &on(&inp.x), &on(&inp.w), &on(&rstd)).unwrap();
        against_cpu(&format!("{device} {what} dx"), &out.dx, &cpu.dx, &want.atol_dx);
        against_cpu(&format!("{device} {what} dw"), &out.dw, &cpu.dw, &want.atol_dw);
    });
}

/// dw's sum over rows has one order: the same bits on every run, on every device, for row
/// counts that split into one group, several, and the most groups with several rows each.
fn backward_dw_is_deterministic(device: &Device) {
    for (rows, d) in [(5, 64), (300, 33), (9001, 5)] {
        for (xt, wt) in [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::F16, DType::BF16)] {
            let inp = inputs(&[rows, d], xt, wt, rows as u64);
            let dy = Tensor::randn(&[rows, d], 0.0, 1.0, 3, xt, &Device::Cpu).unwrap();
            let rstd = rms_norm(&inp.x, &inp.w, 1e-5).unwrap().rstd;
            let on = |t: &Tensor| t.to_device(device).unwrap();
            let (dy, x, w, rstd) = (on(&dy), on(&inp.x), on(&inp.w), on(&rstd));
            let first = rms_norm_backward(&dy, &x, &w, &rstd).unwrap();
            for _ in 0..3 {
                let again = rms_norm_backward(&dy, &x, &w, &rstd).unwrap();
                assert_eq!(
                    again.dw.to_bytes().unwrap(),
                    first.dw.to_bytes().unwrap(),
                    "{device} [{rows}, {d}] {xt}/{wt} dw"
                );
                assert_eq!(
                    again.dx.to_bytes().unwrap(),
                    first.dx.to_bytes().unwrap(),
                    "{device} [{rows}, {d}] {xt}/{wt} dx"
                );
            }
        }
    }
}

/// On the CPU: the backward of L = Σ y ⊙ R against central differences of the f64 forward.
#[test]
fn backward_matches_finite_differences_cpu() {
    let cpu = Device::Cpu;
    for (rows, d, eps) in [(3, 7, 1e-5f32), (2, 64, 1e-2), (1, 1, 0.5)] {
        let inp = inputs(&[rows, d], DType::F32, DType::F32, d as u64);
        let rr = Tensor::randn(&[rows, d], 0.0, 1.0, 11, DType::F32, &cpu).unwrap();
        let fwd = rms_norm(&inp.x, &inp.w, eps).unwrap();
        let grads = rms_norm_backward(&rr, &inp.x, &inp.w, &fwd.rstd).unwrap();
        let (x, w, r, s) = (host(&inp.x), host(&inp.w), host(&rr), host(&fwd.rstd));
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            reference_forward(x, w, d, eps as f64).0.iter().zip(&r).map(|(y, r)| y * r).sum()
        };
        let bounds = reference_backward(&r, &x, &w, &s, d);
        // The f32 rstd the backward takes errs by (d/2 + 3)u; dx depends on it linearly
        // through rstd·g and cubically through x·rstd³·c, dw linearly.
        let s_rel = U32 * (d as f64 / 2.0 + 3.0);
        let h = 1e-6;
        let dx = grads.dx.to_vec_f32().unwrap();
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up, &w) - loss(&down, &w)) / (2.0 * h);
            let row = i / d;
            let g = r[i] * w[i % d];
            let c = (0..d).map(|j| r[row * d + j] * w[j] * x[row * d + j] * s[row]).sum::<f64>() / d as f64;
            let tol = bounds.atol_dx[i]
                + s_rel * s[row] * (g.abs() + 3.0 * (x[i] * s[row] * c).abs())
                + 1e-8 * (1.0 + fd.abs());
            assert!((dx[i] as f64 - fd).abs() <= tol, "[{rows}, {d}] dx[{i}]: {} vs {fd} (tol {tol})", dx[i]);
        }
        let dw = grads.dw.to_vec_f32().unwrap();
        for j in 0..d {
            let (mut up, mut down) = (w.clone(), w.clone());
            up[j] += h;
            down[j] -= h;
            let fd = (loss(&x, &up) - loss(&x, &down)) / (2.0 * h);
            let abs: f64 = (0..rows).map(|k| (r[k * d + j] * x[k * d + j] * s[k]).abs()).sum();
            let tol = bounds.atol_dw[j] + s_rel * abs + 1e-8 * (1.0 + fd.abs());
            assert!((dw[j] as f64 - fd).abs() <= tol, "[{rows}, {d}] dw[{j}]: {} vs {fd} (tol {tol})", dw[j]);
        }
    }
}

/// torch.nn.functional.rms_norm and its autograd (tests/fixtures/make_norm_act.py) against
/// the CPU: both sides' f32 bounds.
#[test]
fn cpu_matches_torch() {
    let file =
        kiln::io::SafetensorsFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/norm_act.safetensors"))
            .unwrap();
    let read = |name: &str| file.tensor(name, &Device::Cpu).unwrap();
    let (x, w, dy) = (read("rms_norm.x"), read("rms_norm.w"), read("rms_norm.dy"));
    let d = *x.shape().last().unwrap();
    let eps: f32 = file.metadata().unwrap()["rms_norm_eps"].parse().unwrap();
    let fwd = rms_norm(&x, &w, eps).unwrap();
    let grads = rms_norm_backward(&dy, &x, &w, &fwd.rstd).unwrap();
    for (name, got) in [("y", &fwd.y), ("dx", &grads.dx), ("dw", &grads.dw)] {
        let want = host(&read(&format!("rms_norm.{name}")));
        let (exact_y, _) = reference_forward(&host(&x), &host(&w), d, eps as f64);
        let atol: Vec<f64> = match name {
            // Each side within its forward bound of the exact value.
            "y" => forward_atol(&exact_y, d).iter().map(|t| 2.0 * t).collect(),
            _ => {
                let b = reference_backward(&host(&dy), &host(&x), &host(&w), &host(&fwd.rstd), d);
                let (atol, values) = if name == "dx" { (b.atol_dx, b.dx) } else { (b.atol_dw, b.dw) };
                // Both sides' bounds, and each side's rstd (d/2 + 3)u from the exact one,
                // which the gradients carry at most cubed.
                atol.iter().zip(&values).map(|(t, v)| 2.0 * t + 6.0 * U32 * (d as f64 / 2.0 + 3.0) * v.abs()).collect()
            }
        };
        assert_close(
            &format!("rms_norm {name} against torch"),
            &got.to_vec_f32().unwrap(),
            &want,
            &atol,
            DType::F32,
            2.0,
        );
    }
}

fn bad_inputs_are_refused(device: &Device) {
    let z = |shape: &[usize], dtype: DType| Tensor::zeros(shape, dtype, device).unwrap();
    let (x, w) = (z(&[2, 4], DType::F32), z(&[4], DType::F32));
    for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
        assert!(matches!(rms_norm(&x, &w, eps), Err(Error::InvalidArgument(_))), "{device} eps {eps}");
        assert!(matches!(add_rms_norm(&x, &x, &w, eps), Err(Error::InvalidArgument(_))), "{device} eps {eps}");
    }
    assert!(matches!(rms_norm(&x, &z(&[3], DType::F32), 1e-5), Err(Error::Shape(_))));
    assert!(matches!(rms_norm(&x, &z(&[1, 4], DType::F32), 1e-5), Err(Error::Shape(_))));
    assert!(matches!(rms_norm(&z(&[], DType::F32), &z(&[1], DType::F32), 1e-5), Err(Error::Shape(_))));
    assert!(matches!(add_rms_norm(&x, &z(&[4, 2], DType::F32), &w, 1e-5), Err(Error::Shape(_))));
    assert!(matches!(add_rms_norm(&x, &z(&[2, 4], DType::BF16), &w, 1e-5), Err(Error::DType(_))));
    let rstd = z(&[2], DType::F32);
    assert!(matches!(rms_norm_backward(&z(&[2, 3], DType::F32), &x, &w, &rstd), Err(Error::Shape(_))));
    assert!(matches!(rms_norm_backward(&x, &x, &w, &z(&[2, 1], DType::F32)), Err(Error::Shape(_))));
    assert!(matches!(rms_norm_backward(&x, &x, &z(&[5], DType::F32), &rstd), Err(Error::Shape(_))));
    assert!(matches!(rms_norm_backward(&z(&[2, 4], DType::F16), &x, &w, &rstd), Err(Error::DType(_))));
    assert!(matches!(rms_norm_backward(&x, &x, &w, &z(&[2], DType::BF16)), Err(Error::DType(_))));
    // Empty: zero rows give empty outputs and a zero dw; rows of zero width have rstd 1/√eps.
    let none = rms_norm(&z(&[0, 4], DType::BF16), &w, 1e-5).unwrap();
    assert_eq!((none.y.shape(), none.rstd.shape()), (&[0, 4][..], &[0][..]));
    let g = rms_norm_backward(&z(&[0, 4], DType::F32), &z(&[0, 4], DType::F32), &w, &z(&[0], DType::F32)).unwrap();
    assert_eq!(g.dw.to_vec_f32().unwrap(), vec![0.0; 4], "{device}");
    let flat = rms_norm(&z(&[3, 0], DType::F32), &z(&[0], DType::F32), 0.25).unwrap();
    assert_eq!(flat.rstd.to_vec_f32().unwrap(), vec![2.0; 3], "{device}");
    if !device.is_cpu() {
        let w_cpu = Tensor::zeros(&[4], DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(rms_norm(&x, &w_cpu, 1e-5), Err(Error::DeviceMismatch(_))));
        assert!(matches!(add_rms_norm(&x, &x, &w_cpu, 1e-5), Err(Error::DeviceMismatch(_))));
        assert!(matches!(rms_norm_backward(&x, &x, &w_cpu, &rstd), Err(Error::DeviceMismatch(_))));
    }
}

device_tests!(
    forward_matches_reference,
    add_rms_norm_matches_reference,
    backward_matches_reference,
    backward_dw_is_deterministic,
    bad_inputs_are_refused,
);
