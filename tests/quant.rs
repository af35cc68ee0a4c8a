//! Quantized weights: formats byte for byte against their definitions, round-trip error
//! bounds, and every product path on every device against dequantise-then-f32-matmul.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::quant::{GEMV_MAX_TOKENS, NF4_CODE, Nf4Absmax, Nf4State, dynamic_code};
use kiln::ops::{QMatmulOptions, QTensor, QuantFormat, qmatmul, qmatmul_input_grad, qmatmul_with};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn weights(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

fn q8_0_blocks_match_ggml_byte_for_byte(device: &Device) {
    // q_j = 127 − 8j, x = q / 2: amax 63.5, so d = 63.5 / 127 = 0.5 (f16 0x3800) and q = 2x.
    let q: Vec<i8> = (0..32).map(|j| (127 - 8 * j) as i8).collect();
    let x: Vec<f32> = q.iter().map(|&v| v as f32 / 2.0).collect();
    let mut want = vec![0x00, 0x38];
    want.extend(q.iter().map(|&v| v as u8));
    let w = QTensor::quantize(&weights(&x, &[1, 32]).to_device(device).unwrap(), QuantFormat::Q8_0).unwrap();
    assert_eq!(w.to_bytes().unwrap(), want, "{device}");
    assert_eq!(w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap(), x, "{device}: exact values round-trip");
    let loaded = QTensor::from_ggml_blocks(QuantFormat::Q8_0, &want, &[1, 32], device).unwrap();
    assert_eq!(loaded.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap(), x, "{device}");
}

fn q4_0_blocks_match_ggml_byte_for_byte(device: &Device) {
    // x_j = (j mod 16) − 8: the largest magnitude is −8 (first at j = 0), so d = −8 / −8 = 1
    // (f16 0x3C00) and q_j = j mod 16; byte j = q_j | q_(j+16) << 4 = 0x00, 0x11, …, 0xFF.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 - 8.0).collect();
    let mut want = vec![0x00, 0x3C];
    want.extend((0..16u8).map(|j| j | (j << 4)));
    let w = QTensor::quantize(&weights(&x, &[1, 32]).to_device(device).unwrap(), QuantFormat::Q4_0).unwrap();
    assert_eq!(w.to_bytes().unwrap(), want, "{device}");
    assert_eq!(w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap(), x, "{device}");
    if device.is_cpu() {
        // ggml's nibble order, decoded by hand: low nibbles are weights 0..16, high ones 16..32.
        let mut block = vec![0x00, 0x40]; // d = 2.0
        block.extend((0..16).map(|_| 0x9Fu8)); // low 15 → (15 − 8)·2 = 14, high 9 → (9 − 8)·2 = 2
        let w = QTensor::from_ggml_blocks(QuantFormat::Q4_0, &block, &[1, 32], &Device::Cpu).unwrap();
        let v = w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
        assert!(v[..16].iter().all(|&x| x == 14.0) && v[16..].iter().all(|&x| x == 2.0), "{v:?}");
    }
}

fn q4_1_fixture() -> kiln::io::SafetensorsFile {
    kiln::io::SafetensorsFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/q4_1.safetensors")).unwrap()
}

/// The first block (of `block_bytes`) where two runs of blocks differ, with both versions.
fn first_block_difference(got: &[u8], want: &[u8], block_bytes: usize) -> Option<(usize, Vec<u8>, Vec<u8>)> {
    got.chunks(block_bytes)
        .zip(want.chunks(block_bytes))
        .position(|(g, w)| g != w)
        .map(|b| (b, got[b * block_bytes..][..block_bytes].to_vec(), want[b * block_bytes..][..block_bytes].to_vec()))
}

/// Q4_1 against gguf-py (tests/fixtures/make_q4_1.py): kiln quantizes the fixture's weight to
/// gguf-py's bytes, and gguf-py's blocks dequantize to gguf-py's values bit for bit.
fn q4_1_blocks_match_gguf_py_byte_for_byte(device: &Device) {
    let file = q4_1_fixture();
    let w = file.tensor("q4_1.w", &Device::Cpu).unwrap();
    let shape = w.shape().to_vec();
    let (dtype, _, want_blocks) = file.raw("q4_1.blocks").unwrap();
    assert_eq!(dtype, "U8");
    let want = file.tensor("q4_1.dequantized", &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

    let q = QTensor::quantize(&w.to_device(device).unwrap(), QuantFormat::Q4_1).unwrap();
    assert_eq!(q.format(), QuantFormat::Q4_1);
    let got = q.to_bytes().unwrap();
    assert_eq!(got.len(), want_blocks.len(), "{device}");
    if let Some((b, mine, theirs)) = first_block_difference(&got, want_blocks, 20) {
        panic!("{device}: block {b} differs from gguf-py's: kiln {mine:?}, gguf-py {theirs:?}");
    }
    let loaded = QTensor::from_ggml_blocks(QuantFormat::Q4_1, want_blocks, &shape, device).unwrap();
    for (what, t) in [("gguf-py's blocks", &loaded), ("kiln's blocks", &q)] {
        let got = t.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
        let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        assert!(
            differ.is_empty(),
            "{device}: {what} dequantize differently from gguf-py at {} places, first {}: {} vs {}",
            differ.len(),
            differ[0],
            got[differ[0]],
            want[differ[0]]
        );
        assert_eq!(bits(&got), bits(&want));
    }
    if device.is_cpu() {
        // ggml's nibble order, decoded by hand: low nibbles are weights 0..16, high ones 16..32.
        let mut block = vec![0x00, 0x40, 0x00, 0xC2]; // d = 2.0, m = −3.0
        block.extend((0..16).map(|_| 0x9Fu8)); // low 15 → 15·2 − 3 = 27, high 9 → 9·2 − 3 = 15
        let w = QTensor::from_ggml_blocks(QuantFormat::Q4_1, &block, &[1, 32], &Device::Cpu).unwrap();
        let v = w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
        assert!(v[..16].iter().all(|&x| x == 27.0) && v[16..].iter().all(|&x| x == 15.0), "{v:?}");
        assert_eq!(w.max_abs_bound(), 27.0);
    }
}

fn nf4_matches_bitsandbytes_packing(device: &Device) {
    // x_j = 2 · NF4[j mod 16]: absmax 2, codes j mod 16, first weight in the high nibble.
    let x: Vec<f32> = (0..64).map(|j| 2.0 * NF4_CODE[j % 16]).collect();
    let packed: Vec<u8> = (0..32).map(|i| ((((2 * i) % 16) << 4) | ((2 * i + 1) % 16)) as u8).collect();
    let mut want = packed.clone();
    want.extend(2.0f32.to_le_bytes());
    let w = QTensor::quantize(&weights(&x, &[1, 64]).to_device(device).unwrap(), QuantFormat::Nf4).unwrap();
    assert_eq!(w.to_bytes().unwrap(), want, "{device}");
    assert_eq!(w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap(), x, "{device}");
    let state = Nf4State { packed, block_size: 64, absmax: Nf4Absmax::F32(vec![2.0]) };
    let loaded = QTensor::from_nf4(&state, &[1, 64], device).unwrap();
    assert_eq!(loaded.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap(), x, "{device}");
}

fn nf4_double_quant_state_loads_as_bitsandbytes_defines_it(device: &Device) {
    let code = dynamic_code();
    assert!(code.windows(2).all(|p| p[0] <= p[1]), "sorted");
    assert_eq!((code[255], code.iter().filter(|&&c| c == 0.0).count()), (1.0, 1));
    assert!((code[0] + 0.99296875).abs() < 1e-6, "smallest: −(0.9859375 + 1) / 2, got {}", code[0]);
    // Two blocks: absmax_0 = code[255]·0.5 + 1 = 1.5, absmax_1 = code[0]·0.5 + 1.
    let packed: Vec<u8> = (0..64).map(|i| (((i % 16) << 4) | (15 - i % 16)) as u8).collect();
    let state = Nf4Absmax::DoubleQuant {
        quantized: vec![255, 0],
        nested_absmax: vec![0.5],
        nested_code: code.to_vec(),
        offset: 1.0,
        nested_block_size: 256,
    };
    let absmax = [1.5f32, code[0] * 0.5 + 1.0];
    let want: Vec<f32> = (0..128)
        .map(|e| {
            let byte = packed[e / 2];
            let q = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
            NF4_CODE[q as usize] * absmax[e / 64]
        })
        .collect();
    let w = QTensor::from_nf4(&Nf4State { packed: packed.clone(), block_size: 64, absmax: state }, &[2, 64], device)
        .unwrap();
    assert_eq!(w.format(), QuantFormat::Nf4DoubleQuant);
    assert_eq!(w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap(), want, "{device}");
}

/// Largest round-trip error each format allows for a block whose largest magnitude is
/// `amax`: half a quantization step (a whole step where Q4_0 clamps its top value), plus the
/// rounding of the stored scale (and minimum).
fn round_trip_bound(format: QuantFormat, amax: f32) -> f32 {
    match format {
        QuantFormat::Q8_0 => amax / 127.0 * 0.5 + amax * 2f32.powi(-11),
        QuantFormat::Q4_0 => amax / 8.0 + amax * 2f32.powi(-11),
        // A step is (max − min) / 15 ≤ 2·amax / 15; the f16 d is off by 2⁻¹¹ of itself (up
        // to 15 times: 2·amax·2⁻¹¹), the f16 m by 2⁻¹¹·amax; 2⁻⁹ covers those and f32's part.
        QuantFormat::Q4_1 => amax / 15.0 + amax * 2f32.powi(-9),
        // Half the widest gap of the NF4 code (between −1.0 and −0.6962).
        QuantFormat::Nf4 => amax * (1.0 - 0.696_192_8) / 2.0 * 1.0001,
        // Plus the 8-bit absmax error: half the widest step of the dynamic code near 1,
        // times the nested scale (at most the largest |absmax − mean|, below amax).
        QuantFormat::Nf4DoubleQuant => amax * ((1.0 - 0.696_192_8) / 2.0 + 0.0071) * 1.0001,
    }
}

#[test]
fn round_trip_errors_stay_within_each_formats_bound() {
    let (rows, cols) = (16, 256);
    let w = Tensor::randn(&[rows, cols], 0.0, 0.05, 3, DType::F32, &Device::Cpu).unwrap();
    let x = w.to_vec::<f32>().unwrap();
    for format in QuantFormat::ALL {
        let q = QTensor::quantize(&w, format).unwrap();
        let back = q.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
        let largest = back.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(q.max_abs_bound() >= largest && q.max_abs_bound() <= 1.2 * largest.max(1e-30), "{format}");
        let bs = format.block_size();
        for (b, (orig, deq)) in x.chunks(bs).zip(back.chunks(bs)).enumerate() {
            let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Double quantization shares scales across the tensor: bound by the largest.
            let scale_amax =
                if format == QuantFormat::Nf4DoubleQuant { x.iter().fold(0f32, |m, v| m.max(v.abs())) } else { amax };
            let bound = round_trip_bound(format, scale_amax);
            for (o, d) in orig.iter().zip(deq) {
                assert!((o - d).abs() <= bound, "{format} block {b}: {o} came back as {d} (bound {bound})");
            }
        }
    }
}

#[test]
fn bits_per_weight_are_what_each_format_promises() {
    let w = Tensor::zeros(&[2048, 4096], DType::BF16, &Device::Cpu).unwrap();
    let bits = |f| QTensor::quantize(&w, f).unwrap().bits_per_weight();
    assert_eq!(bits(QuantFormat::Q8_0), 8.5);
    assert_eq!(bits(QuantFormat::Q4_0), 4.5);
    assert_eq!(bits(QuantFormat::Q4_1), 5.0);
    assert_eq!(bits(QuantFormat::Nf4), 4.5);
    let dq = bits(QuantFormat::Nf4DoubleQuant);
    assert!(dq <= 4.13 && dq > 4.127, "NF4 with double quantization: {dq} bits per weight");
}

/// On the CPU: quantizing and loading bad weights, and parsing format names; on every
/// device: products with mismatching shapes; elsewhere: a product with operands on two
/// devices.
fn bad_input_is_an_error_naming_the_problem(device: &Device) {
    if device.is_cpu() {
        let nan = weights(&[f32::NAN; 32], &[1, 32]);
        assert!(matches!(QTensor::quantize(&nan, QuantFormat::Q8_0), Err(Error::InvalidArgument(_))));
        let inf = weights(&[f32::INFINITY; 64], &[1, 64]);
        assert!(matches!(QTensor::quantize(&inf, QuantFormat::Nf4), Err(Error::InvalidArgument(_))));
        let odd = Tensor::zeros(&[2, 48], DType::F32, &Device::Cpu).unwrap();
        match QTensor::quantize(&odd, QuantFormat::Q4_0) {
            Err(Error::Shape(m)) => assert!(m.contains("[2, 48]") && m.contains("32"), "{m}"),
            other => panic!("expected a shape error, got {other:?}"),
        }
        assert!(matches!(QTensor::quantize(&odd.reshape(&[96]).unwrap(), QuantFormat::Q8_0), Err(Error::Shape(_))));
        // Truncated, oversized and wrong-format buffers.
        let blocks = vec![0u8; 34 * 4];
        assert!(QTensor::from_ggml_blocks(QuantFormat::Q8_0, &blocks, &[2, 64], &Device::Cpu).is_ok());
        for len in [34 * 4 - 1, 34 * 5] {
            assert!(matches!(
                QTensor::from_ggml_blocks(
                    QuantFormat::Q8_0,
                    &blocks.iter().copied().cycle().take(len).collect::<Vec<_>>(),
                    &[2, 64],
                    &Device::Cpu
                ),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(QTensor::from_ggml_blocks(QuantFormat::Nf4, &blocks, &[2, 64], &Device::Cpu).is_err());
        // Q4_1: 20 bytes a block, and a minimum past f16 refused as a scale is.
        let mut q41 = vec![0u8; 20 * 2];
        assert!(QTensor::from_ggml_blocks(QuantFormat::Q4_1, &q41, &[1, 64], &Device::Cpu).is_ok());
        assert!(matches!(
            QTensor::from_ggml_blocks(QuantFormat::Q4_1, &q41[..38], &[1, 64], &Device::Cpu),
            Err(Error::InvalidArgument(_))
        ));
        q41[22..24].copy_from_slice(&0xfc00u16.to_le_bytes()); // block 1: m = −inf
        match QTensor::from_ggml_blocks(QuantFormat::Q4_1, &q41, &[1, 64], &Device::Cpu) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("block 1") && m.contains("minimum -inf"), "{m}"),
            other => panic!("expected an error naming the minimum, got {other:?}"),
        }
        let low = weights(&[-7e4; 32], &[1, 32]);
        assert!(matches!(QTensor::quantize(&low, QuantFormat::Q4_1), Err(Error::InvalidArgument(_))));
        assert_eq!("Q4_1".parse::<QuantFormat>().unwrap(), QuantFormat::Q4_1);
        assert!(matches!(
            QTensor::from_nf4(
                &Nf4State { packed: vec![0u8; 32], block_size: 64, absmax: Nf4Absmax::F32(vec![1.0, 2.0]) },
                &[1, 64],
                &Device::Cpu
            ),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!("q5_k".parse::<QuantFormat>(), Err(Error::InvalidArgument(_))));
        assert_eq!("NF4DQ".parse::<QuantFormat>().unwrap(), QuantFormat::Nf4DoubleQuant);
    }
    // Products check the activations against the weight.
    let w = QTensor::quantize(&Tensor::zeros(&[8, 64], DType::F32, device).unwrap(), QuantFormat::Q8_0).unwrap();
    let x = Tensor::zeros(&[3, 32], DType::F32, device).unwrap();
    match qmatmul(&x, &w) {
        Err(Error::Shape(m)) => assert!(m.contains("[3, 32]") && m.contains("[8, 64]"), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(matches!(qmatmul_input_grad(&x, &w), Err(Error::Shape(_))));
    let empty = Tensor::zeros(&[0, 64], DType::F32, device).unwrap();
    assert_eq!(qmatmul(&empty, &w).unwrap().shape(), &[0, 8]);
    if !device.is_cpu() {
        let w =
            QTensor::quantize(&Tensor::zeros(&[8, 64], DType::F32, &Device::Cpu).unwrap(), QuantFormat::Q4_0).unwrap();
        let x = Tensor::zeros(&[1, 64], DType::F32, device).unwrap();
        assert!(matches!(qmatmul(&x, &w), Err(Error::DeviceMismatch(_))));
    }
}

#[derive(Debug, Clone)]
struct Case {
    tokens: usize,
    out: usize,
    blocks: usize,
    format: QuantFormat,
    dtype: DType,
    input_grad: bool,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![1usize, 2, 7, 64, 300]),
        prop::sample::select(vec![1usize, 3, 37, 130]),
        prop::sample::select(vec![1usize, 2, 3, 5]),
        prop::sample::select(QuantFormat::ALL.to_vec()),
        prop::sample::select(DType::ALL.to_vec()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(tokens, out, blocks, format, dtype, input_grad, seed)| Case {
            tokens,
            out,
            blocks,
            format,
            dtype,
            input_grad,
            seed,
        })
}

/// The test body: the CPU's product against the f64 product of the activations and the
/// CPU-dequantized weight; any other device's against the CPU's.
fn check(device: &Device, case: &Case) {
    let cols = case.blocks * case.format.block_size();
    let w = Tensor::randn(&[case.out, cols], 0.0, 0.1, case.seed, DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, case.format).unwrap();
    let dense = q.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
    let (k, n) = if case.input_grad { (case.out, cols) } else { (cols, case.out) };
    let x = Tensor::randn(&[case.tokens, k], 0.0, 1.0, case.seed ^ 1, case.dtype, &Device::Cpu).unwrap();
    let xs = x.to_vec_f32().unwrap();
    let weight =
        |kk: usize, nn: usize| if case.input_grad { dense[kk * cols + nn] } else { dense[nn * cols + kk] } as f64;
    let (mut exact, mut mass) = (vec![0f64; case.tokens * n], vec![0f64; case.tokens * n]);
    for t in 0..case.tokens {
        for j in 0..n {
            for p in 0..k {
                let v = xs[t * k + p] as f64 * weight(p, j);
                exact[t * n + j] += v;
                mass[t * n + j] += v.abs();
            }
        }
    }
    let run = |device: &Device| {
        let (x, q) = (x.to_device(device).unwrap(), q.to_device(device).unwrap());
        let y = if case.input_grad { qmatmul_input_grad(&x, &q) } else { qmatmul(&x, &q) }.unwrap();
        assert_eq!(y.shape(), &[case.tokens, n]);
        assert_eq!(y.dtype(), case.dtype);
        y.to_vec_f32().unwrap()
    };
    let atol: Vec<f64> = mass.iter().map(|m| 2.0 * k as f64 * U32 * m).collect();
    let cpu = run(&Device::Cpu);
    if device.is_cpu() {
        assert_close(&format!("cpu {case:?}"), &cpu, &exact, &atol, case.dtype, 1.0);
        return;
    }
    let cpu_ref: Vec<f64> = cpu.iter().map(|&v| v as f64).collect();
    // CUDA's tensor-core GEMM rounds each decoded weight to the activations' half type:
    // one more rounding of every term. The other kernels decode to f32.
    let weight_rounding = match device {
        Device::Cuda(_) if case.dtype != DType::F32 => case.dtype.unit_roundoff(),
        _ => 0.0,
    };
    let atol2: Vec<f64> = atol.iter().zip(&mass).map(|(a, m)| 2.0 * a + weight_rounding * m).collect();
    assert_close(&format!("{device} {case:?}"), &run(device), &cpu_ref, &atol2, case.dtype, BACKEND_ROUNDINGS);
}

fn products_match_dequantize_then_matmul_on_every_device(device: &Device) {
    proptest!(common::cases(40), |(case in cases())| {
        check(device, &case);
    });
}

fn every_format_and_path_is_covered(device: &Device) {
    // Deterministic coverage on top of the random cases: each format through GEMV and GEMM
    // forward and the input gradient.
    for format in QuantFormat::ALL {
        for dtype in [DType::F32, DType::BF16] {
            for (tokens, input_grad) in [(1, false), (5, false), (40, false), (3, true), (33, true)] {
                check(device, &Case { tokens, out: 72, blocks: 3, format, dtype, input_grad, seed: 9 });
            }
        }
        // The CPU GEMM reduces in depth slices of 512: a depth of 1152 (two whole slices and
        // a part) forward, 600 for the input gradient, and 600 columns (not a multiple of the
        // 16-wide strips) forward.
        if device.is_cpu() {
            let blocks = 1152 / format.block_size();
            for input_grad in [false, true] {
                check(device, &Case { tokens: 20, out: 600, blocks, format, dtype: DType::F32, input_grad, seed: 10 });
            }
        }
    }
}

fn dequantize_matches_the_cpu_bit_for_bit(device: &Device) {
    let w = Tensor::randn(&[7, 192], 0.0, 1.0, 5, DType::F32, &Device::Cpu).unwrap();
    for format in QuantFormat::ALL {
        let q = QTensor::quantize(&w, format).unwrap();
        for dtype in DType::ALL {
            let want = q.dequantize(dtype).unwrap().to_bytes().unwrap();
            let got = q.to_device(device).unwrap().dequantize(dtype).unwrap();
            assert_eq!(got.to_bytes().unwrap(), want, "{device} {format} -> {dtype}");
        }
    }
}

/// x rounded as `QMatmulOptions::int8_activations` documents it: per row and block of 32,
/// `d = amax / 127` in f32, `q = round(x·(1/d))` half away from zero; the value `d·q` exactly.
fn rounded_to_int8(x: &[f32]) -> Vec<f64> {
    x.chunks(32)
        .flat_map(|b| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.iter().map(move |v| d as f64 * (v * inv).round() as f64)
        })
        .collect()
}

fn int8_activations_round_where_documented_and_nowhere_else(device: &Device) {
    let (out, cols) = (37, 192);
    let options = QMatmulOptions::default().int8_activations();
    for format in QuantFormat::ALL {
        let w = Tensor::randn(&[out, cols], 0.0, 0.1, 21, DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, format).unwrap();
        let dense = q.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for tokens in [1, 2, 3, 4, 6, 8, 9, 40] {
                let x = Tensor::randn(&[tokens, cols], 0.0, 1.0, 22 + tokens as u64, dtype, &Device::Cpu).unwrap();
                let xs = x.to_vec_f32().unwrap();
                let xr = rounded_to_int8(&xs);
                let reference = |xv: &dyn Fn(usize) -> f64| {
                    let (mut exact, mut mass) = (vec![0f64; tokens * out], vec![0f64; tokens * out]);
                    for t in 0..tokens {
                        for o in 0..out {
                            for j in 0..cols {
                                let v = xv(t * cols + j) * dense[o * cols + j] as f64;
                                exact[t * out + o] += v;
                                mass[t * out + o] += v.abs();
                            }
                        }
                    }
                    (exact, mass)
                };
                let atol = |mass: &[f64]| -> Vec<f64> { mass.iter().map(|m| 2.0 * cols as f64 * U32 * m).collect() };
                let (exact, mass) = reference(&|i| xs[i] as f64);
                let (rounded, mass_rounded) = reference(&|i| xr[i]);
                let y = qmatmul_with(&x.to_device(device).unwrap(), &q.to_device(device).unwrap(), options)
                    .unwrap()
                    .to_vec_f32()
                    .unwrap();
                let what = format!("{device} {format} {dtype} tokens {tokens}");
                let rounds = device.is_cpu() && format.ggml_block_bytes().is_some() && tokens <= GEMV_MAX_TOKENS;
                if rounds {
                    assert_close(&what, &y, &rounded, &atol(&mass_rounded), dtype, 1.0);
                    // The rounding is real: the exact product is out of f32 reach.
                    let off = y.iter().zip(&exact).filter(|(g, e)| (**g as f64 - **e).abs() > 1e-4).count();
                    assert!(off > 0, "{what}: no output moved; were the activations rounded?");
                } else {
                    let weight_rounding = match device {
                        Device::Cuda(_) if dtype != DType::F32 => dtype.unit_roundoff(),
                        _ => 0.0,
                    };
                    // As `check` allows a backend: twice the CPU's accumulation bound, and
                    // CUDA's tensor-core GEMM rounding each decoded weight to x's half type.
                    let atol: Vec<f64> =
                        atol(&mass).iter().zip(&mass).map(|(a, m)| 2.0 * a + weight_rounding * m).collect();
                    assert_close(&what, &y, &exact, &atol, dtype, BACKEND_ROUNDINGS);
                }
            }
        }
    }
}

#[test]
fn int8_activations_keep_non_finite_values() {
    // A NaN or an infinity must not vanish into a zero code: token 1's outputs are all NaN.
    let w = Tensor::randn(&[5, 64], 0.0, 0.1, 4, DType::F32, &Device::Cpu).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut xs = vec![0.5f32; 2 * 64];
        xs[64 + 33] = bad;
        let x = Tensor::from_slice(&xs, &[2, 64], &Device::Cpu).unwrap();
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
            let q = QTensor::quantize(&w, format).unwrap();
            let y = qmatmul_with(&x, &q, QMatmulOptions::default().int8_activations()).unwrap();
            let y = y.to_vec::<f32>().unwrap();
            assert!(y[..5].iter().all(|v| v.is_finite()), "{format} {bad}: {y:?}");
            assert!(y[5..].iter().all(|v| v.is_nan()), "{format} {bad}: {y:?}");
        }
    }
}

fn bnb_fixture() -> kiln::io::SafetensorsFile {
    kiln::io::SafetensorsFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bnb.safetensors")).unwrap()
}

#[test]
fn dynamic_code_is_bitsandbytes_create_dynamic_map_bit_for_bit() {
    let file = bnb_fixture();
    let want = file.tensor("dynamic_code", &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let got = dynamic_code();
    let differ: Vec<usize> = (0..256).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    assert!(differ.is_empty(), "entries {differ:?} differ, first: kiln {} bnb {}", got[differ[0]], want[differ[0]]);
}

/// A weight bitsandbytes quantized (4-bit NF4, double quantization) loads from its state
/// parts, dequantizes exactly as bnb's `dequantize_4bit` does, and hands the same parts back.
fn a_bitsandbytes_nf4_state_loads_and_comes_back(device: &Device) {
    let file = bnb_fixture();
    let meta: serde_json::Value = serde_json::from_str(&file.metadata().unwrap()["nf4dq"]).unwrap();
    let shape: Vec<usize> = meta["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let floats = |name: &str| file.tensor(name, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let bytes = |name: &str| file.raw(name).unwrap().2.to_vec();
    let state = Nf4State {
        packed: bytes("nf4dq.weight"),
        block_size: meta["blocksize"].as_u64().unwrap() as usize,
        absmax: Nf4Absmax::DoubleQuant {
            quantized: bytes("nf4dq.absmax"),
            nested_absmax: floats("nf4dq.nested_absmax"),
            nested_code: floats("nf4dq.nested_code"),
            offset: meta["offset"].as_f64().unwrap() as f32,
            nested_block_size: meta["nested_blocksize"].as_u64().unwrap() as usize,
        },
    };
    let w = QTensor::from_nf4(&state, &shape, device).unwrap();
    let got = w.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
    let want = floats("nf4dq.dequantized");
    let differ = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).count();
    assert_eq!(differ, 0, "{device}: {differ} of {} weights differ from bitsandbytes' dequantize_4bit", got.len());
    assert_eq!(w.nf4_state().unwrap(), state, "{device}: the state comes back as it went in");
    // A weight kiln quantized hands back a state that loads to the same bytes.
    let mine = QTensor::quantize(
        &Tensor::from_slice(&floats("nf4dq.w"), &shape, device).unwrap(),
        QuantFormat::Nf4DoubleQuant,
    )
    .unwrap();
    let again = QTensor::from_nf4(&mine.nf4_state().unwrap(), &shape, device).unwrap();
    assert_eq!(again.to_bytes().unwrap(), mine.to_bytes().unwrap(), "{device}");
    // Block sizes kiln's kernels do not take are errors that name them.
    let mut other = state.clone();
    other.block_size = 128;
    match QTensor::from_nf4(&other, &shape, device) {
        Err(Error::Unsupported(m)) => assert!(m.contains("128"), "{m}"),
        r => panic!("expected Unsupported naming the block size, got {r:?}"),
    }
    let mut other = state;
    if let Nf4Absmax::DoubleQuant { nested_block_size, .. } = &mut other.absmax {
        *nested_block_size = 512;
    }
    match QTensor::from_nf4(&other, &shape, device) {
        Err(Error::Unsupported(m)) => assert!(m.contains("512"), "{m}"),
        r => panic!("expected Unsupported naming the nested block size, got {r:?}"),
    }
    let q8 = QTensor::quantize(&Tensor::zeros(&[1, 32], DType::F32, device).unwrap(), QuantFormat::Q8_0).unwrap();
    assert!(matches!(q8.nf4_state(), Err(Error::InvalidArgument(_))));
}

/// Where two byte strings first differ, and how many of their positions do.
fn differences<T: PartialEq + Copy + std::fmt::Debug>(got: &[T], want: &[T]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, bnb {}", got.len(), want.len()));
    }
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    let &first = differ.first()?;
    Some(format!(
        "{} of {} differ, first at {first}: kiln {:?} bnb {:?}",
        differ.len(),
        got.len(),
        got[first],
        want[first]
    ))
}

/// kiln's NF4 double quantization is bitsandbytes' on the CPU byte for byte (packed codes,
/// 8-bit absmax codes, nested scales, offset), on weights where a quantizer that rounds or
/// sums differently would not be: the tiny Llama's weights, absmax values next to the
/// midpoints of the dynamic map and of bnb's lookup table, ratios on NF4's midpoints, equal,
/// zero and sub-1e-38 absmax values, and long absmax vectors for the mean
/// (tests/fixtures/make_bnb_nf4dq.py).
fn nf4_double_quant_is_bitsandbytes_byte_for_byte(device: &Device) {
    let file =
        kiln::io::SafetensorsFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bnb_nf4dq.safetensors"))
            .unwrap();
    let tiny = kiln::io::SafetensorsFile::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama/tiny/model.safetensors"
    ))
    .unwrap();
    let cases: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&file.metadata().unwrap()["cases"]).unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let floats = |name: &str| file.tensor(name, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    let bytes = |name: &str| file.raw(name).unwrap().2.to_vec();
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let w = match case["source"].as_str().unwrap() {
            "w" => floats(&format!("{name}.w")),
            "llama/tiny" => {
                tiny.tensor(name.strip_prefix("tiny.").unwrap(), &Device::Cpu).unwrap().to_vec::<f32>().unwrap()
            }
            "absmax_rows" => {
                let mut w = vec![0f32; shape[0] * shape[1]];
                for (row, a) in floats(&format!("{name}.absmax_values")).into_iter().enumerate() {
                    w[row * shape[1]] = a;
                }
                w
            }
            other => panic!("{name}: unknown source {other}"),
        };
        let q =
            QTensor::quantize(&Tensor::from_slice(&w, &shape, device).unwrap(), QuantFormat::Nf4DoubleQuant).unwrap();
        let state = q.nf4_state().unwrap();
        let Nf4Absmax::DoubleQuant { quantized, nested_absmax, offset, nested_block_size, .. } = &state.absmax else {
            panic!("{name}: not double-quantized");
        };
        assert_eq!(*nested_block_size, 256);
        let mut check = |part: &str, difference: Option<String>| {
            if let Some(d) = difference {
                failures.push(format!("{name} {part}: {d}"));
            }
        };
        check("offset", differences(&[offset.to_bits()], &bits(floats(&format!("{name}.offset")))));
        check("absmax codes", differences(quantized, &bytes(&format!("{name}.absmax"))));
        check(
            "nested absmax",
            differences(&bits(nested_absmax.clone()), &bits(floats(&format!("{name}.nested_absmax")))),
        );
        if file.raw(&format!("{name}.weight")).is_ok() {
            check("packed codes", differences(&state.packed, &bytes(&format!("{name}.weight"))));
        }
    }
    assert!(
        failures.is_empty(),
        "{device}: kiln's NF4 double quantization differs from bitsandbytes':\n{}",
        failures.join("\n")
    );
}

device_tests!(
    nf4_double_quant_is_bitsandbytes_byte_for_byte,
    a_bitsandbytes_nf4_state_loads_and_comes_back,
    q8_0_blocks_match_ggml_byte_for_byte,
    q4_0_blocks_match_ggml_byte_for_byte,
    q4_1_blocks_match_gguf_py_byte_for_byte,
    nf4_matches_bitsandbytes_packing,
    nf4_double_quant_state_loads_as_bitsandbytes_defines_it,
    bad_input_is_an_error_naming_the_problem,
    products_match_dequantize_then_matmul_on_every_device,
    every_format_and_path_is_covered,
    dequantize_matches_the_cpu_bit_for_bit,
    int8_activations_round_where_documented_and_nowhere_else,
);
