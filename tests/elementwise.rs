//! add, mul, scale, sum_rows, cast: CPU against f64, every other device against the CPU.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::{add, cast, mul, scale, sum_rows};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop::sample::select(vec![
        vec![1],
        vec![7],
        vec![1, 1],
        vec![3, 5],
        vec![13, 257],
        vec![2, 3, 31],
        vec![64, 1],
        vec![4, 1000],
        vec![1, 4097],
    ])
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn input(shape: &[usize], seed: u64, dtype: DType, device: &Device) -> Tensor {
    Tensor::randn(shape, 0.0, 2.0, seed, dtype, device).unwrap()
}

/// Runs `make` on the CPU and, on the CPU, checks it against `exact` (from the CPU inputs
/// as stored); on any other device, checks that device's result against the CPU's.
fn check_on(
    device: &Device,
    what: &str,
    make: impl Fn(&Device) -> Tensor,
    exact: impl Fn(&Tensor) -> (Vec<f64>, Vec<f64>),
    out_dtype: DType,
) {
    let cpu = make(&Device::Cpu);
    let (want, atol) = exact(&cpu);
    let cpu_out = cpu.to_vec_f32().unwrap();
    if device.is_cpu() {
        assert_close(&format!("cpu {what}"), &cpu_out, &want, &atol, out_dtype, 1.0);
        return;
    }
    let cpu_ref: Vec<f64> = cpu_out.iter().map(|&x| x as f64).collect();
    let atol2: Vec<f64> = atol.iter().map(|t| 2.0 * t).collect();
    let out = make(device);
    assert_eq!(out.shape(), cpu.shape(), "{device} {what}");
    assert_eq!(out.dtype(), cpu.dtype(), "{device} {what}");
    assert_close(
        &format!("{device} {what}"),
        &out.to_vec_f32().unwrap(),
        &cpu_ref,
        &atol2,
        out_dtype,
        BACKEND_ROUNDINGS,
    );
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().unwrap().into_iter().map(|x| x as f64).collect()
}

fn add_and_mul_match_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), dtype in dtypes(), seed in any::<u64>())| {
        for (name, is_add) in [("add", true), ("mul", false)] {
            let make = |d: &Device| {
                let (x, y) = (input(&shape, seed, dtype, d), input(&shape, seed + 1, dtype, d));
                if is_add { add(&x, &y).unwrap() } else { mul(&x, &y).unwrap() }
            };
            let exact = |_: &Tensor| {
                let x = host(&input(&shape, seed, dtype, &Device::Cpu));
                let y = host(&input(&shape, seed + 1, dtype, &Device::Cpu));
                let want: Vec<f64> = x.iter().zip(&y).map(|(a, b)| if is_add { a + b } else { a * b }).collect();
                // Computed in f32 (u32) before the rounding to the output dtype.
                let atol = want.iter().map(|w| U32 * w.abs()).collect();
                (want, atol)
            };
            check_on(device, &format!("{name} {shape:?} {dtype}"), make, exact, dtype);
        }
    });
}

fn scale_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), dtype in dtypes(), seed in any::<u64>(), s in -4.0f32..4.0)| {
        let make = |d: &Device| scale(&input(&shape, seed, dtype, d), s).unwrap();
        let exact = |_: &Tensor| {
            let want: Vec<f64> = host(&input(&shape, seed, dtype, &Device::Cpu)).iter().map(|x| x * s as f64).collect();
            let atol = want.iter().map(|w| U32 * w.abs()).collect();
            (want, atol)
        };
        check_on(device, &format!("scale {shape:?} {dtype} by {s}"), make, exact, dtype);
    });
}

fn sum_rows_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), dtype in dtypes(), seed in any::<u64>())| {
        let cols = *shape.last().unwrap();
        let make = |d: &Device| sum_rows(&input(&shape, seed, dtype, d)).unwrap();
        let exact = |_: &Tensor| {
            let x = host(&input(&shape, seed, dtype, &Device::Cpu));
            let want: Vec<f64> = x.chunks(cols).map(|r| r.iter().sum()).collect();
            // f32 accumulation over `cols` terms in any order.
            let atol = x.chunks(cols).map(|r| cols as f64 * U32 * r.iter().map(|v| v.abs()).sum::<f64>()).collect();
            (want, atol)
        };
        check_on(device, &format!("sum_rows {shape:?} {dtype}"), make, exact, dtype);
    });
}

fn cast_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in shapes(), from in dtypes(), to in dtypes(), seed in any::<u64>())| {
        let make = |d: &Device| cast(&input(&shape, seed, from, d), to).unwrap();
        let exact = |_: &Tensor| {
            let want = host(&input(&shape, seed, from, &Device::Cpu));
            let atol = vec![0.0; want.len()];
            (want, atol)
        };
        check_on(device, &format!("cast {shape:?} {from} -> {to}"), make, exact, to);
    });
}

fn elementwise_errors_are_clear(device: &Device) {
    let a = Tensor::zeros(&[2, 3], DType::F32, device).unwrap();
    let b = Tensor::zeros(&[3, 2], DType::F32, device).unwrap();
    assert!(matches!(add(&a, &b), Err(Error::Shape(_))));
    let h = Tensor::zeros(&[2, 3], DType::BF16, device).unwrap();
    assert!(matches!(mul(&a, &h), Err(Error::DType(_))));
    assert!(matches!(scale(&a, f32::NAN), Err(Error::InvalidArgument(_))));
    let scalar = Tensor::zeros(&[], DType::F32, device).unwrap();
    assert!(matches!(sum_rows(&scalar), Err(Error::Shape(_))));
    // Empty tensors are fine; an empty row sums to zero.
    let empty = Tensor::zeros(&[4, 0], DType::F16, device).unwrap();
    assert_eq!(sum_rows(&empty).unwrap().to_vec_f32().unwrap(), vec![0.0; 4], "{device}");
    assert_eq!(add(&empty, &empty).unwrap().shape(), &[4, 0]);
    if !device.is_cpu() {
        let a = Tensor::zeros(&[2], DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(&[2], DType::F32, device).unwrap();
        assert!(matches!(add(&a, &b), Err(Error::DeviceMismatch(_))));
    }
}

fn cast_rounds_to_nearest_even_and_keeps_specials(device: &Device) {
    // 1 + 2^-11 lies halfway between two f16 values: nearest even is 1.0. 65520 rounds to
    // f16 infinity; bf16 keeps it (65536).
    let values = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 65520.0, -0.0, f32::INFINITY];
    let t = Tensor::from_slice(&values, &[5], device).unwrap();
    let h = cast(&t, DType::F16).unwrap().to_vec::<half::f16>().unwrap();
    let h: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    assert_eq!(h[0], 1.0, "{device}");
    assert_eq!(h[1], 1.0 + 2.0 * 2f32.powi(-10), "{device}");
    assert_eq!(h[2], f32::INFINITY, "{device}");
    assert!(h[3] == 0.0 && h[3].is_sign_negative(), "{device}");
    assert_eq!(h[4], f32::INFINITY, "{device}");
    let b = cast(&t, DType::BF16).unwrap().to_vec_f32().unwrap();
    assert_eq!(b[2], 65536.0, "{device}");
}

fn add_bias_adds_the_row_vector_to_every_row(device: &Device) {
    use kiln::ops::add_bias;
    for dtype in DType::ALL {
        for (rows, cols) in [(1, 1), (3, 7), (13, 257)] {
            let make = |d: &Device| {
                let x = input(&[rows, cols], 1, dtype, d);
                let b = input(&[cols], 2, dtype, d);
                add_bias(&x, &b).unwrap()
            };
            let exact = |_: &Tensor| {
                let x = host(&input(&[rows, cols], 1, dtype, &Device::Cpu));
                let b = host(&input(&[cols], 2, dtype, &Device::Cpu));
                let want: Vec<f64> = x.iter().enumerate().map(|(i, v)| v + b[i % cols]).collect();
                let atol = want.iter().map(|w| U32 * w.abs()).collect();
                (want, atol)
            };
            check_on(device, &format!("add_bias [{rows}, {cols}] {dtype}"), make, exact, dtype);
        }
    }
    let x = Tensor::zeros(&[2, 3], DType::F32, device).unwrap();
    let b = Tensor::zeros(&[2], DType::F32, device).unwrap();
    assert!(matches!(add_bias(&x, &b), Err(Error::Shape(_))));
}

/// On the CPU: the share kept and the scale; elsewhere: the CPU's mask and rounding, bit
/// for bit.
fn dropout_keeps_the_right_share_with_one_mask_on_every_device(device: &Device) {
    use kiln::ops::dropout;
    let n = 40000;
    let p = 0.3f32;
    let x = Tensor::full(&[n], 2.0, DType::F32, device).unwrap();
    if device.is_cpu() {
        let cpu = dropout(&x, p, 7).unwrap().to_vec::<f32>().unwrap();
        let scale = 1.0 / (1.0 - p);
        assert!(cpu.iter().all(|&v| v == 0.0 || v == 2.0 * scale), "kept values are scaled by 1 / (1 − p)");
        let kept = cpu.iter().filter(|&&v| v != 0.0).count() as f64;
        let sigma = (n as f64 * 0.3 * 0.7).sqrt();
        assert!((kept - 0.7 * n as f64).abs() <= 5.0 * sigma, "kept {kept} of {n}");
        assert_ne!(dropout(&x, p, 8).unwrap().to_vec::<f32>().unwrap(), cpu, "another seed, another mask");
    } else {
        for dtype in DType::ALL {
            let xs = input(&[3, 333], 5, dtype, &Device::Cpu);
            let want = dropout(&xs, 0.5, 11).unwrap().to_bytes().unwrap();
            let got = dropout(&xs.to_device(device).unwrap(), 0.5, 11).unwrap().to_bytes().unwrap();
            assert_eq!(got, want, "{device} {dtype}: the same mask and the same rounding");
        }
    }
    assert!(matches!(dropout(&x, 1.0, 0), Err(Error::InvalidArgument(_))));
    assert_eq!(dropout(&x, 0.0, 0).unwrap().to_vec::<f32>().unwrap(), vec![2.0; n]);
}

device_tests!(
    add_and_mul_match_reference,
    scale_matches_reference,
    sum_rows_matches_reference,
    cast_matches_reference,
    elementwise_errors_are_clear,
    cast_rounds_to_nearest_even_and_keeps_specials,
    add_bias_adds_the_row_vector_to_every_row,
    dropout_keeps_the_right_share_with_one_mask_on_every_device,
);
