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

/// Token ids (u32) and targets (i32, −100 ignored) keep every bit through uploads, copies
/// between devices, reshapes and copies; fills take whole numbers in range.
fn integer_tensors_round_trip_exactly(device: &Device) {
    let ids: Vec<u32> = vec![0, 1, 49151, 1 << 24, (1 << 24) + 1, u32::MAX, 7];
    let targets: Vec<i32> = vec![-100, 0, 5, i32::MIN, i32::MAX, 16_777_217, -1];
    let t = Tensor::from_slice(&ids, &[7], device).unwrap();
    assert_eq!((t.dtype(), t.device()), (DType::U32, *device));
    assert_eq!(t.to_vec::<u32>().unwrap(), ids, "{device}");
    let g = Tensor::from_slice(&targets, &[7, 1], device).unwrap();
    assert_eq!(g.dtype(), DType::I32);
    assert_eq!(g.reshape(&[7]).unwrap().to_vec::<i32>().unwrap(), targets, "{device}");
    assert_eq!(g.copy().unwrap().to_vec::<i32>().unwrap(), targets, "{device}");
    for dst in common::devices() {
        let moved = t.to_device(&dst).unwrap();
        assert_eq!(moved.to_vec::<u32>().unwrap(), ids, "{device} -> {dst}");
        assert_eq!(g.to_device(&dst).unwrap().to_device(device).unwrap().to_vec::<i32>().unwrap(), targets);
    }
    assert_eq!(Tensor::zeros(&[5], DType::U32, device).unwrap().to_vec::<u32>().unwrap(), vec![0; 5]);
    assert_eq!(Tensor::full(&[3], -100.0, DType::I32, device).unwrap().to_vec::<i32>().unwrap(), vec![-100; 3]);
    // Reading as the wrong type, or as floats, is refused rather than reinterpreted.
    assert!(matches!(t.to_vec::<i32>(), Err(Error::DType(_))));
    assert!(matches!(t.to_vec::<f32>(), Err(Error::DType(_))));
    assert!(matches!(t.to_vec_f32(), Err(Error::DType(_))));
}

/// Integer tensors go to safetensors as U32 / I32 and come back the same.
#[test]
fn integer_tensors_save_and_load_as_safetensors() {
    let ids = Tensor::from_slice(&[3u32, 1, u32::MAX], &[3], &Device::Cpu).unwrap();
    let targets = Tensor::from_slice(&[-100i32, 7], &[1, 2], &Device::Cpu).unwrap();
    let bytes = kiln::io::to_bytes(&[("ids", &ids), ("targets", &targets)], &Default::default()).unwrap();
    let header = String::from_utf8_lossy(&bytes[8..]).to_string();
    assert!(header.contains(r#""dtype":"U32""#) && header.contains(r#""dtype":"I32""#), "{header}");
    let dir = std::env::temp_dir().join(format!("kiln-int-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ints.safetensors");
    kiln::io::save(&path, &[("ids", &ids), ("targets", &targets)], &Default::default()).unwrap();
    let file = kiln::io::SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.tensor("ids", &Device::Cpu).unwrap().to_vec::<u32>().unwrap(), vec![3, 1, u32::MAX]);
    let t = file.tensor("targets", &Device::Cpu).unwrap();
    assert_eq!((t.shape(), t.to_vec::<i32>().unwrap()), (&[1usize, 2][..], vec![-100, 7]));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn integer_fills_and_random_values_are_checked(device: &Device) {
    for bad in [-1.0, 0.5, f32::NAN, f32::INFINITY, 5e9] {
        assert!(matches!(Tensor::full(&[2], bad, DType::U32, device), Err(Error::InvalidArgument(_))), "{bad}");
    }
    assert!(matches!(Tensor::full(&[2], 3e9, DType::I32, device), Err(Error::InvalidArgument(_))));
    for dtype in DType::INTEGERS {
        assert!(matches!(Tensor::rand(&[2], 0.0, 1.0, 0, dtype, device), Err(Error::DType(_))), "{dtype}");
        assert!(matches!(Tensor::randn(&[2], 0.0, 1.0, 0, dtype, device), Err(Error::DType(_))), "{dtype}");
        assert!(matches!(Tensor::from_f32(&[1.0], &[1], dtype, device), Err(Error::DType(_))), "{dtype}");
    }
}

/// Every float op refuses integer operands with `Err(DType)`, on every device, before any
/// kernel reads their bits as floats.
fn float_ops_refuse_integer_tensors(device: &Device) {
    use kiln::ops;
    let ids = Tensor::from_slice(&[1u32, 2, 3, 4], &[2, 2], device).unwrap();
    let x = Tensor::randn(&[2, 2], 0.0, 1.0, 1, DType::F32, device).unwrap();
    let dtype_err = |what: &str, r: kiln::Result<Tensor>| {
        assert!(matches!(r, Err(Error::DType(_))), "{device} {what}: {r:?}");
    };
    dtype_err("add", ops::add(&ids, &x));
    dtype_err("mul", ops::mul(&x, &ids));
    dtype_err("scale", ops::scale(&ids, 2.0));
    dtype_err("sum_rows", ops::sum_rows(&ids));
    dtype_err("cast from u32", ops::cast(&ids, DType::F32));
    dtype_err("cast to u32", ops::cast(&x, DType::U32));
    dtype_err("add_bias", ops::add_bias(&x, &Tensor::from_slice(&[1u32, 2], &[2], device).unwrap()));
    dtype_err("dropout", ops::dropout(&ids, 0.5, 1));
    dtype_err("matmul", ops::matmul(&ids, &x));
    dtype_err("matmul out u32", ops::matmul_with(&x, &x, ops::MatmulOptions::default().out_dtype(DType::U32)));
    let qx = Tensor::randn(&[2, 32], 0.0, 1.0, 1, DType::F32, device).unwrap();
    let q = ops::QTensor::quantize(&qx, ops::QuantFormat::Q8_0).unwrap();
    assert!(matches!(
        ops::QTensor::quantize(&Tensor::zeros(&[2, 32], DType::U32, device).unwrap(), ops::QuantFormat::Q8_0),
        Err(Error::DType(_))
    ));
    dtype_err("dequantize to i32", q.dequantize(DType::I32));
    dtype_err("qmatmul", ops::qmatmul(&Tensor::zeros(&[1, 32], DType::U32, device).unwrap(), &q));
    dtype_err("qmatmul_input_grad", ops::qmatmul_input_grad(&Tensor::zeros(&[1, 2], DType::I32, device).unwrap(), &q));
    dtype_err("lora merge", ops::lora::merge(&x, &ids, &x, 1.0));
    let heads = Tensor::zeros(&[1, 2, 1, 4], DType::U32, device).unwrap();
    let opts = ops::attention::AttentionOptions::default();
    assert!(matches!(ops::attention::attention(&heads, &heads, &heads, &opts), Err(Error::DType(_))), "{device}");
}

device_tests!(
    integer_tensors_round_trip_exactly,
    integer_fills_and_random_values_are_checked,
    float_ops_refuse_integer_tensors,
    from_slice_to_vec_round_trips_every_dtype,
    to_device_copies_exactly_between_all_devices,
    seeded_random_values_agree_on_every_device,
    zeros_and_full_fill_every_element,
    bad_input_is_an_error,
    allocations_that_cannot_succeed_are_errors_not_aborts,
    copy_makes_an_equal_tensor_in_new_storage,
);
