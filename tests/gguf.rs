//! The GGUF reader against gguf-py: `tests/fixtures/make_gguf.py` writes the files with
//! `GGUFWriter` and what gguf-py reads back from them (metadata, tensor infos, raw bytes,
//! `gguf.quants.dequantize` values) into `gguf_expected.json`. Every tensor is checked on
//! every device. Then broken files: truncated, with each structural field broken, and
//! hand-built hostile ones, each an `Err` naming what and where.

#[macro_use]
mod common;

use common::gguf::{
    self as g, F16, F32, GgufBuilder, I8, I32, Q4_0, Q4_K, Q8_0, T_ARRAY, T_BOOL, T_STRING, T_U8, T_U32, T_U64, array,
    kv, kv_str, kv_u32, string, tensor,
};
use kiln::io::{GgmlType, GgufArray, GgufFile, GgufTensor, GgufValue};
use kiln::ops::QuantFormat;
use kiln::{DType, Device, Error};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const FILES: [&str; 2] = ["kiln.gguf", "kiln_align64.gguf"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("gguf_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expected_file(name: &str) -> Value {
    expected()["files"][name].clone()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A file of `bytes` under the test's temporary directory, one per test thread and name.
fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-{}-{thread}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `bytes` opened as a GGUF file (the file is removed again; a mapping outlives it).
fn open_bytes(name: &str, bytes: &[u8]) -> kiln::Result<GgufFile> {
    let path = temp_file(name, bytes);
    let file = GgufFile::open(&path);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(path.parent().unwrap());
    file
}

/// The error of `result`, which must be one.
fn err<T>(result: kiln::Result<T>, what: &str) -> Error {
    match result {
        Ok(_) => panic!("{what}: loaded, but must be refused"),
        Err(e) => e,
    }
}

/// Asserts `e`'s message holds every one of `words`.
fn assert_names(e: &Error, words: &[&str]) {
    let message = e.to_string();
    for w in words {
        assert!(message.contains(w), "the error {message:?} does not name {w:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Against gguf-py

/// A metadata value in the sidecar's form: its type and value, arrays with their element
/// type and each element (an array's elements as whole values).
fn to_json(v: &GgufValue) -> Value {
    let ty = v.value_type().name();
    match v {
        GgufValue::U8(x) => json!({"type": ty, "value": x}),
        GgufValue::I8(x) => json!({"type": ty, "value": x}),
        GgufValue::U16(x) => json!({"type": ty, "value": x}),
        GgufValue::I16(x) => json!({"type": ty, "value": x}),
        GgufValue::U32(x) => json!({"type": ty, "value": x}),
        GgufValue::I32(x) => json!({"type": ty, "value": x}),
        GgufValue::F32(x) => json!({"type": ty, "value": *x as f64}),
        GgufValue::Bool(x) => json!({"type": ty, "value": x}),
        GgufValue::String(x) => json!({"type": ty, "value": x}),
        GgufValue::U64(x) => json!({"type": ty, "value": x}),
        GgufValue::I64(x) => json!({"type": ty, "value": x}),
        GgufValue::F64(x) => json!({"type": ty, "value": x}),
        GgufValue::Array(a) => array_json(a),
    }
}

fn array_json(a: &GgufArray) -> Value {
    let values: Value = match a {
        GgufArray::U8(v) => json!(v),
        GgufArray::I8(v) => json!(v),
        GgufArray::U16(v) => json!(v),
        GgufArray::I16(v) => json!(v),
        GgufArray::U32(v) => json!(v),
        GgufArray::I32(v) => json!(v),
        GgufArray::F32(v) => json!(v.iter().map(|&x| x as f64).collect::<Vec<f64>>()),
        GgufArray::Bool(v) => json!(v),
        GgufArray::String(v) => json!(v),
        GgufArray::U64(v) => json!(v),
        GgufArray::I64(v) => json!(v),
        GgufArray::F64(v) => json!(v),
        GgufArray::Array(v) => Value::Array(v.iter().map(array_json).collect()),
    };
    json!({"type": "array", "element": a.element_type().name(), "value": values})
}

#[test]
fn metadata_matches_gguf_py() {
    for name in FILES {
        let want = expected_file(name);
        let file = GgufFile::open(fixture(name)).unwrap();
        assert_eq!(file.version(), 3);
        let want_meta = want["metadata"].as_object().unwrap();
        let keys: Vec<&String> = file.metadata().keys().collect();
        let mut want_keys: Vec<&String> = want_meta.keys().collect();
        want_keys.sort();
        assert_eq!(keys, want_keys, "{name}: the metadata keys");
        for (key, value) in file.metadata() {
            assert_eq!(to_json(value), want_meta[key], "{name}: metadata {key:?}");
        }
        assert_eq!(file.alignment(), want["alignment"].as_u64().unwrap(), "{name}: alignment");
        assert_eq!(file.data_offset(), want["data_offset"].as_u64().unwrap(), "{name}: data offset");
    }
}

#[test]
fn typed_getters_read_each_type_and_name_the_key_and_types_when_wrong() {
    let file = GgufFile::open(fixture("kiln.gguf")).unwrap();
    assert_eq!(file.get_u8("kiln.u8").unwrap(), 255);
    assert_eq!(file.get_i8("kiln.i8").unwrap(), -128);
    assert_eq!(file.get_u16("kiln.u16").unwrap(), 65535);
    assert_eq!(file.get_i16("kiln.i16").unwrap(), -32768);
    assert_eq!(file.get_u32("kiln.u32").unwrap(), u32::MAX);
    assert_eq!(file.get_i32("kiln.i32").unwrap(), i32::MIN);
    assert_eq!(file.get_f32("kiln.f32").unwrap(), 0.1f32);
    assert!(file.get_bool("kiln.bool_true").unwrap());
    assert!(!file.get_bool("kiln.bool_false").unwrap());
    assert_eq!(file.get_u64("kiln.u64").unwrap(), u64::MAX);
    assert_eq!(file.get_i64("kiln.i64").unwrap(), i64::MIN);
    assert_eq!(file.get_f64("kiln.f64").unwrap(), std::f64::consts::PI);
    assert_eq!(file.get_str("kiln.string").unwrap(), "héllo, wörld ✓ <|im_start|>");
    assert_eq!(file.get_str("kiln.empty_string").unwrap(), "");
    assert_eq!(file.get_str("general.architecture").unwrap(), "kiln");
    assert_eq!(file.get_str_array("kiln.strings").unwrap(), ["<s>", "</s>", "", "Ġthe", "▁x", "日本"]);
    assert_eq!(file.get_i32_array("kiln.ints").unwrap(), [0, -1, 7, i32::MAX, i32::MIN]);
    assert_eq!(file.get_f32_array("kiln.floats").unwrap(), [0.5, -2.25, 1e-3]);
    assert_eq!(file.get_array("kiln.nested").unwrap().len(), 3);
    assert!(file.get("kiln.nowhere").is_none());

    let e = err(file.get_u32("kiln.string"), "a string read as u32");
    assert!(matches!(e, Error::InvalidArgument(_)));
    assert_names(&e, &["kiln.string", "u32", "string"]);
    assert_names(&err(file.get_u32("kiln.u64"), "no widening"), &["kiln.u64", "u32", "u64"]);
    assert_names(&err(file.get_f32("kiln.f64"), "no narrowing"), &["kiln.f64", "f32", "f64"]);
    assert_names(&err(file.get_str("kiln.nowhere"), "a missing key"), &["kiln.nowhere", "no metadata key"]);
    assert_names(
        &err(file.get_str_array("kiln.ints"), "ints read as strings"),
        &["kiln.ints", "array of string", "array of i32"],
    );
    assert_names(&err(file.get_u32_array("kiln.u32"), "a scalar read as an array"), &["kiln.u32", "array of u32"]);
    assert_names(&err(file.get_array("kiln.f32"), "a scalar read as an array"), &["kiln.f32", "array", "f32"]);
}

#[test]
fn tensor_infos_match_gguf_py() {
    for name in FILES {
        let want = expected_file(name);
        let file = GgufFile::open(fixture(name)).unwrap();
        let want_tensors = want["tensors"].as_array().unwrap();
        assert_eq!(file.tensor_infos().len(), want_tensors.len(), "{name}: tensor count");
        for (info, w) in file.tensor_infos().iter().zip(want_tensors) {
            let what = format!("{name}: tensor {}", info.name());
            assert_eq!(info.name(), w["name"].as_str().unwrap());
            assert!(info.ggml_type().name().eq_ignore_ascii_case(w["type"].as_str().unwrap()), "{what}: type");
            let dims: Vec<u64> = w["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            assert_eq!(info.dims(), dims, "{what}: dims");
            let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            assert_eq!(info.shape(), shape, "{what}: shape");
            assert_eq!(file.data_offset() + info.offset(), w["data_offset"].as_u64().unwrap(), "{what}: offset");
            assert_eq!(info.offset() % file.alignment(), 0, "{what}: aligned");
            assert_eq!(info.n_bytes(), w["n_bytes"].as_u64().unwrap(), "{what}: bytes");
            assert_eq!(file.tensor_bytes(info.name()).unwrap(), hex(w["bytes"].as_str().unwrap()), "{what}");
        }
    }
}

fn want_values(w: &Value) -> Vec<f32> {
    w["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// Exact, bit for bit: f16 and bf16 widen to f32 exactly, and a ggml block's `d·q` (an f16
/// scale times an integer of at most 8 bits) is exact in f32, in numpy and on every device.
fn assert_same_values(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: element count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: element {i} is {g}, gguf-py gives {w}");
    }
}

fn dense_tensors_match_gguf_py(device: &Device) {
    for name in FILES {
        let file = GgufFile::open(fixture(name)).unwrap();
        for w in expected_file(name)["tensors"].as_array().unwrap() {
            let tname = w["name"].as_str().unwrap();
            let dtype = match w["type"].as_str().unwrap() {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                _ => continue,
            };
            let what = format!("{name}: {tname} on {device}");
            let t = file.tensor(tname, device).unwrap();
            assert_eq!((t.dtype(), t.device()), (dtype, *device), "{what}");
            assert_eq!(t.shape(), file.tensor_info(tname).unwrap().shape(), "{what}: shape");
            assert_same_values(&what, &t.to_vec_f32().unwrap(), &want_values(w));
            let GgufTensor::Dense(again) = file.load(tname, device).unwrap() else {
                panic!("{what}: load is not dense")
            };
            assert_eq!(again.to_bytes().unwrap(), t.to_bytes().unwrap(), "{what}: load");
            assert_names(&err(file.qtensor(tname, device), "a dense tensor as a QTensor"), &[tname, "dense"]);
        }
    }
}

fn quantized_tensors_match_gguf_py(device: &Device) {
    for name in FILES {
        let file = GgufFile::open(fixture(name)).unwrap();
        for w in expected_file(name)["tensors"].as_array().unwrap() {
            let tname = w["name"].as_str().unwrap();
            let format = match w["type"].as_str().unwrap() {
                "Q8_0" => QuantFormat::Q8_0,
                "Q4_0" => QuantFormat::Q4_0,
                _ => continue,
            };
            let what = format!("{name}: {tname} on {device}");
            let q = file.qtensor(tname, device).unwrap();
            assert_eq!((q.format(), q.device()), (format, *device), "{what}");
            let shape = file.tensor_info(tname).unwrap().shape();
            assert_eq!(q.shape().to_vec(), shape, "{what}: shape");
            assert_eq!(q.to_bytes().unwrap(), hex(w["bytes"].as_str().unwrap()), "{what}: the blocks");
            let values = q.dequantize(DType::F32).unwrap().to_vec_f32().unwrap();
            assert_same_values(&what, &values, &want_values(w));
            let GgufTensor::Quantized(again) = file.load(tname, device).unwrap() else {
                panic!("{what}: load is not quantized")
            };
            assert_eq!(again.to_bytes().unwrap(), q.to_bytes().unwrap(), "{what}: load");
            let e = err(file.tensor(tname, device), "a quantized tensor as dense");
            assert!(matches!(e, Error::DType(_)), "{what}: {e}");
            assert_names(&e, &[tname, format.name(), "qtensor"]);
        }
    }
}

// Q4_1: once the quant family has `QuantFormat::Q4_1`, this becomes a q4_1 arm of
// `quantized_tensors_match_gguf_py` (the sidecar already holds gguf-py's bytes and values).
fn q4_1_is_refused_until_kiln_has_it(device: &Device) {
    let file = GgufFile::open(fixture("kiln.gguf")).unwrap();
    assert_eq!(file.tensor_info("quant.q4_1").unwrap().ggml_type(), GgmlType::Q4_1);
    for e in [
        err(file.qtensor("quant.q4_1", device), "q4_1 as a QTensor"),
        err(file.load("quant.q4_1", device).map(|_| ()), "q4_1 loaded"),
        err(file.tensor("quant.q4_1", device), "q4_1 as dense"),
    ] {
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert_names(&e, &["quant.q4_1", "q4_1"]);
    }
}

device_tests!(dense_tensors_match_gguf_py, quantized_tensors_match_gguf_py, q4_1_is_refused_until_kiln_has_it);

// ---------------------------------------------------------------------------------------
// Versions

#[test]
fn version_2_reads_as_version_3() {
    let mut bytes = std::fs::read(fixture("kiln.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = open_bytes("v2.gguf", &bytes).unwrap();
    let v3 = GgufFile::open(fixture("kiln.gguf")).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.metadata(), v3.metadata());
    assert_eq!(v2.tensor_infos(), v3.tensor_infos());
    let cpu = Device::Cpu;
    assert_eq!(
        v2.tensor("dense.f16", &cpu).unwrap().to_bytes().unwrap(),
        v3.tensor("dense.f16", &cpu).unwrap().to_bytes().unwrap()
    );
}

#[test]
fn other_versions_are_refused_naming_the_version() {
    let good = std::fs::read(fixture("kiln.gguf")).unwrap();
    for version in [0u32, 1, 4, 7, u32::MAX] {
        let mut bytes = good.clone();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let e = err(open_bytes("version.gguf", &bytes), &format!("version {version}"));
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert_names(&e, &[&format!("version {version}"), "byte 4"]);
    }
    let mut bytes = good.clone();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_names(&err(open_bytes("be.gguf", &bytes), "a big-endian file"), &["big-endian"]);
}

// ---------------------------------------------------------------------------------------
// Broken copies of the fixtures

#[test]
fn truncated_copies_are_refused() {
    for name in FILES {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let file = GgufFile::open(fixture(name)).unwrap();
        let last = file.tensor_infos().last().unwrap();
        let data_end = (file.data_offset() + last.offset() + last.n_bytes()) as usize;
        for cut in 0..bytes.len() {
            let result = open_bytes("cut.gguf", &bytes[..cut]);
            if cut < data_end {
                let e = err(result, &format!("{name} cut to {cut} bytes"));
                assert!(matches!(e, Error::Io(_)), "{name} cut to {cut}: {e}");
                assert_names(&e, &["byte"]);
            } else {
                // Only the padding after the last tensor is gone.
                result.unwrap();
            }
        }
    }
}

#[test]
fn each_broken_structural_field_is_refused_naming_the_byte() {
    for name in FILES {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let fields = g::fields(&bytes);
        assert!(fields.len() > 20, "{name}: the walker found {} fields", fields.len());
        for field in fields {
            for value in g::breaking_values(field, bytes.len() as u64) {
                let broken = g::with_field(&bytes, field, value);
                if broken == bytes {
                    continue;
                }
                let what = format!("{name}: {:?} at byte {} set to {value}", field.kind, field.at);
                let e = err(open_bytes("field.gguf", &broken), &what);
                assert!(matches!(e, Error::Io(_) | Error::Unsupported(_)), "{what}: {e}");
                assert_names(&e, &["byte"]);
            }
        }
    }
}

#[test]
fn flipped_bits_never_panic() {
    // Any bit of the file flipped: refused, or read (a value's bit is still a value); every
    // tensor that then loads has the bytes the file holds.
    let bytes = std::fs::read(fixture("kiln_align64.gguf")).unwrap();
    let cpu = Device::Cpu;
    let (mut refused, mut read) = (0, 0);
    for at in 0..bytes.len() {
        for bit in [0, 3, 7] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 1 << bit;
            let Ok(file) = open_bytes("flip.gguf", &flipped) else {
                refused += 1;
                continue;
            };
            read += 1;
            for info in file.tensor_infos() {
                match file.load(info.name(), &cpu) {
                    Ok(GgufTensor::Dense(t)) => {
                        assert_eq!(t.to_bytes().unwrap(), file.tensor_bytes(info.name()).unwrap())
                    }
                    Ok(GgufTensor::Quantized(q)) => {
                        assert_eq!(q.to_bytes().unwrap(), file.tensor_bytes(info.name()).unwrap())
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
    assert!(refused > 0 && read > 0, "{refused} refused, {read} read");
}

// ---------------------------------------------------------------------------------------
// Hand-built files

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `rows` Q8_0 rows of 32 weights: scale 0.5, codes 0..32.
fn q8_0_rows(rows: usize, scale: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rows {
        out.extend_from_slice(&scale.to_le_bytes());
        out.extend((0..32).map(|i| i as u8));
    }
    out
}

const HALF: u16 = 0x3800; // f16 0.5

fn refused(name: &str, b: &GgufBuilder, words: &[&str]) -> Error {
    let e = err(open_bytes("built.gguf", &b.bytes()), name);
    assert_names(&e, words);
    e
}

#[test]
fn minimal_files_read() {
    let file = open_bytes("empty-gguf.gguf", &GgufBuilder::new().bytes()).unwrap();
    assert!(file.metadata().is_empty() && file.tensor_infos().is_empty());
    assert_eq!(file.alignment(), 32);
    // Empty arrays, which gguf-py cannot write, keep their element type.
    let b = GgufBuilder::new().kv(kv("empty.strings", T_ARRAY, &array(T_STRING, 0, &[]))).kv(kv(
        "empty.u64",
        T_ARRAY,
        &array(T_U64, 0, &[]),
    ));
    let file = open_bytes("empty-arrays.gguf", &b.bytes()).unwrap();
    assert!(file.get_str_array("empty.strings").unwrap().is_empty());
    assert_eq!(file.get_array("empty.u64").unwrap(), &GgufArray::U64(vec![]));
    assert_names(&err(file.get_str_array("empty.u64"), "u64s as strings"), &["array of u64"]);
}

#[test]
fn alignments_other_than_32_place_the_data() {
    let values: Vec<f32> = (0..7).map(|i| i as f32 * 0.25 - 1.0).collect();
    let halves: Vec<u8> = [1.0f32, -2.0, 0.5].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    for alignment in [1u32, 2, 8, 64, 4096] {
        let mut b = GgufBuilder::new()
            .kv(kv_u32("general.alignment", alignment))
            .tensor(tensor("a", &[7], F32, f32_bytes(&values)))
            .tensor(tensor("b", &[3], F16, halves.clone()))
            .tensor(tensor("c", &[3], F32, f32_bytes(&values[..3])));
        b.alignment = alignment as u64;
        let file = open_bytes("aligned.gguf", &b.bytes()).unwrap();
        assert_eq!(file.alignment(), alignment as u64);
        assert_eq!(file.data_offset() % alignment as u64, 0);
        // At alignments under 4 the f32 data sits at unaligned addresses.
        let cpu = Device::Cpu;
        assert_eq!(file.tensor("a", &cpu).unwrap().to_vec::<f32>().unwrap(), values, "alignment {alignment}");
        assert_eq!(file.tensor("b", &cpu).unwrap().to_vec_f32().unwrap(), [1.0, -2.0, 0.5]);
        assert_eq!(file.tensor("c", &cpu).unwrap().to_vec::<f32>().unwrap(), values[..3]);
    }
}

#[test]
fn absurd_counts_and_lengths_are_refused_before_allocating() {
    let mut b = GgufBuilder::new();
    b.n_tensors = Some(u64::MAX);
    refused("n_tensors", &b, &["tensor count", "byte 8"]);
    let mut b = GgufBuilder::new();
    b.n_tensors = Some(1 << 40);
    refused("n_tensors", &b, &["tensor count", "byte 8"]);
    let mut b = GgufBuilder::new().kv(kv_u32("a", 1));
    b.n_kv = Some(u64::MAX / 2);
    refused("n_kv", &b, &["metadata key count", "byte 16"]);

    let b = GgufBuilder::new().kv(kv("s", T_STRING, &(1u64 << 40).to_le_bytes()));
    refused("string length", &b, &["length of the value of \"s\"", "byte 37"]);
    let mut key = (u64::MAX).to_le_bytes().to_vec();
    key.extend_from_slice(b"k");
    let b = GgufBuilder::new().kv(key);
    refused("key length", &b, &["length of metadata key 0", "byte 24"]);
    let b = GgufBuilder::new().kv(kv("bytes", T_ARRAY, &array(T_U8, 1 << 40, &[1, 2, 3])));
    refused("u8 array length", &b, &["length of the array \"bytes\"", "byte"]);
    let b = GgufBuilder::new().kv(kv("words", T_ARRAY, &array(T_STRING, u64::MAX / 8, &string(b"a"))));
    refused("string array length", &b, &["length of the array \"words\"", "byte"]);
    // Two strings promised, the second one's length beyond the file.
    let mut elements = string(b"a");
    elements.extend_from_slice(&(1u64 << 50).to_le_bytes());
    let b = GgufBuilder::new().kv(kv("words", T_ARRAY, &array(T_STRING, 2, &elements)));
    refused("a string in an array", &b, &["string 1 of the array \"words\"", "byte"]);
    // Arrays nested 100,000 deep: refused, not a stack overflow.
    let mut bomb = Vec::new();
    for _ in 0..100_000 {
        bomb.extend_from_slice(&T_ARRAY.to_le_bytes());
        bomb.extend_from_slice(&1u64.to_le_bytes());
    }
    bomb.extend_from_slice(&array(T_U8, 0, &[]));
    let b = GgufBuilder::new().kv(kv("deep", T_ARRAY, &bomb));
    refused("nested arrays", &b, &["\"deep\"", "nests arrays deeper", "byte"]);
}

#[test]
fn bad_magic_types_and_text_are_refused() {
    let mut bytes = GgufBuilder::new().bytes();
    bytes[..4].copy_from_slice(b"GGML");
    assert_names(&err(open_bytes("magic.gguf", &bytes), "GGML magic"), &["not a GGUF file", "GGML", "byte 0"]);
    assert_names(&err(open_bytes("short.gguf", b"GGU"), "3 bytes"), &["byte 0", "ends at byte 3"]);
    assert_names(&err(open_bytes("header.gguf", &GgufBuilder::new().bytes()[..12]), "a cut header"), &["tensor count"]);
    assert_names(&err(open_bytes("nothing.gguf", b""), "an empty file"), &["empty"]);
    let e = err(GgufFile::open(fixture("no-such-file.gguf")), "a missing file");
    assert!(matches!(e, Error::Io(_)) && e.to_string().contains("no-such-file.gguf"), "{e}");

    let b = GgufBuilder::new().kv(kv("x", 13, &[0; 8]));
    refused("value type 13", &b, &["type of \"x\"", "13", "byte 33"]);
    let b = GgufBuilder::new().kv(kv("x", T_ARRAY, &array(99, 1, &[0; 8])));
    refused("element type 99", &b, &["element type of the array \"x\"", "99"]);
    let b = GgufBuilder::new().kv(kv("flag", T_BOOL, &[2]));
    refused("bool 2", &b, &["\"flag\"", "bool of 2", "byte"]);
    let b = GgufBuilder::new().kv(kv("flags", T_ARRAY, &array(T_BOOL, 2, &[1, 7])));
    refused("bool 7 in an array", &b, &["element 1 of the array \"flags\"", "bool of 7"]);
    let b = GgufBuilder::new().kv(kv("s", T_STRING, &string(b"ok \xff\xfe")));
    refused("a string that is not UTF-8", &b, &["value of \"s\"", "not UTF-8", "byte"]);
    let mut key = string(b"k\xc3");
    key.extend_from_slice(&T_U32.to_le_bytes());
    key.extend_from_slice(&[0; 4]);
    refused("a key that is not UTF-8", &GgufBuilder::new().kv(key), &["metadata key 0", "not UTF-8", "byte 24"]);
    let b = GgufBuilder::new().kv(kv_u32("k", 1)).kv(kv_str("k", "again"));
    refused("a key twice", &b, &["\"k\"", "second time", "byte"]);
    for (value, words) in [
        (kv_u32("general.alignment", 0), &["general.alignment", "U32(0)", "byte 24"][..]),
        (kv_u32("general.alignment", 48), &["U32(48)", "power of two"][..]),
        (kv_str("general.alignment", "32"), &["a string"][..]),
        (kv("general.alignment", T_U64, &32u64.to_le_bytes()), &["U64(32)"][..]),
    ] {
        refused("a bad alignment", &GgufBuilder::new().kv(value), words);
    }
}

fn two_f32(first_dims: &[u64], second_offset: Option<u64>) -> GgufBuilder {
    let mut second = tensor("second", &[8], F32, f32_bytes(&[1.0; 8]));
    second.offset = second_offset;
    GgufBuilder::new().tensor(tensor("first", first_dims, F32, f32_bytes(&[0.5; 8]))).tensor(second)
}

#[test]
fn bad_tensor_infos_are_refused_naming_tensor_and_byte() {
    // The control: it loads.
    open_bytes("two.gguf", &two_f32(&[8], None).bytes()).unwrap();

    refused("misaligned offset", &two_f32(&[8], Some(8)), &["\"second\"", "offset 8", "alignment 32", "byte"]);
    refused("a gap between tensors", &two_f32(&[8], Some(64)), &["\"second\"", "offset 64", "\"first\"", "32 bytes"]);
    refused("overlapping tensors", &two_f32(&[16], None), &["\"second\"", "offset 32", "64 bytes", "do not match"]);
    refused("an offset far past the end", &two_f32(&[8], Some(1 << 40)), &["\"second\"", "offset 1099511627776"]);
    let mut b = GgufBuilder::new().tensor(tensor("w", &[8], F32, f32_bytes(&[1.0; 8])));
    b.tensors[0].data.truncate(16);
    let mut bytes = b.bytes();
    bytes.truncate(bytes.len() - 16); // the padding after w, and half of w
    let e = err(open_bytes("short-data.gguf", &bytes), "data past the end");
    assert_names(&e, &["\"w\"", "32 bytes", "past the end of the file", "byte"]);

    let b = GgufBuilder::new().tensor(tensor("w", &[8], F32, f32_bytes(&[0.0; 8]))).tensor(tensor(
        "w",
        &[8],
        F32,
        f32_bytes(&[0.0; 8]),
    ));
    refused("a name twice", &b, &["\"w\"", "twice", "tensor 0", "tensor 1", "byte"]);
    let b = GgufBuilder::new().tensor(tensor("huge", &[1 << 32, 1 << 32, 1 << 32], F32, vec![]));
    refused("dims whose product overflows", &b, &["\"huge\"", "more elements", "dimension 1", "byte"]);
    let b = GgufBuilder::new().tensor(tensor("huge", &[1 << 62], F32, vec![]));
    refused("bytes that overflow", &b, &["\"huge\"", "more bytes than fit", "byte"]);
    let b = GgufBuilder::new().tensor(tensor("z", &[4, 0], F32, vec![]));
    refused("a zero dim", &b, &["\"z\"", "dimension of 0", "dimension 1", "byte"]);
    let b = GgufBuilder::new().tensor(tensor("scalar", &[], F32, f32_bytes(&[1.0])));
    refused("no dims", &b, &["\"scalar\"", "0 dimensions", "byte"]);
    let b = GgufBuilder::new().tensor(tensor("five", &[1; 5], F32, f32_bytes(&[1.0])));
    refused("five dims", &b, &["\"five\"", "5 dimensions", "1 to 4"]);
    let b = GgufBuilder::new().tensor(tensor("q", &[33, 1], Q8_0, vec![0; 34]));
    refused("rows not whole blocks", &b, &["\"q\"", "q8_0", "33", "block of 32", "byte"]);
    for ty in [4, 5, 31, 99] {
        let b = GgufBuilder::new().tensor(tensor("t", &[32], ty, vec![0; 32]));
        refused("an unknown ggml type", &b, &["\"t\"", &format!("type {ty}"), "no ggml type", "byte"]);
    }
}

#[test]
fn tensors_kiln_does_not_read_are_refused_naming_type_and_tensor() {
    let b = GgufBuilder::new()
        .tensor(tensor("blk.0.ffn_down.weight", &[256, 2], Q4_K, vec![0; 2 * 144]))
        .tensor(tensor("ids", &[4], I32, [7i32, -100, 0, i32::MAX].iter().flat_map(|v| v.to_le_bytes()).collect()))
        .tensor(tensor("bytes", &[4], I8, vec![0; 4]))
        .tensor(tensor("cube", &[32, 2, 2], Q8_0, q8_0_rows(4, HALF)))
        .tensor(tensor("row", &[64], Q4_0, vec![0; 36]))
        .tensor(tensor("inf", &[32, 2], Q8_0, [q8_0_rows(1, HALF), q8_0_rows(1, 0x7c00)].concat()));
    let file = open_bytes("unsupported.gguf", &b.bytes()).unwrap();
    let cpu = Device::Cpu;
    // i32 tensors load as kiln's I32.
    let ids = file.tensor("ids", &cpu).unwrap();
    assert_eq!((ids.shape(), ids.to_vec::<i32>().unwrap()), (&[4usize][..], vec![7, -100, 0, i32::MAX]));
    for (name, ty) in [("blk.0.ffn_down.weight", "q4_K"), ("bytes", "i8")] {
        assert_eq!(file.tensor_info(name).unwrap().ggml_type().name(), ty);
        for e in [
            err(file.tensor(name, &cpu), name),
            err(file.qtensor(name, &cpu), name),
            err(file.load(name, &cpu).map(|_| ()), name),
        ] {
            assert!(matches!(e, Error::Unsupported(_)), "{e}");
            assert_names(&e, &[name, ty, "q8_0"]);
        }
        // Its bytes are still there for a caller that decodes the type itself.
        assert_eq!(file.tensor_bytes(name).unwrap().len() as u64, file.tensor_info(name).unwrap().n_bytes());
    }
    let e = err(file.qtensor("cube", &cpu), "a 3-D quantized tensor");
    assert!(matches!(e, Error::Shape(_)), "{e}");
    assert_names(&e, &["\"cube\"", "[2, 2, 32]", "[out, in]"]);
    assert_names(&err(file.qtensor("row", &cpu), "a 1-D quantized tensor"), &["\"row\"", "[64]"]);
    let e = err(file.qtensor("inf", &cpu), "an infinite block scale");
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_names(&e, &["\"inf\"", "block 1", "inf"]);
    let e = err(file.tensor("nowhere", &cpu), "a missing tensor");
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_names(&e, &["\"nowhere\"", "6 tensors"]);
}
