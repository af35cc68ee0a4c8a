//! Dense matmul: CPU against a naive f64 reference, every other device against the CPU, over
//! random shapes (1, primes, non-multiples of every tile, 16-byte-aligned sizes that take the
//! tensor-core path on CUDA), transposes, batching and dtypes.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::{MatmulOptions, matmul, matmul_with};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    batch_a: Option<usize>,
    batch_b: Option<usize>,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    dtype: DType,
    out_dtype: DType,
    seed: u64,
}

impl Case {
    fn a_shape(&self) -> Vec<usize> {
        let mut s = self.batch_a.into_iter().collect::<Vec<_>>();
        s.extend(if self.trans_a { [self.k, self.m] } else { [self.m, self.k] });
        s
    }

    fn b_shape(&self) -> Vec<usize> {
        let mut s = self.batch_b.into_iter().collect::<Vec<_>>();
        s.extend(if self.trans_b { [self.n, self.k] } else { [self.k, self.n] });
        s
    }

    fn batch(&self) -> usize {
        self.batch_a.or(self.batch_b).unwrap_or(1)
    }

    fn options(&self) -> MatmulOptions {
        MatmulOptions { trans_a: self.trans_a, trans_b: self.trans_b, out_dtype: Some(self.out_dtype) }
    }

    fn inputs(&self, device: &Device) -> (Tensor, Tensor) {
        let a = Tensor::randn(&self.a_shape(), 0.0, 1.0, self.seed, self.dtype, device).unwrap();
        let b = Tensor::randn(&self.b_shape(), 0.0, 1.0, self.seed ^ 0x5eed, self.dtype, device).unwrap();
        (a, b)
    }

    /// The exact product (in f64, from the inputs as stored) and, per element, Σ|a||b|,
    /// which bounds the rounding error of any summation order.
    fn reference(&self, a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut exact = vec![0f64; self.batch() * m * n];
        let mut mass = vec![0f64; self.batch() * m * n];
        for bi in 0..self.batch() {
            let a = &a[if self.batch_a.is_some() { bi * m * k } else { 0 }..];
            let b = &b[if self.batch_b.is_some() { bi * k * n } else { 0 }..];
            for i in 0..m {
                for j in 0..n {
                    let (mut s, mut t) = (0f64, 0f64);
                    for p in 0..k {
                        let x = a[if self.trans_a { p * m + i } else { i * k + p }] as f64;
                        let y = b[if self.trans_b { j * k + p } else { p * n + j }] as f64;
                        s += x * y;
                        t += (x * y).abs();
                    }
                    exact[bi * m * n + i * n + j] = s;
                    mass[bi * m * n + i * n + j] = t;
                }
            }
        }
        (exact, mass)
    }

    /// f32 accumulation over k terms in any order (tensor cores may truncate: factor 2).
    fn accumulation_atol(&self, mass: &[f64]) -> Vec<f64> {
        mass.iter().map(|t| 2.0 * self.k as f64 * U32 * t).collect()
    }
}

fn dims() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 7, 8, 13, 31, 64, 65, 97, 136, 131])
}

fn depths() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 3, 8, 17, 40, 64, 100, 264])
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn cases() -> impl Strategy<Value = Case> {
    (
        (dims(), dims(), depths()),
        (any::<bool>(), any::<bool>()),
        prop::sample::select(vec![(None, None), (Some(3), Some(3)), (Some(2), None), (None, Some(2))]),
        (dtypes(), prop::option::of(dtypes())),
        any::<u64>(),
    )
        .prop_map(|((m, n, k), (trans_a, trans_b), (batch_a, batch_b), (dtype, out), seed)| Case {
            batch_a,
            batch_b,
            m,
            n,
            k,
            trans_a,
            trans_b,
            dtype,
            out_dtype: out.unwrap_or(dtype),
            seed,
        })
}

/// The test body: on the CPU against f64, on any other device against the CPU.
fn check(case: &Case, device: &Device) {
    let (a, b) = case.inputs(&Device::Cpu);
    let (a_host, b_host) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    let (exact, mass) = case.reference(&a_host, &b_host);
    let atol = case.accumulation_atol(&mass);
    let cpu = matmul_with(&a, &b, case.options()).unwrap();
    let mut out_shape = case.batch_a.or(case.batch_b).into_iter().collect::<Vec<_>>();
    out_shape.extend([case.m, case.n]);
    assert_eq!(cpu.shape(), out_shape.as_slice());
    assert_eq!(cpu.dtype(), case.out_dtype);
    let cpu_host = cpu.to_vec_f32().unwrap();
    if device.is_cpu() {
        assert_close(&format!("cpu {case:?}"), &cpu_host, &exact, &atol, case.out_dtype, 1.0);
        return;
    }
    let cpu_ref: Vec<f64> = cpu_host.iter().map(|&x| x as f64).collect();
    // Both results are within atol + u_out·|exact| of the exact value.
    let atol2: Vec<f64> = atol.iter().map(|t| 2.0 * t).collect();
    let (a, b) = case.inputs(device);
    let out = matmul_with(&a, &b, case.options()).unwrap();
    assert_eq!(out.shape(), out_shape.as_slice());
    assert_eq!(out.device(), *device);
    assert_close(
        &format!("{device} {case:?}"),
        &out.to_vec_f32().unwrap(),
        &cpu_ref,
        &atol2,
        case.out_dtype,
        BACKEND_ROUNDINGS,
    );
}

fn matmul_matches_reference(device: &Device) {
    proptest!(common::cases(48), |(case in cases())| check(&case, device));
}

fn matmul_at_model_sizes(device: &Device) {
    // A projection of 4096-wide activations, as a 7B model's prefill does (fewer rows).
    for dtype in DType::ALL {
        check(
            &Case {
                batch_a: None,
                batch_b: None,
                m: 16,
                n: 256,
                k: 4096,
                trans_a: false,
                trans_b: true,
                dtype,
                out_dtype: DType::F32,
                seed: 7,
            },
            device,
        );
    }
}

fn zero_sized_dimensions_give_empty_or_zero_results(device: &Device) {
    let a = Tensor::zeros(&[3, 0], DType::F32, device).unwrap();
    let b = Tensor::zeros(&[0, 5], DType::F32, device).unwrap();
    let c = matmul(&a, &b).unwrap();
    assert_eq!(c.shape(), &[3, 5]);
    assert_eq!(c.to_vec::<f32>().unwrap(), vec![0.0; 15], "{device}: k = 0 gives zeros");
    let a = Tensor::zeros(&[0, 4], DType::BF16, device).unwrap();
    let b = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    let c = matmul(&a, &b).unwrap();
    assert_eq!(c.shape(), &[0, 6]);
    assert!(c.to_vec_f32().unwrap().is_empty());
}

fn bad_shapes_and_dtypes_are_errors_that_name_the_shapes(device: &Device) {
    let a = Tensor::zeros(&[4, 5], DType::F32, device).unwrap();
    let b = Tensor::zeros(&[6, 7], DType::F32, device).unwrap();
    match matmul(&a, &b) {
        Err(Error::Shape(m)) => assert!(m.contains("[4, 5]") && m.contains("[6, 7]"), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    // The transpose that would make it fit is not the one asked for.
    let w = Tensor::zeros(&[7, 5], DType::F32, device).unwrap();
    assert!(matches!(matmul(&a, &w), Err(Error::Shape(_))));
    assert!(matmul_with(&a, &w, MatmulOptions::nt()).is_ok());
    let a3 = Tensor::zeros(&[2, 4, 5], DType::F32, device).unwrap();
    let b3 = Tensor::zeros(&[3, 5, 4], DType::F32, device).unwrap();
    assert!(matches!(matmul(&a3, &b3), Err(Error::Shape(_))), "batch mismatch");
    let v = Tensor::zeros(&[5], DType::F32, device).unwrap();
    assert!(matches!(matmul(&v, &a), Err(Error::Shape(_))), "rank 1");
    let h = Tensor::zeros(&[5, 3], DType::F16, device).unwrap();
    assert!(matches!(matmul(&a, &h), Err(Error::DType(_))));
    if !device.is_cpu() {
        let a = Tensor::zeros(&[2, 2], DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(&[2, 2], DType::F32, device).unwrap();
        assert!(matches!(matmul(&a, &b), Err(Error::DeviceMismatch(_))));
    }
}

fn repeated_matmuls_reuse_pooled_buffers_and_stay_correct(device: &Device) {
    // The pool hands back freed buffers; results must not depend on what they held.
    let a = Tensor::randn(&[33, 47], 0.0, 1.0, 1, DType::F32, device).unwrap();
    let b = Tensor::randn(&[47, 29], 0.0, 1.0, 2, DType::F32, device).unwrap();
    let first = matmul(&a, &b).unwrap().to_vec::<f32>().unwrap();
    for _ in 0..5 {
        let again = matmul(&a, &b).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(first, again, "{device}: same inputs, same kernel, same result");
    }
}

device_tests!(
    matmul_matches_reference,
    matmul_at_model_sizes,
    zero_sized_dimensions_give_empty_or_zero_results,
    bad_shapes_and_dtypes_are_errors_that_name_the_shapes,
    repeated_matmuls_reuse_pooled_buffers_and_stay_correct,
);
