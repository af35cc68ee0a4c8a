//! Tensor basics on every device: round trips, copies between devices, fills, seeded
//! random values that agree everywhere, and errors for bad input.

#[macro_use]
mod common;

use half::{bf16, f16};
use kiln::{DType, Device, Error, Tensor};

fn from_slice_to_vec_round_trips_every_dtype(device: &Device) {
    let xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
    let t = Tensor::from_slice(&xs, &[37], device).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), xs, "{device}");
    let h: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
    assert_eq!(Tensor::from_slice(&h, &[37], device).unwrap().to_vec::<f16>().unwrap(), h, "{device}");
    let b: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
    let tb = Tensor::from_slice(&b, &[37, 1], device).unwrap();
    assert_eq!(tb.to_vec::<bf16>().unwrap(), b, "{device}");
    assert_eq!(tb.shape(), &[37, 1]);
    assert_eq!(tb.dtype(), DType::BF16);
    assert_eq!(tb.device(), *device);
}

/// From `device` to every device present, and back.
fn to_device_copies_exactly_between_all_devices(device: &Device) {
    let t = Tensor::randn(&[5, 9], 0.0, 1.0, 11, DType::BF16, &Device::Cpu).unwrap();
    let want = t.to_vec::<bf16>().unwrap();
    let on_src = t.to_device(device).unwrap();
    for dst in common::devices() {
        let moved = on_src.to_device(&dst).unwrap();
        assert_eq!(moved.device(), dst);
        assert_eq!(moved.to_vec::<bf16>().unwrap(), want, "{device} -> {dst}");
        assert_eq!(moved.to_device(device).unwrap().to_vec::<bf16>().unwrap(), want, "{dst} -> {device}");
    }
}

fn seeded_random_values_agree_on_every_device(device: &Device) {
    for dtype in DType::ALL {
        let cpu = Tensor::randn(&[301], 0.5, 2.0, 42, dtype, &Device::Cpu).unwrap().to_bytes().unwrap();
        let uni = Tensor::rand(&[301], -1.0, 1.0, 42, dtype, &Device::Cpu).unwrap().to_bytes().unwrap();
        let t = Tensor::randn(&[301], 0.5, 2.0, 42, dtype, device).unwrap();
        assert_eq!(t.to_bytes().unwrap(), cpu, "{device} {dtype}");
        let u = Tensor::rand(&[301], -1.0, 1.0, 42, dtype, device).unwrap();
        assert_eq!(u.to_bytes().unwrap(), uni, "{device} {dtype}");
        let other = Tensor::randn(&[301], 0.5, 2.0, 43, dtype, &Device::Cpu).unwrap().to_bytes().unwrap();
        assert_ne!(other, cpu, "another seed gives other values");
    }
    // The values look like their distributions.
    let n = 20000;
    let x = Tensor::randn(&[n], 1.0, 3.0, 5, DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 0.1 && (var.sqrt() - 3.0).abs() < 0.1, "mean {mean}, std {}", var.sqrt());
    let u = Tensor::rand(&[n], 2.0, 4.0, 5, DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    assert!(u.iter().all(|&v| (2.0..4.0).contains(&v)));
}

fn zeros_and_full_fill_every_element(device: &Device) {
    for dtype in DType::ALL {
        let z = Tensor::zeros(&[3, 7], dtype, device).unwrap();
        assert_eq!(z.to_vec_f32().unwrap(), vec![0.0; 21], "{device} {dtype}");
        let f = Tensor::full(&[2, 2, 3], -1.5, dtype, device).unwrap();
        assert_eq!(f.to_vec_f32().unwrap(), vec![-1.5; 12], "{device} {dtype}");
    }
}

fn bad_input_is_an_error(device: &Device) {
    assert!(matches!(Tensor::from_slice(&[1f32, 2.0, 3.0], &[2, 2], device), Err(Error::Shape(_))));
    let t = Tensor::zeros(&[2, 3], DType::F16, device).unwrap();
    assert!(matches!(t.to_vec::<f32>(), Err(Error::DType(_))));
    assert!(matches!(t.reshape(&[4, 2]), Err(Error::Shape(_))));
    assert_eq!(t.reshape(&[3, 2]).unwrap().shape(), &[3, 2]);
    assert!(matches!(Tensor::rand(&[2], 1.0, f32::NAN, 0, DType::F32, device), Err(Error::InvalidArgument(_))));
    assert!(matches!(Tensor::randn(&[2], 0.0, -1.0, 0, DType::F32, device), Err(Error::InvalidArgument(_))));
    assert!(Tensor::zeros(&[usize::MAX, 4], DType::F32, device).is_err());
}

#[test]
fn devices_that_do_not_exist_are_errors() {
    assert!(matches!(Tensor::zeros(&[1], DType::F32, &Device::Cuda(99)), Err(Error::NoDevice(_))));
    assert!(matches!(Tensor::zeros(&[1], DType::F32, &Device::Wgpu(99)), Err(Error::NoDevice(_))));
}

#[test]
fn device_enumeration_never_panics() {
    let all = Device::all();
    assert_eq!(all[0], Device::Cpu);
    let best = Device::best();
    assert!(all.contains(&best));
    for d in all {
        let info = d.info().unwrap();
        assert!(!info.name.is_empty());
        d.synchronize().unwrap();
    }
}

fn allocations_that_cannot_succeed_are_errors_not_aborts(device: &Device) {
    // 2^50 f32 elements: 4 PiB on any device.
    match Tensor::zeros(&[1 << 40, 1 << 10], DType::F32, device) {
        Err(Error::OutOfMemory(m)) => assert!(!m.is_empty()),
        other => panic!("{device}: expected OutOfMemory, got {other:?}"),
    }
    let a = Tensor::zeros(&[1, 1], DType::F32, device).unwrap();
    let b = Tensor::zeros(&[1, 1], DType::F32, device).unwrap();
    // The device is still usable afterwards.
    assert_eq!(kiln::ops::matmul(&a, &b).unwrap().to_vec::<f32>().unwrap(), vec![0.0], "{device}");
}

fn copy_makes_an_equal_tensor_in_new_storage(device: &Device) {
    let t = Tensor::randn(&[3, 37], 0.0, 1.0, 8, DType::F16, device).unwrap();
    let c = t.copy().unwrap();
    assert_eq!((c.shape(), c.dtype(), c.device()), (t.shape(), t.dtype(), t.device()));
    assert_eq!(c.to_bytes().unwrap(), t.to_bytes().unwrap(), "{device}");
}

device_tests!(
    from_slice_to_vec_round_trips_every_dtype,
    to_device_copies_exactly_between_all_devices,
    seeded_random_values_agree_on_every_device,
    zeros_and_full_fill_every_element,
    bad_input_is_an_error,
    allocations_that_cannot_succeed_are_errors_not_aborts,
    copy_makes_an_equal_tensor_in_new_storage,
);
