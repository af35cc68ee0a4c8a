//! GGUF out: `GgufWriter` round-trips every metadata type and F32 / F16 / BF16 / Q8_0
//! tensors through `GgufFile`, and refuses bad input; `export_gguf` merges a LoRA adapter into
//! the tiny model (from Hugging Face files and from a Q8_0 GGUF) and writes a file whose
//! weights are the merged ones within Q8_0's rounding (checked here against a merge computed
//! in f64 by the test, and by gguf-py through tests/fixtures/check_gguf_export.py when Python
//! has `gguf`), whose tokenizer is the source's, which kiln loads back and runs with the
//! adapted model's logits and greedy tokens, and which llama.cpp runs with kiln's logits when
//! Python has `llama_cpp`.

#[macro_use]
mod common;

use kiln::io::{GgmlType, GgufArray, GgufFile, GgufValue, GgufWriter, SafetensorsFile};
use kiln::model::{Llama, LoadOptions, Logits, LoraAdapter, LoraConfig, LoraLayer, Sequence, Tokenizer, export_gguf};
use kiln::ops::{QTensor, QuantFormat};
use kiln::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// The writer

/// One value of every type, arrays of every element type, and arrays of arrays.
fn every_value() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-100)),
        ("t.u16", GgufValue::U16(60000)),
        ("t.i16", GgufValue::I16(-30000)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-2_000_000_000)),
        ("t.f32", GgufValue::F32(-1.5e-7)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.string", GgufValue::String("héllo <|im_start|>\n".into())),
        ("t.u64", GgufValue::U64(u64::MAX - 3)),
        ("t.i64", GgufValue::I64(i64::MIN + 5)),
        ("t.f64", GgufValue::F64(std::f64::consts::PI)),
        ("a.u8", GgufValue::Array(GgufArray::U8(vec![0, 255]))),
        ("a.i8", GgufValue::Array(GgufArray::I8(vec![-128, 127]))),
        ("a.u16", GgufValue::Array(GgufArray::U16(vec![1, 65535]))),
        ("a.i16", GgufValue::Array(GgufArray::I16(vec![-32768, 2]))),
        ("a.u32", GgufValue::Array(GgufArray::U32(vec![7; 5]))),
        ("a.i32", GgufValue::Array(GgufArray::I32(vec![-1, 0, 1]))),
        ("a.f32", GgufValue::Array(GgufArray::F32(vec![0.25, -0.0, f32::MAX]))),
        ("a.bool", GgufValue::Array(GgufArray::Bool(vec![true, false, true]))),
        ("a.string", GgufValue::Array(GgufArray::String(vec!["a b".into(), String::new(), "Ġthe".into()]))),
        ("a.u64", GgufValue::Array(GgufArray::U64(vec![u64::MAX]))),
        ("a.i64", GgufValue::Array(GgufArray::I64(vec![i64::MIN, 0]))),
        ("a.f64", GgufValue::Array(GgufArray::F64(vec![1e300, -2.5]))),
        ("a.empty", GgufValue::Array(GgufArray::U32(vec![]))),
        (
            "a.nested",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::String(vec!["x".into()]),
                GgufArray::I32(vec![1, 2]),
                GgufArray::Array(vec![GgufArray::F64(vec![0.5])]),
            ])),
        ),
    ]
}

/// ggml's `quantize_row_q8_0_ref`, written out: per block of 32, d = amax / 127, q =
/// round(x / d) (half away from zero), d stored as f16.
fn reference_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| ((x * id).round() as i8) as u8));
    }
    out
}

fn writer_round_trip(alignment: Option<u32>) {
    let dir = temp(&format!("writer-{alignment:?}"));
    let path = dir.join("all.gguf");
    let mut w = GgufWriter::new();
    if let Some(a) = alignment {
        w.add_metadata("general.alignment", GgufValue::U32(a)).unwrap();
    }
    for (k, v) in every_value() {
        w.add_metadata(k, v).unwrap();
    }
    let f32_t = Tensor::randn(&[3, 5], 0.0, 1.0, 1, DType::F32, &Device::Cpu).unwrap();
    let f16_src = Tensor::randn(&[2, 3, 7], 0.0, 3.0, 2, DType::F32, &Device::Cpu).unwrap();
    let bf16_src = Tensor::randn(&[11], 0.0, 3.0, 3, DType::F32, &Device::Cpu).unwrap();
    let q_src = Tensor::randn(&[5, 96], 0.0, 0.1, 4, DType::F32, &Device::Cpu).unwrap();
    w.add_tensor("f32", &f32_t, GgmlType::F32).unwrap();
    w.add_tensor("f16", &f16_src, GgmlType::F16).unwrap();
    w.add_tensor("bf16", &bf16_src, GgmlType::BF16).unwrap();
    w.add_tensor("q8_0", &q_src, GgmlType::Q8_0).unwrap();
    let raw = reference_q8_0(&q_src.to_vec_f32().unwrap());
    w.add_raw("q8_0.raw", &[5, 96], GgmlType::Q8_0, raw.clone()).unwrap();
    w.write(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes().unwrap());

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), alignment.unwrap_or(32) as u64);
    assert_eq!(file.data_offset() % file.alignment(), 0);
    for (k, v) in every_value() {
        assert_eq!(file.get(k), Some(&v), "{k}");
    }
    let names: Vec<&str> = file.tensor_infos().iter().map(|t| t.name()).collect();
    assert_eq!(names, ["f32", "f16", "bf16", "q8_0", "q8_0.raw"]);
    assert_eq!(file.tensor_info("f16").unwrap().dims(), &[7, 3, 2]);
    assert_eq!(file.tensor_info("q8_0").unwrap().dims(), &[96, 5]);
    assert_eq!(file.tensor_info("q8_0").unwrap().ggml_type(), GgmlType::Q8_0);
    assert_eq!(file.tensor("f32", &Device::Cpu).unwrap().to_vec_f32().unwrap(), f32_t.to_vec_f32().unwrap());
    let f16_back = file.tensor("f16", &Device::Cpu).unwrap();
    assert_eq!((f16_back.dtype(), f16_back.shape()), (DType::F16, &[2usize, 3, 7][..]));
    let f16_want: Vec<f32> = f16_src.to_vec_f32().unwrap().iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    assert_eq!(f16_back.to_vec_f32().unwrap(), f16_want);
    let bf16_want: Vec<f32> =
        bf16_src.to_vec_f32().unwrap().iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(file.tensor("bf16", &Device::Cpu).unwrap().to_vec_f32().unwrap(), bf16_want);
    assert_eq!(file.tensor_bytes("q8_0").unwrap(), raw.as_slice(), "Q8_0 blocks differ from ggml's reference");
    assert_eq!(file.tensor_bytes("q8_0.raw").unwrap(), raw.as_slice());
    let q = file.qtensor("q8_0", &Device::Cpu).unwrap();
    assert_eq!((q.format(), q.shape()), (QuantFormat::Q8_0, [5, 96]));
    for t in file.tensor_infos() {
        assert_eq!(t.offset() % file.alignment(), 0, "{}", t.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writer_round_trips_every_type() {
    writer_round_trip(None);
}

#[test]
fn writer_honours_the_alignment() {
    writer_round_trip(Some(64));
    writer_round_trip(Some(1));
}

#[test]
fn writer_refuses_bad_input() {
    let t = Tensor::zeros(&[2, 64], DType::F32, &Device::Cpu).unwrap();
    let mut w = GgufWriter::new();
    w.add_metadata("k", GgufValue::U8(1)).unwrap();
    assert!(w.add_metadata("k", GgufValue::U8(2)).is_err(), "a key twice");
    assert!(w.add_metadata("", GgufValue::U8(2)).is_err(), "an empty key");
    for bad in [GgufValue::U32(48), GgufValue::U32(0), GgufValue::U64(32), GgufValue::String("32".into())] {
        assert!(w.add_metadata("general.alignment", bad.clone()).is_err(), "alignment {bad:?}");
    }
    w.add_tensor("t", &t, GgmlType::Q8_0).unwrap();
    assert!(w.add_tensor("t", &t, GgmlType::F32).is_err(), "a tensor name twice");
    let odd = Tensor::zeros(&[2, 33], DType::F32, &Device::Cpu).unwrap();
    assert!(w.add_tensor("odd", &odd, GgmlType::Q8_0).is_err(), "rows not whole blocks");
    let five = Tensor::zeros(&[1, 1, 1, 1, 2], DType::F32, &Device::Cpu).unwrap();
    assert!(w.add_tensor("five", &five, GgmlType::F32).is_err(), "five dimensions");
    let nan = Tensor::from_slice(&[f32::NAN; 32], &[1, 32], &Device::Cpu).unwrap();
    assert!(w.add_tensor("nan", &nan, GgmlType::Q8_0).is_err(), "NaN quantized");
    let huge = Tensor::from_slice(&[1e6f32; 4], &[4], &Device::Cpu).unwrap();
    assert!(w.add_tensor("huge", &huge, GgmlType::F16).is_err(), "f16 overflow");
    let ints = Tensor::zeros(&[4], DType::I32, &Device::Cpu).unwrap();
    assert!(w.add_tensor("ints", &ints, GgmlType::F32).is_err(), "an integer tensor");
    assert!(w.add_tensor("k4", &t, GgmlType::Q4_K).is_err(), "a type kiln does not write");
    // A block whose f16 scale is infinite.
    let mut block = vec![0u8; 34];
    block[..2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    assert!(w.add_raw("inf", &[1, 32], GgmlType::Q8_0, block.clone()).is_err(), "an infinite scale");
    assert!(w.add_raw("short", &[1, 32], GgmlType::Q8_0, block[..33].to_vec()).is_err(), "a byte short");
    assert!(w.add_raw("zero", &[0, 32], GgmlType::F32, vec![]).is_err(), "a zero dimension");
    // Nothing refused was added: the file holds the one tensor and the one key.
    let file = temp("refused").join("ok.gguf");
    w.write(&file).unwrap();
    let back = GgufFile::open(&file).unwrap();
    assert_eq!(back.tensor_infos().len(), 1);
    assert_eq!(back.metadata().len(), 1);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

// ---------------------------------------------------------------------------------------
// Export

/// The three prompts of `expected.safetensors` (7, 12 and 3 ids).
fn prompts() -> Vec<Vec<u32>> {
    let file = SafetensorsFile::open(fixtures().join("expected.safetensors")).unwrap();
    (0..3)
        .map(|i| {
            let (_, _, bytes) = file.raw(&format!("ids.{i}")).unwrap();
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
        })
        .collect()
}

fn load(path: &Path, device: &Device) -> Llama {
    Llama::load(path, &LoadOptions::new(device)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The merged weights computed here, in f64 from the base's f32 values: `W + s·B·A`, in
/// Hugging Face's names and row order.
fn merged_weights(model: &Llama, adapter: &LoraAdapter) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    let f32s = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().to_vec_f32().unwrap();
    out.insert("model.embed_tokens.weight".to_string(), f32s(&model.weights.embed.to_f32().unwrap()));
    out.insert("model.norm.weight".to_string(), f32s(&model.weights.norm));
    if let Some(head) = &model.weights.lm_head {
        out.insert("lm_head.weight".to_string(), f32s(&head.to_f32().unwrap()));
    }
    let names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    for (l, layer) in model.weights.layers.iter().enumerate() {
        out.insert(format!("model.layers.{l}.input_layernorm.weight"), f32s(&layer.attn_norm));
        out.insert(format!("model.layers.{l}.post_attention_layernorm.weight"), f32s(&layer.mlp_norm));
        for (p, name) in names.iter().enumerate() {
            let group = if p >= 4 { "mlp" } else { "self_attn" };
            let module = format!("model.layers.{l}.{group}.{name}");
            let linear = layer.projection(name).unwrap();
            let [rows, cols] = linear.weight.shape();
            let mut w = f32s(&linear.weight.to_f32().unwrap());
            if let Some(lora) = adapter.layers.get(&module) {
                let (a, b, s) = (f32s(&lora.a), f32s(&lora.b), adapter.scale(&module) as f64);
                let r = a.len() / cols;
                for o in 0..rows {
                    for i in 0..cols {
                        let delta: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * cols + i] as f64).sum();
                        w[o * cols + i] = (w[o * cols + i] as f64 + s * delta) as f32;
                    }
                }
            }
            out.insert(format!("{module}.weight"), w);
            if let Some(bias) = &linear.bias {
                out.insert(format!("{module}.bias"), f32s(bias));
            }
        }
    }
    out
}

/// Q8_0's rounding of a block of `want`: half a step amax/127, plus the step's own rounding
/// to f16 (2⁻¹¹ relative) on up to 127 steps, plus f32's own merge rounding.
fn assert_q8_0_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (b, (g, w)) in got.chunks(32).zip(want.chunks(32)).enumerate() {
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let bound = amax / 127.0 * (0.5 + 127.0 * 2f64.powi(-11)) * (1.0 + 1e-5) + 1e-7 * amax;
        for (i, (x, y)) in g.iter().zip(w).enumerate() {
            assert!(
                ((x - y) as f64).abs() <= bound,
                "{what}: block {b} element {i}: got {x}, merged {y}, beyond Q8_0's bound {bound}"
            );
        }
    }
}

/// The exported model's weights (loaded by kiln, q/k back in Hugging Face's order) against
/// the merge computed here.
fn assert_weights_match(exported: &Llama, merged: &BTreeMap<String, Vec<f32>>) {
    let f32s = |w: &kiln::model::Weight| w.to_f32().unwrap().to_device(&Device::Cpu).unwrap().to_vec_f32().unwrap();
    assert_q8_0_close("token_embd", &f32s(&exported.weights.embed), &merged["model.embed_tokens.weight"]);
    let names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    for (l, layer) in exported.weights.layers.iter().enumerate() {
        for (p, name) in names.iter().enumerate() {
            let group = if p >= 4 { "mlp" } else { "self_attn" };
            let key = format!("model.layers.{l}.{group}.{name}");
            let linear = layer.projection(name).unwrap();
            assert!(matches!(linear.weight, kiln::model::Weight::Quantized(_)), "{key} is not quantized");
            assert_q8_0_close(&key, &f32s(&linear.weight), &merged[&format!("{key}.weight")]);
        }
        let norm = layer.attn_norm.to_device(&Device::Cpu).unwrap().to_vec_f32().unwrap();
        assert_eq!(norm, merged[&format!("model.layers.{l}.input_layernorm.weight")]);
    }
}

/// Each prompt's logits at every position, alone, with `adapter` (a loaded one's name).
fn logits(model: &Llama, adapter: Option<&str>, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    prompts
        .iter()
        .map(|p| {
            let seq = Sequence::new(p).with_adapter(adapter);
            model.forward(&[seq], None, Logits::All).unwrap().to_vec_f32().unwrap()
        })
        .collect()
}

/// The tolerance Q8_0 justifies on this model's logits: the largest change transformers
/// measured on the same prompts between the f32 tiny model and its Q8_0 GGUF (one Q8_0
/// rounding of every weight), doubled because the export's rounding falls on other weights
/// (the merged ones) and the test's model is itself compared, not the reference.
fn q8_0_logit_tolerance() -> f32 {
    let file = SafetensorsFile::open(fixtures().join("expected.safetensors")).unwrap();
    let mut worst = 0f32;
    for i in 0..3 {
        let f = file.tensor(&format!("tiny.logits.{i}"), &Device::Cpu).unwrap().to_vec_f32().unwrap();
        let q = file.tensor(&format!("gguf.tiny-q8_0.logits.{i}"), &Device::Cpu).unwrap().to_vec_f32().unwrap();
        worst = f.iter().zip(&q).fold(worst, |m, (a, b)| m.max((a - b).abs()));
    }
    2.0 * worst
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
}

fn mean_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let (sum, n) = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold((0f64, 0usize), |(s, n), d| (s + d as f64, n + 1));
    (sum / n as f64) as f32
}

/// Greedy tokens, `steps` of them, recomputing the whole sequence each step, and the
/// smallest top-1 minus top-2 margin met.
fn greedy(model: &Llama, adapter: Option<&str>, prompt: &[u32], steps: usize) -> (Vec<u32>, f32) {
    let mut ids = prompt.to_vec();
    let mut margin = f32::INFINITY;
    for _ in 0..steps {
        let seq = Sequence::new(&ids).with_adapter(adapter);
        let last = model.forward(&[seq], None, Logits::Last).unwrap().to_vec_f32().unwrap();
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        margin = margin.min(last[order[0]] - last[order[1]]);
        ids.push(order[0] as u32);
    }
    (ids[prompt.len()..].to_vec(), margin)
}

fn python_has(module: &str) -> Result<(), String> {
    match Command::new("python3").args(["-c", &format!("import {module}")]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "python3 cannot import {module}: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        )),
        Err(e) => Err(format!("no python3: {e}")),
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) {
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    std::fs::write(path, kiln::io::to_bytes(&named, &Default::default()).unwrap()).unwrap();
}

/// gguf-py's check of the export against the merge computed here, and llama.cpp's logits
/// against kiln's for the exported file.
fn python_checks(
    name: &str,
    dir: &Path,
    out: &Path,
    merged: &BTreeMap<String, Vec<f32>>,
    model: &Llama,
    exported_logits: &[Vec<f32>],
    tolerance: f32,
) {
    if let Err(why) = python_has("gguf") {
        println!("SKIP the gguf-py check of {name}: {why}");
        return;
    }
    let c = &model.config;
    let shape_of = |key: &str| -> Vec<usize> {
        if key.contains("norm") || key.ends_with(".bias") {
            return vec![merged[key].len()];
        }
        let len = merged[key].len();
        let cols = if key.contains("down_proj") || key.contains("o_proj") {
            if key.contains("down_proj") { c.intermediate_size } else { c.num_heads * c.head_dim }
        } else {
            c.hidden_size
        };
        vec![len / cols, cols]
    };
    let tensors: Vec<(String, Tensor)> =
        merged.iter().map(|(k, v)| (k.clone(), Tensor::from_slice(v, &shape_of(k), &Device::Cpu).unwrap())).collect();
    let merged_path = dir.join("merged.safetensors");
    write_safetensors(&merged_path, &tensors);
    let mut args = vec![out.to_path_buf(), merged_path];
    match python_has("llama_cpp") {
        Ok(()) => {
            let mut t: Vec<(String, Tensor)> = Vec::new();
            for (i, (p, l)) in prompts().iter().zip(exported_logits).enumerate() {
                let ids: Vec<i32> = p.iter().map(|&x| x as i32).collect();
                t.push((format!("ids.{i}"), Tensor::from_slice(&ids, &[ids.len()], &Device::Cpu).unwrap()));
                t.push((format!("logits.{i}"), Tensor::from_slice(l, &[p.len(), c.vocab_size], &Device::Cpu).unwrap()));
            }
            // llama.cpp's CPU path rounds the activations to 8 bits per block as well: on the
            // converter's own tiny-q8_0.gguf its logits lie up to 0.33 from transformers'
            // (measured with llama-cpp-python 0.3.36), within the same bound.
            t.push(("tolerance".into(), Tensor::from_slice(&[tolerance], &[1], &Device::Cpu).unwrap()));
            let logits_path = dir.join("kiln_logits.safetensors");
            write_safetensors(&logits_path, &t);
            args.push("--llama-cpp".into());
            args.push(logits_path);
        }
        Err(why) => println!("SKIP the llama.cpp check of {name}: {why}"),
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_gguf_export.py");
    let result = Command::new("python3").arg(&script).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    println!("{name}: {stdout}");
    assert!(result.status.success(), "{name}: {stdout}\n{}", String::from_utf8_lossy(&result.stderr));
}

/// Exports `base` (a fixture: a folder or a GGUF) with adapter-tiny merged and checks the file.
fn export_matches_adapted_model(device: &Device, base: &str) {
    let dir = temp(&format!("{base}-{device}"));
    let source =
        if base.ends_with(".gguf") { fixtures().join(base) } else { common::hf_folder_with_tokenizer(base, &dir) };
    let mut model = load(&source, device);
    let adapter = LoraAdapter::load_peft(fixtures().join("adapter-tiny"), device).unwrap();
    let out = dir.join("merged.gguf");
    export_gguf(&model, Some(&adapter), &source, &out).unwrap();

    // Every tensor, of llama.cpp's type and shape; the metadata.
    let file = GgufFile::open(&out).unwrap();
    let c = model.config.clone();
    let mut expected: Vec<(String, GgmlType, Vec<u64>)> =
        vec![("token_embd.weight".into(), GgmlType::Q8_0, vec![c.hidden_size as u64, c.vocab_size as u64])];
    let (h, f, q, kv) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        (c.num_heads * c.head_dim) as u64,
        (c.num_kv_heads * c.head_dim) as u64,
    );
    for l in 0..c.num_layers {
        expected.push((format!("blk.{l}.attn_norm.weight"), GgmlType::F32, vec![h]));
        expected.push((format!("blk.{l}.ffn_norm.weight"), GgmlType::F32, vec![h]));
        for (n, dims) in [
            ("attn_q", [h, q]),
            ("attn_k", [h, kv]),
            ("attn_v", [h, kv]),
            ("attn_output", [q, h]),
            ("ffn_gate", [h, f]),
            ("ffn_up", [h, f]),
            ("ffn_down", [f, h]),
        ] {
            expected.push((format!("blk.{l}.{n}.weight"), GgmlType::Q8_0, dims.to_vec()));
        }
    }
    expected.push(("output_norm.weight".into(), GgmlType::F32, vec![h]));
    let mut got: Vec<(String, GgmlType, Vec<u64>)> =
        file.tensor_infos().iter().map(|t| (t.name().to_string(), t.ggml_type(), t.dims().to_vec())).collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, expected);
    assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(file.get_u32("general.file_type").unwrap(), 7);
    assert_eq!(file.get_u32("general.alignment").unwrap(), 32);
    for (key, v) in [
        ("llama.block_count", c.num_layers),
        ("llama.embedding_length", c.hidden_size),
        ("llama.feed_forward_length", c.intermediate_size),
        ("llama.attention.head_count", c.num_heads),
        ("llama.attention.head_count_kv", c.num_kv_heads),
        ("llama.rope.dimension_count", c.head_dim),
        ("llama.context_length", c.max_position_embeddings),
        ("llama.vocab_size", c.vocab_size),
    ] {
        assert_eq!(file.get_u32(key).unwrap() as usize, v, "{key}");
    }
    assert_eq!(file.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), c.rms_norm_eps);
    assert_eq!(file.get_f32("llama.rope.freq_base").unwrap(), c.rope.theta as f32);

    // The tokenizer: the GGUF's keys copied; from Hugging Face files, the converter's keys,
    // which for this vocabulary are the ones make_llama.py wrote as the converter does.
    let reference =
        GgufFile::open(if base.ends_with(".gguf") { fixtures().join(base) } else { fixtures().join("tiny-f32.gguf") })
            .unwrap();
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.model",
    ] {
        assert_eq!(file.get(key), reference.get(key), "{key}");
    }
    if base.ends_with(".gguf") {
        for (key, value) in reference.metadata().iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
            assert_eq!(file.get(key), Some(value), "{key}");
        }
    } else {
        assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "gpt-2");
        assert_eq!(file.get_str("tokenizer.chat_template").unwrap(), common::CHAT_TEMPLATE);
        assert!(!file.get_bool("tokenizer.ggml.add_eos_token").unwrap());
    }

    // The weights: the merge computed here, within Q8_0's rounding, q/k in kiln's order.
    let merged = merged_weights(&model, &adapter);
    let exported = load(&out, device);
    assert_weights_match(&exported, &merged);

    // The logits: the adapted model's, within what Q8_0 moves them; much nearer to it than
    // to the base.
    let prompts = prompts();
    let base_logits = logits(&model, None, &prompts);
    model.load_adapter("tuned", adapter).unwrap();
    let adapted = logits(&model, Some("tuned"), &prompts);
    let from_export = logits(&exported, None, &prompts);
    let tolerance = q8_0_logit_tolerance();
    let (err, moved) = (max_diff(&from_export, &adapted), mean_diff(&base_logits, &adapted));
    println!(
        "{base} on {device}: export vs adapted max |Δlogit| {err:.4} (tolerance {tolerance:.4}, mean {:.4}); the \
         adapter moves logits by a mean of {moved:.3}",
        mean_diff(&from_export, &adapted)
    );
    assert!(err <= tolerance, "{base}: the export's logits are {err} from the adapted model's (tolerance {tolerance})");
    assert!(mean_diff(&from_export, &adapted) < moved / 10.0, "{base}: the export does not carry the adapter");

    // Greedy tokens: the adapted model's greedy continuation of each prompt, fed to both
    // models: at every position where the adapted model's top-1 leads its top-2 by more than
    // twice the tolerance, the export picks the same token (a nearer tie may go either way
    // under Q8_0); where a whole continuation has that margin, generating from the export
    // gives the same tokens.
    let (mut compared, mut agreed, mut positions) = (0, 0, 0);
    for p in &prompts {
        let (continuation, margin) = greedy(&model, Some("tuned"), p, 8);
        if margin > 2.0 * tolerance {
            assert_eq!(greedy(&exported, None, p, 8).0, continuation, "{base}: greedy tokens differ");
        }
        let ids: Vec<u32> = p.iter().chain(&continuation).copied().collect();
        let want = logits(&model, Some("tuned"), std::slice::from_ref(&ids)).remove(0);
        let got = logits(&exported, None, std::slice::from_ref(&ids)).remove(0);
        for (w, g) in want.chunks(c.vocab_size).zip(got.chunks(c.vocab_size)) {
            let mut order: Vec<usize> = (0..w.len()).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
            let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
            positions += 1;
            agreed += usize::from(top(g) == order[0]);
            if w[order[0]] - w[order[1]] > 2.0 * tolerance {
                assert_eq!(top(g), order[0], "{base}: the export's top token differs where the margin allows");
                compared += 1;
            }
        }
    }
    println!(
        "top tokens: {agreed} of {positions} positions agree; {compared} with a margin > {:.3} checked",
        2.0 * tolerance
    );
    assert!(compared >= 3, "only {compared} positions have a margin that allows the comparison");

    if device.is_cpu() {
        python_checks(base, &dir, &out, &merged, &model, &from_export, tolerance);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn export_from_hf_folder(device: &Device) {
    export_matches_adapted_model(device, "tiny");
}

fn export_from_q8_0_gguf(device: &Device) {
    export_matches_adapted_model(device, "tiny-q8_0.gguf");
}

device_tests!(export_from_hf_folder, export_from_q8_0_gguf);

/// Without an adapter, a Q8_0 base comes back block for block: dequantizing and
/// re-quantizing a Q8_0 block gives it again, and the q/k rows return to the file's order.
#[test]
fn export_of_a_q8_0_base_reproduces_its_blocks() {
    let dir = temp("q8_0-base");
    let source = fixtures().join("tiny-q8_0.gguf");
    let model = load(&source, &Device::Cpu);
    let out = dir.join("base.gguf");
    export_gguf(&model, None, &source, &out).unwrap();
    let (a, b) = (GgufFile::open(&source).unwrap(), GgufFile::open(&out).unwrap());
    for t in a.tensor_infos() {
        let other = b.tensor_info(t.name()).unwrap();
        assert_eq!((t.ggml_type(), t.dims()), (other.ggml_type(), other.dims()), "{}", t.name());
        assert!(a.tensor_bytes(t.name()).unwrap() == b.tensor_bytes(t.name()).unwrap(), "{} differs", t.name());
    }
    assert_eq!(a.tensor_infos().len(), b.tensor_infos().len());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Biases (q/k permuted like their weights), an untied head, llama3 rope scaling written as
/// llama.cpp's `rope_freqs.weight`: tiny-bias from its bf16 shards, with adapter-tiny-bias.
#[test]
fn export_of_biases_untied_head_and_llama3_rope() {
    let dir = temp("bias");
    let source = common::hf_folder_with_tokenizer("tiny-bias", &dir);
    let model = load(&source, &Device::Cpu);
    let adapter = LoraAdapter::load_peft(fixtures().join("adapter-tiny-bias"), &Device::Cpu).unwrap();
    let out = dir.join("bias.gguf");
    export_gguf(&model, Some(&adapter), &source, &out).unwrap();
    let file = GgufFile::open(&out).unwrap();
    let c = &model.config;
    let merged = merged_weights(&model, &adapter);
    assert_eq!(file.tensor_info("output.weight").unwrap().ggml_type(), GgmlType::Q8_0);
    let head = file.qtensor("output.weight", &Device::Cpu).unwrap().dequantize(DType::F32).unwrap();
    assert_q8_0_close("output.weight", &head.to_vec_f32().unwrap(), &merged["lm_head.weight"]);
    // transformers' reverse of the converter's permutation, written out: row h·hd + 2j + t
    // of the file is row h·hd + t·hd/2 + j of Hugging Face's.
    let unpermute = |v: &[f32], heads: usize| -> Vec<f32> {
        let hd = v.len() / heads;
        (0..v.len()).map(|r| v[(r / hd) * hd + 2 * (r % (hd / 2)) + (r % hd) / (hd / 2)]).collect()
    };
    for l in 0..c.num_layers {
        for (n, hf, heads) in [
            ("attn_q", "self_attn.q_proj", Some(c.num_heads)),
            ("attn_k", "self_attn.k_proj", Some(c.num_kv_heads)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
        ] {
            let name = format!("blk.{l}.{n}.bias");
            assert_eq!(file.tensor_info(&name).unwrap().ggml_type(), GgmlType::F32, "{name}");
            let v = file.tensor(&name, &Device::Cpu).unwrap().to_vec_f32().unwrap();
            let v = heads.map_or(v.clone(), |h| unpermute(&v, h));
            assert_eq!(v, merged[&format!("model.layers.{l}.{hf}.bias")], "{name}");
        }
    }
    // transformers' _compute_llama3_parameters (factor 8, low 1, high 4, original 32), as the
    // divisor of each frequency.
    let freqs = file.tensor("rope_freqs.weight", &Device::Cpu).unwrap().to_vec_f32().unwrap();
    assert_eq!(freqs.len(), c.head_dim / 2);
    for (i, &f) in freqs.iter().enumerate() {
        let inv_freq = 1.0 / 10000f64.powf(2.0 * i as f64 / c.head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        let scaled = if wavelen < 32.0 / 4.0 {
            inv_freq
        } else if wavelen > 32.0 {
            inv_freq / 8.0
        } else {
            let smooth = (32.0 / wavelen - 1.0) / (4.0 - 1.0);
            (1.0 - smooth) * inv_freq / 8.0 + smooth * inv_freq
        };
        assert!(
            ((inv_freq / scaled) as f32 - f).abs() <= 1e-5 * f,
            "rope_freqs[{i}] = {f}, want {}",
            inv_freq / scaled
        );
    }
    if python_has("gguf").is_ok() {
        let shapes: Vec<(String, Tensor)> = merged
            .iter()
            .map(|(k, v)| {
                let t = Tensor::from_slice(v, &[v.len()], &Device::Cpu).unwrap();
                let shape = if k.contains("norm") || k.ends_with(".bias") {
                    vec![v.len()]
                } else {
                    let cols = if k.contains("down_proj") {
                        c.intermediate_size
                    } else if k.contains("o_proj") {
                        c.num_heads * c.head_dim
                    } else {
                        c.hidden_size
                    };
                    vec![v.len() / cols, cols]
                };
                (k.clone(), t.reshape(&shape).unwrap())
            })
            .collect();
        let merged_path = dir.join("merged.safetensors");
        write_safetensors(&merged_path, &shapes);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_gguf_export.py");
        let result = Command::new("python3").arg(&script).arg(&out).arg(&merged_path).output().unwrap();
        let stdout = String::from_utf8_lossy(&result.stdout);
        println!("tiny-bias: {stdout}");
        assert!(result.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&result.stderr));
    } else {
        println!("SKIP the gguf-py check of tiny-bias: python3 cannot import gguf");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn export_refuses_what_does_not_fit() {
    let dir = temp("refuse");
    let source = fixtures().join("tiny-f32.gguf");
    let model = load(&source, &Device::Cpu);
    let out = dir.join("never.gguf");
    let good = LoraAdapter::load_peft(fixtures().join("adapter-tiny"), &Device::Cpu).unwrap();
    let a = |r: usize, c: usize| Tensor::zeros(&[r, c], DType::F32, &Device::Cpu).unwrap();

    // A module past the model's layers.
    let mut stray = good.clone();
    stray.layers.insert("model.layers.7.self_attn.q_proj".into(), LoraLayer { a: a(4, 64), b: a(64, 4) });
    // A pair that does not fit its projection.
    let mut misfit = good.clone();
    misfit.layers.insert("model.layers.0.self_attn.q_proj".into(), LoraLayer { a: a(4, 32), b: a(64, 4) });
    // Ranks that disagree with the config.
    let mut rank = good.clone();
    rank.config = LoraConfig::new(3, 8.0, &["q_proj"]);
    // Weights that overflow once merged.
    let mut huge = good.clone();
    for layer in huge.layers.values_mut() {
        let [o, r] = [layer.b.shape()[0], layer.b.shape()[1]];
        layer.b = Tensor::from_slice(&vec![3e37f32; o * r], &[o, r], &Device::Cpu).unwrap();
    }
    for (what, adapter) in [("stray", &stray), ("misfit", &misfit), ("rank", &rank), ("huge", &huge)] {
        assert!(export_gguf(&model, Some(adapter), &source, &out).is_err(), "{what}");
        assert!(!out.exists(), "{what}: a file was written");
    }

    // A source that is another model, or has no tokenizer.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let config = std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap();
    std::fs::write(other.join("config.json"), config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"))
        .unwrap();
    assert!(export_gguf(&model, Some(&good), &other, &out).is_err(), "another model's config");
    assert!(export_gguf(&model, Some(&good), &fixtures().join("tiny"), &out).is_err(), "no tokenizer.json");
    assert!(export_gguf(&model, Some(&good), &dir.join("missing.gguf"), &out).is_err(), "a missing source");
    assert!(!out.exists());
    // A folder where the file should go.
    std::fs::create_dir_all(&out).unwrap();
    assert!(export_gguf(&model, Some(&good), &source, &out).is_err(), "out is a folder");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Quantizing what the export wrote gives back the same blocks (the export's Q8_0 is kiln's
/// `QTensor::quantize`, which the writer test checks against ggml's reference).
#[test]
fn export_quantizes_as_qtensor_does() {
    let t = Tensor::randn(&[4, 64], 0.0, 0.3, 9, DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, QuantFormat::Q8_0).unwrap();
    assert_eq!(q.to_bytes().unwrap(), reference_q8_0(&t.to_vec_f32().unwrap()));
}

/// The real model: SmolLM2-135M-Instruct (Q4_1) with a LoRA adapter whose B is non-zero,
/// exported, runs in llama.cpp (through llama-cpp-python), which tokenizes the chat prompt
/// as kiln does and answers greedily with the adapted model's tokens. Skipped without the
/// cached model or `llama_cpp`.
#[test]
fn smollm2_export_runs_in_llama_cpp() {
    let Some(path) = kiln::model::cached_default_model() else {
        println!("SKIP: the default model is not cached (kiln::model::default_model() fetches it)");
        return;
    };
    if let Err(why) = python_has("llama_cpp") {
        println!("SKIP the llama.cpp run of SmolLM2: {why}");
        return;
    }
    let dir = temp("smollm2");
    let mut model = load(&path, &Device::Cpu);
    let config =
        LoraConfig::new(8, 16.0, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    let mut adapter = LoraAdapter::init(config, &model, 1).unwrap();
    for (i, layer) in adapter.layers.values_mut().enumerate() {
        layer.b = Tensor::randn(layer.b.shape(), 0.0, 0.01, 100 + i as u64, DType::F32, &Device::Cpu).unwrap();
    }
    let out = dir.join("smollm2-merged.gguf");
    let started = std::time::Instant::now();
    export_gguf(&model, Some(&adapter), &path, &out).unwrap();
    println!(
        "exported in {:.1} s, {} MB",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(&out).unwrap().len() >> 20
    );

    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&out).unwrap()).unwrap();
    let text = tokenizer
        .apply_chat_template(&[kiln::model::ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let ids = tokenizer.encode(&text, true).unwrap();
    model.load_adapter("tuned", adapter).unwrap();
    let steps = 12;
    let config = kiln::model::GenerationConfig { max_new_tokens: steps, ..Default::default() };
    let prompt = kiln::model::Prompt::new(ids.clone()).with_adapter(Some("tuned"));
    let kiln_ids =
        model.generate(&[prompt], &config, &mut |_, _| Ok(kiln::model::Flow::Continue)).unwrap().remove(0).ids;
    let kiln_text = tokenizer.decode(&kiln_ids, true).unwrap();

    let ids_i32: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let prompt_path = dir.join("prompt.safetensors");
    write_safetensors(
        &prompt_path,
        &[("ids".into(), Tensor::from_slice(&ids_i32, &[ids.len()], &Device::Cpu).unwrap())],
    );
    let text_path = dir.join("prompt.txt");
    std::fs::write(&text_path, &text).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_gguf_export.py");
    let result = Command::new("python3")
        .arg(&script)
        .arg(&out)
        .arg("--generate")
        .args([&prompt_path, &text_path])
        .arg(steps.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&result.stderr));
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("no RESULT line");
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    let llama_ids: Vec<u32> = json["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    println!("kiln (base + adapter): {kiln_text:?} {kiln_ids:?}");
    println!("llama.cpp (export):    {:?} {llama_ids:?}", json["text"]);
    assert_eq!(json["tokenizes_alike"], true, "llama.cpp tokenizes the chat prompt otherwise");
    // The first tokens of an answer lead by a wide margin; later ones may part under
    // llama.cpp's 8-bit activations.
    assert_eq!(llama_ids[..3], kiln_ids[..3], "llama.cpp's answer starts otherwise");
    let _ = std::fs::remove_dir_all(&dir);
}
