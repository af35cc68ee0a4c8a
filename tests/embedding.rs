//! Token embeddings: the dense gather bit for bit against a naive gather, the quantized
//! gather against dequantize-then-gather and an independent decoding of ggml's blocks, the
//! backward against f64 sums and finite differences, torch's and gguf-py's own numbers, and
//! every other device against the CPU (gathers and backward bit for bit).

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::ops::{QTensor, QuantFormat, embedding, embedding_backward, qembedding};
use kiln::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// Ids drawn below `vocab`: from a handful of values when `few`, so ids repeat.
fn random_ids(n: usize, vocab: usize, few: bool, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    let distinct = if few { vocab.min(3) } else { vocab };
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % distinct as u64) as u32
        })
        .collect()
}

fn ids_tensor(ids: &[u32], shape: &[usize], device: &Device) -> Tensor {
    Tensor::from_slice(ids, shape, device).unwrap()
}

fn ids_shapes() -> impl Strategy<Value = Vec<usize>> {
    prop::sample::select(vec![vec![], vec![1], vec![5], vec![1, 1], vec![2, 3], vec![3, 7], vec![2, 1, 13]])
}

fn widths() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1, 2, 3, 5, 31, 64, 97, 128, 576])
}

fn vocabs() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1, 2, 7, 13, 101])
}

fn bits(t: &Tensor) -> Vec<u8> {
    t.to_bytes().unwrap()
}

fn gather_matches_reference(device: &Device) {
    proptest!(common::cases(24), |(shape in ids_shapes(), dim in widths(), vocab in vocabs(),
                                   dtype in prop::sample::select(DType::ALL.to_vec()), few in any::<bool>(),
                                   seed in any::<u64>())| {
        let n: usize = shape.iter().product();
        let ids = random_ids(n, vocab, few, seed);
        let table = Tensor::randn(&[vocab, dim], 0.0, 1.0, seed, dtype, &Device::Cpu).unwrap();
        let cpu = embedding(&table, &ids_tensor(&ids, &shape, &Device::Cpu)).unwrap();
        let mut want_shape = shape.clone();
        want_shape.push(dim);
        prop_assert_eq!(cpu.shape(), &want_shape[..]);
        prop_assert_eq!(cpu.dtype(), dtype);
        if device.is_cpu() {
            // A naive gather of the table's bytes: the rows bit for bit.
            let es = dtype.size_in_bytes();
            let rows = bits(&table);
            let want: Vec<u8> =
                ids.iter().flat_map(|&id| rows[id as usize * dim * es..(id as usize + 1) * dim * es].to_vec()).collect();
            prop_assert!(bits(&cpu) == want, "cpu gather differs from the table's rows");
            return Ok(());
        }
        let got = embedding(&table.to_device(device).unwrap(), &ids_tensor(&ids, &shape, device)).unwrap();
        prop_assert_eq!(got.shape(), cpu.shape());
        prop_assert!(bits(&got) == bits(&cpu), "{} gather differs from the CPU ({:?}, d {}, {})", device, shape, dim, dtype);
    });
}

/// Rows of ggml Q8_0 / Q4_0 blocks decoded from their definition: `d·q` and `d·(q − 8)`,
/// nibble j low, j + 16 high.
fn decode_ggml(format: QuantFormat, bytes: &[u8], elements: usize) -> Vec<f64> {
    let block = if format == QuantFormat::Q8_0 { 34 } else { 18 };
    (0..elements)
        .map(|e| {
            let b = &bytes[e / 32 * block..];
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f64();
            let j = e % 32;
            let q = if format == QuantFormat::Q8_0 {
                b[2 + j] as i8 as f64
            } else {
                let byte = b[2 + j % 16];
                (if j < 16 { byte & 15 } else { byte >> 4 }) as f64 - 8.0
            };
            d * q
        })
        .collect()
}

fn qgather_equals_dequantize_then_gather(device: &Device) {
    let widths = prop::sample::select(vec![64, 128, 576]);
    proptest!(common::cases(12), |(shape in ids_shapes(), dim in widths, vocab in vocabs(),
                                   dtype in prop::sample::select(DType::ALL.to_vec()), seed in any::<u64>())| {
        let n: usize = shape.iter().product();
        let ids = random_ids(n, vocab, seed % 2 == 0, seed);
        let dense = Tensor::randn(&[vocab, dim], 0.0, 0.5, seed, DType::F32, &Device::Cpu).unwrap();
        for format in QuantFormat::ALL {
            let q_cpu = QTensor::quantize(&dense, format).unwrap();
            let q = q_cpu.to_device(device).unwrap();
            let idt = ids_tensor(&ids, &shape, device);
            let got = qembedding(&q, &idt, dtype).unwrap();
            // On the same device: equal bit for bit to gathering the dequantized table.
            let want = embedding(&q.dequantize(dtype).unwrap(), &idt).unwrap();
            prop_assert_eq!(got.shape(), want.shape());
            prop_assert_eq!(got.dtype(), dtype);
            prop_assert!(bits(&got) == bits(&want), "{} {} {}: qembedding ≠ dequantize then gather", device, format, dtype);
            let cpu = qembedding(&q_cpu, &ids_tensor(&ids, &shape, &Device::Cpu), dtype).unwrap();
            if device.is_cpu() {
                if matches!(format, QuantFormat::Q8_0 | QuantFormat::Q4_0) {
                    // Against the blocks decoded here: d·q is exact in f32, then one rounding.
                    let table = decode_ggml(format, &q_cpu.to_bytes().unwrap(), vocab * dim);
                    let want: Vec<f64> =
                        ids.iter().flat_map(|&id| table[id as usize * dim..(id as usize + 1) * dim].to_vec()).collect();
                    let zero = vec![0.0; want.len()];
                    assert_close(&format!("cpu {format} {dtype}"), &cpu.to_vec_f32().unwrap(), &want, &zero, dtype, 1.0);
                }
            } else {
                let want: Vec<f64> = cpu.to_vec_f32().unwrap().iter().map(|&v| v as f64).collect();
                let zero = vec![0.0; want.len()];
                assert_close(&format!("{device} {format} {dtype}"), &got.to_vec_f32().unwrap(), &want, &zero, dtype,
                             BACKEND_ROUNDINGS);
            }
        }
    });
}

/// `Σ dy[p, :]` over the positions of each id, in f64, and the f32 accumulation's bound.
fn backward_reference(dy: &[f64], ids: &[u32], vocab: usize, dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut sum = vec![0.0; vocab * dim];
    let mut abs = vec![0.0; vocab * dim];
    let mut count = vec![0usize; vocab];
    for (p, &id) in ids.iter().enumerate() {
        count[id as usize] += 1;
        for c in 0..dim {
            sum[id as usize * dim + c] += dy[p * dim + c];
            abs[id as usize * dim + c] += dy[p * dim + c].abs();
        }
    }
    let atol = (0..vocab * dim).map(|i| count[i / dim] as f64 * U32 * abs[i]).collect();
    (sum, atol)
}

fn backward_matches_reference(device: &Device) {
    proptest!(common::cases(20), |(shape in ids_shapes(), dim in widths(), vocab in vocabs(),
                                   dtype in prop::sample::select(DType::ALL.to_vec()), few in any::<bool>(),
                                   seed in any::<u64>())| {
        let n: usize = shape.iter().product();
        let ids = random_ids(n, vocab, few, seed);
        let mut dy_shape = shape.clone();
        dy_shape.push(dim);
        let dy = Tensor::randn(&dy_shape, 0.0, 1.0, seed, dtype, &Device::Cpu).unwrap();
        let cpu = embedding_backward(&dy, &ids_tensor(&ids, &shape, &Device::Cpu), vocab).unwrap();
        prop_assert_eq!(cpu.shape(), &[vocab, dim][..]);
        prop_assert_eq!(cpu.dtype(), DType::F32);
        if device.is_cpu() {
            let dyv: Vec<f64> = dy.to_vec_f32().unwrap().iter().map(|&v| v as f64).collect();
            let (want, atol) = backward_reference(&dyv, &ids, vocab, dim);
            assert_close(&format!("cpu backward {dtype}"), &cpu.to_vec_f32().unwrap(), &want, &atol, DType::F32, 1.0);
            return Ok(());
        }
        // The same additions in the same order: the same bits.
        let got = embedding_backward(&dy.to_device(device).unwrap(), &ids_tensor(&ids, &shape, device), vocab).unwrap();
        prop_assert_eq!(got.shape(), cpu.shape());
        prop_assert!(bits(&got) == bits(&cpu), "{} backward differs from the CPU ({:?}, d {}, {})", device, shape, dim, dtype);
    });
}

/// One id at more positions than a WGSL pass adds (4096), others few: two runs give the same
/// bits, and the same as the CPU.
fn backward_is_bit_identical_across_runs(device: &Device) {
    let (vocab, dim) = (5, 3);
    let mut ids = random_ids(9001, vocab, false, 3);
    for (p, id) in ids.iter_mut().enumerate() {
        if p % 5 != 0 {
            *id = 2;
        }
    }
    ids[17] = 4;
    let shape = [9001];
    for dtype in DType::ALL {
        let dy = Tensor::randn(&[9001, dim], 0.0, 1.0, 5, dtype, &Device::Cpu).unwrap();
        let cpu = bits(&embedding_backward(&dy, &ids_tensor(&ids, &shape, &Device::Cpu), vocab).unwrap());
        let (dyd, idd) = (dy.to_device(device).unwrap(), ids_tensor(&ids, &shape, device));
        let first = bits(&embedding_backward(&dyd, &idd, vocab).unwrap());
        let second = bits(&embedding_backward(&dyd, &idd, vocab).unwrap());
        assert!(first == second, "{device} {dtype}: two runs differ");
        assert!(first == cpu, "{device} {dtype}: differs from the CPU");
        if device.is_cpu() {
            let dyv: Vec<f64> = dy.to_vec_f32().unwrap().iter().map(|&v| v as f64).collect();
            let (want, atol) = backward_reference(&dyv, &ids, vocab, dim);
            let got: Vec<f32> = bytemuck_f32(&first);
            assert_close(&format!("cpu long backward {dtype}"), &got, &want, &atol, DType::F32, 1.0);
        }
    }
}

fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The backward is the derivative of L(table) = Σ dy ⊙ embedding(table, ids), computed in f64
/// by central differences on the CPU (L is linear in the table: the differences are exact up
/// to the f64 sums).
#[test]
fn backward_matches_finite_differences() {
    let (vocab, dim) = (6, 4);
    let shape = [2, 5];
    let ids = [3u32, 0, 5, 3, 3, 1, 0, 3, 5, 5];
    let idt = ids_tensor(&ids, &shape, &Device::Cpu);
    let table: Vec<f32> = (0..vocab * dim).map(|i| ((i * 37) % 11) as f32 / 4.0 - 1.0).collect();
    let dy = Tensor::randn(&[2, 5, dim], 0.0, 1.0, 9, DType::F32, &Device::Cpu).unwrap();
    let dyv: Vec<f64> = dy.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect();
    let loss = |t: &[f32]| -> f64 {
        let out = embedding(&Tensor::from_slice(t, &[vocab, dim], &Device::Cpu).unwrap(), &idt).unwrap();
        out.to_vec::<f32>().unwrap().iter().zip(&dyv).map(|(&o, &g)| o as f64 * g).sum()
    };
    let grad = embedding_backward(&dy, &idt, vocab).unwrap().to_vec::<f32>().unwrap();
    let (_, f32_bound) = backward_reference(&dyv, &ids, vocab, dim);
    let h = 0.125f32; // exact in f32 beside these table values
    for i in 0..vocab * dim {
        let (mut plus, mut minus) = (table.clone(), table.clone());
        plus[i] += h;
        minus[i] -= h;
        let fd = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
        let tol = 1e-12 + f32_bound[i];
        assert!((grad[i] as f64 - fd).abs() <= tol, "element {i}: backward {} vs finite difference {fd}", grad[i]);
    }
    // Rows 2 and 4 never appear: zero.
    assert!(grad[2 * dim..3 * dim].iter().chain(&grad[4 * dim..5 * dim]).all(|&g| g == 0.0));
}

fn fixture() -> kiln::io::SafetensorsFile {
    kiln::io::SafetensorsFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/embedding.safetensors"))
        .unwrap()
}

/// torch's `F.embedding` and its autograd gradient, and gguf-py's dequantized rows.
fn torch_and_gguf_agree(device: &Device) {
    let file = fixture();
    let load = |name: &str| file.tensor(name, device).unwrap();
    let floats = |name: &str| file.tensor(name, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let (table, ids, dy) = (load("table"), load("ids"), load("dy"));
    assert_eq!(ids.dtype(), DType::U32);
    let out = embedding(&table, &ids).unwrap();
    assert_eq!(out.shape(), [2, 5, 6]);
    assert_eq!(out.to_vec::<f32>().unwrap(), floats("out"), "{device}: forward vs torch");
    let grad = embedding_backward(&dy, &ids, 11).unwrap();
    let want: Vec<f64> = floats("d_table").iter().map(|&v| v as f64).collect();
    let dyv: Vec<f64> = floats("dy").iter().map(|&v| v as f64).collect();
    let (_, atol) = backward_reference(&dyv, &ids.to_vec::<u32>().unwrap(), 11, 6);
    // torch may add in another order: both within the f32 bound of the exact sum.
    let atol2: Vec<f64> = atol.iter().map(|a| 2.0 * a).collect();
    assert_close(&format!("{device} backward vs torch"), &grad.to_vec_f32().unwrap(), &want, &atol2, DType::F32, 1.0);
    let qids = load("qids");
    for (name, format) in [("q8_0", QuantFormat::Q8_0), ("q4_0", QuantFormat::Q4_0)] {
        let (_, _, blocks) = file.raw(&format!("{name}.blocks")).unwrap();
        let q = QTensor::from_ggml_blocks(format, blocks, &[9, 64], device).unwrap();
        let got = qembedding(&q, &qids, DType::F32).unwrap();
        assert_eq!(got.shape(), [7, 64]);
        assert_eq!(got.to_vec::<f32>().unwrap(), floats(&format!("{name}.out")), "{device}: {name} vs gguf-py");
    }
}

/// Quantized tables as a GGUF file holds them (`tests/fixtures/kiln.gguf`, written by
/// gguf-py): gathered rows equal gguf-py's `dequantize` of the same blocks
/// (`gguf_expected.json`), for each quantized format kiln loads from GGUF.
fn gguf_tables_gather_as_gguf_py_decodes_them(device: &Device) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let file = kiln::GgufFile::open(format!("{dir}kiln.gguf")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}gguf_expected.json")).unwrap()).unwrap();
    let mut checked = 0;
    for t in expected["files"]["kiln.gguf"]["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        if !name.starts_with("quant.") {
            continue;
        }
        // A format this tree does not load from GGUF yet is the loader's to refuse.
        let Ok(q) = file.qtensor(name, device) else { continue };
        let [vocab, dim] = q.shape();
        let values: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(values.len(), vocab * dim, "{name}");
        let ids: Vec<u32> = (0..2 * vocab as u32).map(|i| (i * 7 + 1) % vocab as u32).rev().collect();
        let got = qembedding(&q, &ids_tensor(&ids, &[ids.len()], device), DType::F32).unwrap();
        let want: Vec<f32> =
            ids.iter().flat_map(|&id| values[id as usize * dim..(id as usize + 1) * dim].to_vec()).collect();
        assert_eq!(got.to_vec::<f32>().unwrap(), want, "{device}: {name} vs gguf-py");
        checked += 1;
    }
    assert!(checked >= 2, "the fixture's Q8_0 and Q4_0 tables at least");
}

/// SmolLM2's sizes: a 49152 × 576 table (bf16 dense, and Q8_0 as its GGUF stores it), ids at
/// both ends of the vocabulary; and rows of 2048.
fn real_model_sizes(device: &Device) {
    let (vocab, dim) = (49152, 576);
    let ids: Vec<u32> = vec![0, 49151, 1, 2, 49151, 30000, 2, 12345];
    let shape = [2, 4];
    let dense = Tensor::randn(&[vocab, dim], 0.0, 0.05, 1, DType::BF16, &Device::Cpu).unwrap();
    let cpu = embedding(&dense, &ids_tensor(&ids, &shape, &Device::Cpu)).unwrap();
    let rows = bits(&dense);
    let want: Vec<u8> =
        ids.iter().flat_map(|&id| rows[id as usize * dim * 2..(id as usize + 1) * dim * 2].to_vec()).collect();
    assert!(bits(&cpu) == want);
    let idd = ids_tensor(&ids, &shape, device);
    assert!(bits(&embedding(&dense.to_device(device).unwrap(), &idd).unwrap()) == want, "{device}");
    let q = QTensor::quantize(&dense, QuantFormat::Q8_0).unwrap().to_device(device).unwrap();
    let got = qembedding(&q, &idd, DType::BF16).unwrap();
    assert_eq!(got.shape(), [2, 4, dim]);
    let deq = embedding(&q.dequantize(DType::BF16).unwrap(), &idd).unwrap();
    assert!(bits(&got) == bits(&deq), "{device}: Q8_0 49152 × 576");
    let dy = Tensor::randn(&[2, 4, dim], 0.0, 1.0, 2, DType::BF16, device).unwrap();
    let grad = embedding_backward(&dy, &idd, vocab).unwrap();
    let cpu_grad =
        embedding_backward(&dy.to_device(&Device::Cpu).unwrap(), &ids_tensor(&ids, &shape, &Device::Cpu), vocab)
            .unwrap();
    assert!(bits(&grad) == bits(&cpu_grad), "{device}: backward 49152 × 576");
    let wide = Tensor::randn(&[7, 2048], 0.0, 1.0, 3, DType::F32, &Device::Cpu).unwrap();
    let ids = [6u32, 0, 6];
    let got = embedding(&wide.to_device(device).unwrap(), &ids_tensor(&ids, &[3], device)).unwrap();
    let rows = wide.to_vec::<f32>().unwrap();
    let want: Vec<f32> =
        ids.iter().flat_map(|&id| rows[id as usize * 2048..(id as usize + 1) * 2048].to_vec()).collect();
    assert_eq!(got.to_vec::<f32>().unwrap(), want, "{device}: rows of 2048");
}

fn empty_and_scalar_ids(device: &Device) {
    let table = Tensor::randn(&[4, 3], 0.0, 1.0, 1, DType::F16, device).unwrap();
    let row2 = table.to_vec::<half::f16>().unwrap()[6..9].to_vec();
    let scalar = embedding(&table, &Tensor::from_slice(&[2u32], &[], device).unwrap()).unwrap();
    assert_eq!((scalar.shape(), scalar.to_vec::<half::f16>().unwrap()), (&[3][..], row2));
    for shape in [vec![0], vec![2, 0]] {
        let ids = Tensor::zeros(&shape, DType::U32, device).unwrap();
        let out = embedding(&table, &ids).unwrap();
        let mut want = shape.clone();
        want.push(3);
        assert_eq!(out.shape(), &want[..]);
        let mut dy_shape = shape.clone();
        dy_shape.push(3);
        let grad = embedding_backward(&Tensor::zeros(&dy_shape, DType::F32, device).unwrap(), &ids, 4).unwrap();
        assert_eq!((grad.shape(), grad.to_vec::<f32>().unwrap()), (&[4, 3][..], vec![0.0; 12]), "{device}");
        let none = embedding_backward(&Tensor::zeros(&dy_shape, DType::F32, device).unwrap(), &ids, 0).unwrap();
        assert_eq!(none.shape(), [0, 3]);
    }
    let narrow = embedding(
        &Tensor::zeros(&[4, 0], DType::F32, device).unwrap(),
        &Tensor::from_slice(&[3u32, 1], &[2], device).unwrap(),
    )
    .unwrap();
    assert_eq!(narrow.shape(), [2, 0]);
    // Ids that never appear leave their rows zero, also in a poisoned output.
    let ids = Tensor::from_slice(&[1u32, 1], &[2], device).unwrap();
    let grad = embedding_backward(&Tensor::full(&[2, 3], 0.5, DType::BF16, device).unwrap(), &ids, 4).unwrap();
    let g = grad.to_vec::<f32>().unwrap();
    assert_eq!(g, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "{device}");
}

fn kind(r: kiln::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("accepted: {t:?}"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            format!("{e:?}").split('(').next().unwrap().to_string()
        }
    }
}

fn bad_inputs_are_refused(device: &Device) {
    let d = device;
    let table = Tensor::randn(&[5, 4], 0.0, 1.0, 1, DType::F32, d).unwrap();
    let q =
        QTensor::quantize(&Tensor::randn(&[5, 32], 0.0, 1.0, 1, DType::F32, d).unwrap(), QuantFormat::Q8_0).unwrap();
    let bad = Tensor::from_slice(&[1u32, 4, 0, 5, 2, 9], &[2, 3], d).unwrap();
    for result in [embedding(&table, &bad), qembedding(&q, &bad, DType::F32)] {
        match result {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("id 5") && m.contains("[1, 0]") && m.contains("vocabulary of 5"), "{m}")
            }
            other => panic!("{device}: {other:?}"),
        }
    }
    match embedding_backward(&Tensor::zeros(&[2, 3, 4], DType::F32, d).unwrap(), &bad, 5) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("id 5") && m.contains("[1, 0]"), "{m}"),
        other => panic!("{device}: {other:?}"),
    }
    let ok_ids = Tensor::from_slice(&[1u32, 2], &[2], d).unwrap();
    let i32_ids = Tensor::from_slice(&[1i32, 2], &[2], d).unwrap();
    let f32_ids = Tensor::from_f32(&[1.0, 2.0], &[2], DType::F32, d).unwrap();
    let dy = Tensor::zeros(&[2, 4], DType::F32, d).unwrap();
    assert_eq!(kind(embedding(&table, &i32_ids)), "DType");
    assert_eq!(kind(embedding(&table, &f32_ids)), "DType");
    assert_eq!(kind(qembedding(&q, &i32_ids, DType::F32)), "DType");
    assert_eq!(kind(qembedding(&q, &ok_ids, DType::U32)), "DType");
    assert_eq!(kind(embedding_backward(&dy, &i32_ids, 5)), "DType");
    assert_eq!(kind(embedding(&ok_ids, &ok_ids)), "DType", "a u32 table");
    assert_eq!(kind(embedding_backward(&ok_ids.reshape(&[2, 1]).unwrap(), &ok_ids, 5)), "DType", "u32 dy");
    assert_eq!(kind(embedding(&table.reshape(&[20]).unwrap(), &ok_ids)), "Shape");
    assert_eq!(kind(embedding(&table.reshape(&[1, 5, 4]).unwrap(), &ok_ids)), "Shape");
    assert_eq!(kind(embedding_backward(&Tensor::zeros(&[3, 4], DType::F32, d).unwrap(), &ok_ids, 5)), "Shape");
    assert_eq!(kind(embedding_backward(&Tensor::zeros(&[], DType::F32, d).unwrap(), &ok_ids, 5)), "Shape");
    assert_eq!(kind(embedding_backward(&dy, &ok_ids, 2)), "InvalidArgument", "vocab below an id");
    assert_eq!(kind(embedding_backward(&dy, &ok_ids, usize::MAX)), "Shape", "gradient bytes past usize");
    assert_eq!(kind(embedding(&Tensor::zeros(&[0, 4], DType::F32, d).unwrap(), &ok_ids)), "InvalidArgument");
    if !device.is_cpu() {
        let cpu_ids = ok_ids.to_device(&Device::Cpu).unwrap();
        assert_eq!(kind(embedding(&table, &cpu_ids)), "DeviceMismatch");
        assert_eq!(kind(qembedding(&q, &cpu_ids, DType::F32)), "DeviceMismatch");
        assert_eq!(kind(embedding_backward(&dy, &cpu_ids, 5)), "DeviceMismatch");
    }
}

device_tests!(
    gather_matches_reference,
    qgather_equals_dequantize_then_gather,
    backward_matches_reference,
    backward_is_bit_identical_across_runs,
    torch_and_gguf_agree,
    gguf_tables_gather_as_gguf_py_decodes_them,
    real_model_sizes,
    empty_and_scalar_ids,
    bad_inputs_are_refused,
);
