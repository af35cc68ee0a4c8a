//! SwiGLU and tanh-GELU, forward and backward: the CPU against a naive f64 reference with
//! error bounds derived from the f32 formulas, backward against central finite differences
//! in f64, every other device against the CPU, torch's numbers
//! (tests/fixtures/make_norm_act.py), saturation at large inputs, and bad inputs refused.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::activation::{gelu, gelu_backward, swiglu, swiglu_backward};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().unwrap().into_iter().map(|x| x as f64).collect()
}

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop::sample::select(vec![
        vec![1],
        vec![7],
        vec![3, 5],
        vec![2, 576],
        vec![3, 1536],
        vec![1, 2048],
        vec![2, 4096],
        vec![13, 257],
        vec![2, 3, 31],
    ])
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn input(shape: &[usize], std: f32, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape, 0.0, std, seed, dtype, &Device::Cpu).unwrap()
}

const BETA: f64 = 0.797_884_560_802_865_4; // √(2/π)
const KAPPA: f64 = 0.044715;

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// 2z of the GELU, exact.
fn z2(x: f64) -> f64 {
    2.0 * BETA * (x + KAPPA * x * x * x)
}

/// Relative error bound, in units of u, of the f32 sigmoid(v) and of 1 − sigmoid(v)
/// (v itself off by `v_err`·u relative): e = exp(−|v|) within 2 ulp (4u) plus v's error
/// times |v|; 1/(1 + e) and e/(1 + e) add at most e's error again and 3u.
fn sigmoid_err(v: f64, v_err: f64) -> f64 {
    2.0 * (4.0 + v_err * v.abs()) + 3.0
}

/// f32's smallest subnormal: the absolute error of a rounding in the subnormal range.
const TINY: f64 = 1.401298464324817e-45;

/// y = silu(g)·u, dg, du with their f32 bounds (see each line); intermediates that round
/// in the subnormal range add TINY times what multiplies them after.
fn swiglu_ref(g: f64, u: f64, dy: f64) -> [(f64, f64); 3] {
    let s = sigmoid(g);
    let se = sigmoid_err(g, 0.0);
    // y = (g·s)·u.
    let y = g * s * u;
    let y_tol = U32 * (se + 2.0) * y.abs() + TINY * (4.0 * (g * u).abs() + 2.0 * u.abs());
    // du = dy·(g·s).
    let du = dy * g * s;
    let du_tol = U32 * (se + 2.0) * du.abs() + TINY * (4.0 * (g * dy).abs() + 2.0 * dy.abs());
    // dg = (dy·u)·(s·A), A = 1 + g(1 − s): A off by u(|A| + |g|(1 − s)(se + 1)).
    let a = 1.0 + g * (1.0 - s);
    let dg = dy * u * s * a;
    let dg_tol = U32 * (dy * u * s).abs() * ((se + 3.0) * a.abs() + g.abs() * (1.0 - s) * (se + 2.0))
        + TINY * (dy * u).abs() * (4.0 * a.abs() + 4.0 * g.abs() + 2.0);
    [(y, y_tol), (dg, dg_tol), (du, du_tol)]
}

/// GELU y and its bound: 2z within 6u (x³, the sum of same-signed terms, the rounded
/// constants), then the sigmoid, then x · s.
fn gelu_ref(x: f64) -> (f64, f64) {
    let v = z2(x);
    let y = x * sigmoid(v);
    (y, U32 * (sigmoid_err(v, 6.0) + 1.0) * y.abs() + TINY * 4.0 * x.abs())
}

/// GELU's dx and its bound: s within σ·u, B = 2x · s(1 − s) · β(1 + 3κx²) within
/// (2σ + 9)u, the sum and the product.
fn gelu_backward_ref(x: f64, dy: f64) -> (f64, f64) {
    let v = z2(x);
    let s = sigmoid(v);
    let p = 2.0 * x.abs() * BETA * (1.0 + 3.0 * KAPPA * x * x);
    let b = 2.0 * x * s * (1.0 - s) * BETA * (1.0 + 3.0 * KAPPA * x * x);
    let dx = dy * (s + b);
    let sigma = sigmoid_err(v, 6.0);
    let tol = U32 * dy.abs() * (sigma * s + (2.0 * sigma + 9.0) * b.abs() + 2.0 * (s + b).abs())
        + TINY * dy.abs() * (4.0 + 4.0 * p);
    (dx, tol)
}

/// Checks `got` (from the CPU) against the reference on the CPU, or a device's result
/// against the CPU's: twice the bound plus the roundings a backend may take either way.
fn check(device: &Device, what: &str, got: &Tensor, cpu: &Tensor, want: &[(f64, f64)]) {
    let (values, atol): (Vec<f64>, Vec<f64>) = want.iter().copied().unzip();
    if device.is_cpu() {
        assert_close(&format!("cpu {what}"), &cpu.to_vec_f32().unwrap(), &values, &atol, cpu.dtype(), 1.0);
        return;
    }
    assert_eq!((got.shape(), got.dtype()), (cpu.shape(), cpu.dtype()), "{device} {what}");
    let twice: Vec<f64> = atol.iter().map(|t| 2.0 * t).collect();
    assert_close(
        &format!("{device} {what}"),
        &got.to_vec_f32().unwrap(),
        &host(cpu),
        &twice,
        cpu.dtype(),
        BACKEND_ROUNDINGS,
    );
}

fn swiglu_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), dtype in dtypes(), seed in any::<u64>())| {
        let (g, u, dy) = (input(&shape, 3.0, seed, dtype), input(&shape, 1.0, seed ^ 1, dtype), input(&shape, 1.0, seed ^ 2, dtype));
        let refs: Vec<[(f64, f64); 3]> =
            host(&g).iter().zip(host(&u)).zip(host(&dy)).map(|((&g, u), dy)| swiglu_ref(g, u, dy)).collect();
        let pick = |k: usize| refs.iter().map(|r| r[k]).collect::<Vec<_>>();
        let y_cpu = swiglu(&g, &u).unwrap();
        let (dg_cpu, du_cpu) = swiglu_backward(&dy, &g, &u).unwrap();
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let y = swiglu(&on(&g), &on(&u)).unwrap();
        let (dg, du) = swiglu_backward(&on(&dy), &on(&g), &on(&u)).unwrap();
        let what = format!("{shape:?} {dtype}");
        check(device, &format!("swiglu {what}"), &y, &y_cpu, &pick(0));
        check(device, &format!("swiglu dg {what}"), &dg, &dg_cpu, &pick(1));
        check(device, &format!("swiglu du {what}"), &du, &du_cpu, &pick(2));
    });
}

fn gelu_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), dtype in dtypes(), seed in any::<u64>())| {
        let (x, dy) = (input(&shape, 3.0, seed, dtype), input(&shape, 1.0, seed ^ 3, dtype));
        let y_ref: Vec<(f64, f64)> = host(&x).into_iter().map(gelu_ref).collect();
        let dx_ref: Vec<(f64, f64)> = host(&x).into_iter().zip(host(&dy)).map(|(x, dy)| gelu_backward_ref(x, dy)).collect();
        let (y_cpu, dx_cpu) = (gelu(&x).unwrap(), gelu_backward(&dy, &x).unwrap());
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let (y, dx) = (gelu(&on(&x)).unwrap(), gelu_backward(&on(&dy), &on(&x)).unwrap());
        check(device, &format!("gelu {shape:?} {dtype}"), &y, &y_cpu, &y_ref);
        check(device, &format!("gelu_backward {shape:?} {dtype}"), &dx, &dx_cpu, &dx_ref);
    });
}

/// Finite inputs far into both tails saturate as the limits do (x³ overflowing included),
/// on every device as on the CPU.
fn large_inputs_saturate(device: &Device) {
    let values = [-1e30f32, -200.0, -90.0, -30.0, 30.0, 90.0, 200.0, 1e30];
    let x = Tensor::from_slice(&values, &[values.len()], device).unwrap();
    let ones = Tensor::full(&[values.len()], 1.0, DType::F32, device).unwrap();
    let y = gelu(&x).unwrap().to_vec::<f32>().unwrap();
    let s = swiglu(&x, &ones).unwrap().to_vec::<f32>().unwrap();
    let (dg, _) = swiglu_backward(&ones, &x, &ones).unwrap();
    let dg = dg.to_vec::<f32>().unwrap();
    for (i, &v) in values.iter().enumerate() {
        if v < 0.0 {
            // −30 · e^−30 is still far from 0 in f32: below zero the values fade, never flip
            // sign.
            let fades = |t: f32| t.abs() <= 1e-11 * v.abs() && t.is_sign_negative();
            assert!(fades(y[i]) && fades(s[i]), "{device} gelu/silu({v}) = {} / {}", y[i], s[i]);
            assert!(dg[i].abs() <= 1e-11 * v.abs(), "{device} swiglu dg at {v} = {}", dg[i]);
        } else {
            assert!(y[i] == v && s[i] == v, "{device} gelu/silu({v}) = {} / {}", y[i], s[i]);
            assert_eq!(dg[i], 1.0, "{device} swiglu dg at {v}");
        }
    }
    let small = [-30.0f32, -12.0, 12.0, 30.0];
    let x = Tensor::from_slice(&small, &[4], device).unwrap();
    let dx = gelu_backward(&Tensor::full(&[4], 1.0, DType::F32, device).unwrap(), &x).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(dx, vec![0.0, 0.0, 1.0, 1.0], "{device} gelu_backward in the tails");
}

/// On the CPU: each backward against central differences of the f64 forward.
#[test]
fn backward_matches_finite_differences_cpu() {
    let n = 64;
    let (g, u, dy) =
        (input(&[n], 3.0, 1, DType::F32), input(&[n], 1.0, 2, DType::F32), input(&[n], 1.0, 3, DType::F32));
    let (dg, du) = swiglu_backward(&dy, &g, &u).unwrap();
    let dx = gelu_backward(&dy, &g).unwrap();
    let (gv, uv, dyv) = (host(&g), host(&u), host(&dy));
    let (dg, du, dx) = (host(&dg), host(&du), host(&dx));
    let h = 1e-6;
    let silu = |g: f64| g * sigmoid(g);
    let gelu64 = |x: f64| x * sigmoid(z2(x));
    for i in 0..n {
        let [_, (_, dg_tol), (_, du_tol)] = swiglu_ref(gv[i], uv[i], dyv[i]);
        let fd_g = dyv[i] * uv[i] * (silu(gv[i] + h) - silu(gv[i] - h)) / (2.0 * h);
        let fd_u = dyv[i] * silu(gv[i]);
        let fd_x = dyv[i] * (gelu64(gv[i] + h) - gelu64(gv[i] - h)) / (2.0 * h);
        let (_, dx_tol) = gelu_backward_ref(gv[i], dyv[i]);
        let fd_err = |fd: f64| 1e-8 * (1.0 + fd.abs());
        assert!((dg[i] - fd_g).abs() <= dg_tol + fd_err(fd_g), "dg[{i}] {} vs {fd_g}", dg[i]);
        assert!((du[i] - fd_u).abs() <= du_tol + fd_err(fd_u), "du[{i}] {} vs {fd_u}", du[i]);
        assert!((dx[i] - fd_x).abs() <= dx_tol + fd_err(fd_x), "dx[{i}] {} vs {fd_x}", dx[i]);
    }
}

/// torch's F.gelu(approximate='tanh'), F.silu(g)·u and their autograd
/// (tests/fixtures/make_norm_act.py) against the CPU, within both sides' bounds. torch
/// computes ½x(1 + tanh z), whose 1 + tanh z cancels in the negative tail: its bound adds
/// ½|x| times the error of tanh (2u, and 6u·|z| through z, shrunk by 1 − tanh²).
#[test]
fn cpu_matches_torch() {
    let file =
        kiln::io::SafetensorsFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/norm_act.safetensors"))
            .unwrap();
    let read = |name: &str| file.tensor(name, &Device::Cpu).unwrap();
    let (x, dy) = (read("gelu.x"), read("gelu.dy"));
    let (xv, dyv) = (host(&x), host(&dy));
    let tanh_err = |x: f64| {
        let z = z2(x) / 2.0;
        U32 * (2.0 + 6.0 * z.abs() * (1.0 - z.tanh().powi(2)))
    };
    let want_y: Vec<f64> = host(&read("gelu.y"));
    let atol_y: Vec<f64> = xv
        .iter()
        .map(|&x| 2.0 * gelu_ref(x).1 + 0.5 * x.abs() * (tanh_err(x) + U32) + 2.0 * U32 * gelu_ref(x).0.abs())
        .collect();
    assert_close("gelu against torch", &gelu(&x).unwrap().to_vec_f32().unwrap(), &want_y, &atol_y, DType::F32, 2.0);
    let want_dx = host(&read("gelu.dx"));
    let atol_dx: Vec<f64> = xv
        .iter()
        .zip(&dyv)
        .map(|(&x, &dy)| {
            let q = 0.5 * x.abs() * BETA * (1.0 + 3.0 * KAPPA * x * x);
            let (dx, tol) = gelu_backward_ref(x, dy);
            2.0 * tol + dy.abs() * (0.5 + 2.0 * q) * (tanh_err(x) + 2.0 * U32) + 4.0 * U32 * dx.abs()
        })
        .collect();
    let got = gelu_backward(&dy, &x).unwrap().to_vec_f32().unwrap();
    assert_close("gelu_backward against torch", &got, &want_dx, &atol_dx, DType::F32, 2.0);

    let (g, u, dy) = (read("swiglu.g"), read("swiglu.u"), read("swiglu.dy"));
    let refs: Vec<[(f64, f64); 3]> =
        host(&g).iter().zip(host(&u)).zip(host(&dy)).map(|((&g, u), dy)| swiglu_ref(g, u, dy)).collect();
    let (dg, du) = swiglu_backward(&dy, &g, &u).unwrap();
    for (k, name, got) in [(0, "y", swiglu(&g, &u).unwrap()), (1, "dg", dg), (2, "du", du)] {
        let want = host(&read(&format!("swiglu.{name}")));
        // torch's silu and its backward are the same formulas: the same bound on each side.
        let atol: Vec<f64> = refs.iter().map(|r| 2.0 * r[k].1).collect();
        assert_close(
            &format!("swiglu {name} against torch"),
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
    let (a, b) = (z(&[2, 3], DType::F32), z(&[3, 2], DType::F32));
    let h = z(&[2, 3], DType::BF16);
    assert!(matches!(swiglu(&a, &b), Err(Error::Shape(_))));
    assert!(matches!(swiglu(&a, &h), Err(Error::DType(_))));
    assert!(matches!(swiglu_backward(&a, &a, &b), Err(Error::Shape(_))));
    assert!(matches!(swiglu_backward(&h, &a, &a), Err(Error::DType(_))));
    assert!(matches!(gelu_backward(&a, &b), Err(Error::Shape(_))));
    assert!(matches!(gelu_backward(&a, &h), Err(Error::DType(_))));
    // Empty tensors give empty results; rank 0 is one element.
    assert_eq!(gelu(&z(&[0, 5], DType::F16)).unwrap().shape(), &[0, 5]);
    assert_eq!(swiglu(&z(&[], DType::F32), &z(&[], DType::F32)).unwrap().to_vec_f32().unwrap(), vec![0.0]);
    if !device.is_cpu() {
        let cpu = Tensor::zeros(&[2, 3], DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(swiglu(&a, &cpu), Err(Error::DeviceMismatch(_))));
        assert!(matches!(swiglu_backward(&a, &cpu, &a), Err(Error::DeviceMismatch(_))));
        assert!(matches!(gelu_backward(&cpu, &a), Err(Error::DeviceMismatch(_))));
    }
}

device_tests!(swiglu_matches_reference, gelu_matches_reference, large_inputs_saturate, bad_inputs_are_refused);
