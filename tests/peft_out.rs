//! PEFT adapters out: an adapter initialised as PEFT does (`LoraAdapter::init`), trained five
//! steps here (`Llama::train_step` + `AdamW`) over the tiny model from Hugging Face files and
//! from a Q8_0 GGUF, saved with `save_peft`, gives the same logits after `load_peft`, and PEFT
//! on the same base loaded by transformers gives kiln's logits
//! (`tests/fixtures/check_peft_adapter.py`, run when Python has torch, transformers and peft).
//! Two adapters trained this way are committed under `tests/fixtures/llama/adapter-trained/`
//! with PEFT's logits for them (`tests/fixtures/make_trained_adapter.py`), checked on every
//! device whether Python is there or not.
//!
//! `KILN_WRITE_TRAINED_ADAPTERS=1 cargo test --release --test peft_out` rewrites the committed
//! adapters; then run `python3 tests/fixtures/make_trained_adapter.py` for PEFT's logits.

#[macro_use]
mod common;

use kiln::io::SafetensorsFile;
use kiln::model::{
    Llama, LoadOptions, Logits, LoraAdapter, LoraConfig, Sequence, StepOptions, TrainSequence, Trainable,
};
use kiln::ops::optim::AdamWHyper;
use kiln::train::AdamW;
use kiln::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

/// The bases: a name for the fixture files and the path kiln and transformers load.
const BASES: [(&str, &str); 2] = [("tiny", "tiny"), ("tiny-q8_0", "tiny-q8_0.gguf")];

/// The three prompts of `expected.safetensors` (7, 12 and 3 ids).
fn prompts() -> Vec<Vec<u32>> {
    let file = SafetensorsFile::open(fixtures().join("expected.safetensors")).unwrap();
    (0..3).map(|i| ids(&file, &format!("ids.{i}"))).collect()
}

fn ids(file: &SafetensorsFile, name: &str) -> Vec<u32> {
    let (dtype, _, bytes) = file.raw(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(dtype, "I64", "{name}");
    bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
}

fn load(path: &str, device: &Device) -> Llama {
    Llama::load(fixtures().join(path), &LoadOptions::new(device)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// adapter-tiny's config: r 4, alpha 8 on all seven projections, down_proj at rank 2,
/// v_proj with alpha 4.
fn config() -> LoraConfig {
    let mut config =
        LoraConfig::new(4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    config.rank_pattern.insert("down_proj".into(), 2);
    config.alpha_pattern.insert("v_proj".into(), 4.0);
    config
}

/// A fresh adapter trained `steps` steps on prompts 0 and 1 with AdamW (lr 1e-2), and the
/// losses of the steps.
fn train(model: &Llama, steps: usize) -> (LoraAdapter, Vec<f32>) {
    let mut adapter = LoraAdapter::init(config(), model, 7).unwrap();
    let names: Vec<String> = adapter.tensors().into_iter().map(|(n, _)| n).collect();
    let params: Vec<(String, Tensor)> = adapter.tensors().into_iter().map(|(n, t)| (n, t.clone())).collect();
    let params: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut optimizer = AdamW::new(&params, AdamWHyper { lr: 1e-2, ..AdamWHyper::default() }).unwrap();
    let batch: Vec<TrainSequence> = prompts()[..2].iter().map(|p| TrainSequence::causal(p)).collect();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let step = model.train_step(&batch, Trainable::Lora(&adapter), &StepOptions::default()).unwrap();
        assert!(step.non_finite.is_empty(), "non-finite gradients: {:?}", step.non_finite);
        let grads: Vec<&Tensor> = names.iter().map(|n| &step.grads[n]).collect();
        let mut working: Vec<&mut Tensor> = adapter.tensors_mut().into_iter().map(|(_, t)| t).collect();
        let report = optimizer.step(&grads, &mut working).unwrap();
        assert!(!report.skipped);
        losses.push(step.loss);
    }
    (adapter, losses)
}

/// Kiln's logits with `adapter` for each prompt, run alone.
fn logits(model: &mut Llama, adapter: LoraAdapter, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    model.load_adapter("trained", adapter).unwrap();
    let out = prompts
        .iter()
        .map(|p| {
            let batch = [Sequence::new(p).with_adapter(Some("trained"))];
            model.forward(&batch, None, Logits::All).unwrap().to_vec::<f32>().unwrap()
        })
        .collect();
    model.unload_adapter("trained").unwrap();
    out
}

/// As tests/model.rs: 2⁻¹³ of the largest logit plus the same relative part, f32 through
/// two small layers.
fn assert_logits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= scale / 8192.0 + w.abs() / 8192.0, "{what}: logit {i}: got {g}, want {w}");
    }
}

/// Whether `python3` can import torch, transformers and peft; the reason when not.
fn python_with_peft() -> Result<(), String> {
    match Command::new("python3").args(["-c", "import peft, transformers, torch"]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "python3 cannot import peft, transformers and torch: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        )),
        Err(e) => Err(format!("no python3: {e}")),
    }
}

/// `ids.{i}` and `logits.{i}` ([len, vocab]) files for check_peft_adapter.py.
fn write_prompts_and_logits(dir: &Path, prompts: &[Vec<u32>], logits: &[Vec<f32>], vocab: usize) -> [PathBuf; 2] {
    let ids: Vec<(String, Tensor)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let v: Vec<i32> = p.iter().map(|&id| id as i32).collect();
            (format!("ids.{i}"), Tensor::from_slice(&v, &[p.len()], &Device::Cpu).unwrap())
        })
        .collect();
    let logits: Vec<(String, Tensor)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("logits.{i}"), Tensor::from_slice(l, &[l.len() / vocab, vocab], &Device::Cpu).unwrap()))
        .collect();
    let paths = [dir.join("ids.safetensors"), dir.join("logits.safetensors")];
    for (tensors, path) in [ids, logits].iter().zip(&paths) {
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        std::fs::write(path, kiln::io::to_bytes(&named, &Default::default()).unwrap()).unwrap();
    }
    paths
}

/// Trains over `base`, saves, reloads: the same tensors and the same logits; PEFT agrees.
fn trained_adapter_round_trips(name: &str, base: &str) {
    let device = Device::Cpu;
    let mut model = load(base, &device);
    let (adapter, losses) = train(&model, 5);
    println!("{name}: losses over 5 steps {losses:?}");
    assert!(losses[4] < losses[0], "{name}: training did not lower the loss: {losses:?}");
    // B left zero and moved: the adapter changes the model.
    let b_max = adapter
        .layers
        .values()
        .map(|l| l.b.to_vec::<f32>().unwrap().iter().fold(0f32, |m, v| m.max(v.abs())))
        .fold(0f32, f32::max);
    assert!(b_max > 1e-2, "{name}: lora_B moved by {b_max} only");

    let prompts = prompts();
    let before = logits(&mut model, adapter.clone(), &prompts);
    let dir = std::env::temp_dir().join(format!("kiln-peft-out-{name}-{}", std::process::id()));
    let adapter_dir = dir.join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    adapter.save_peft(&adapter_dir).unwrap();
    let reloaded = LoraAdapter::load_peft(&adapter_dir, &device).unwrap();
    let (saved, loaded) = (adapter.tensors(), reloaded.tensors());
    assert_eq!(saved.len(), loaded.len());
    for ((n1, t1), (n2, t2)) in saved.iter().zip(&loaded) {
        assert_eq!(n1, n2);
        assert_eq!(t1.to_vec::<f32>().unwrap(), t2.to_vec::<f32>().unwrap(), "{n1}");
    }
    let after = logits(&mut model, reloaded, &prompts);
    assert!(before == after, "{name}: the reloaded adapter gives other logits");

    if std::env::var("KILN_WRITE_TRAINED_ADAPTERS").is_ok_and(|v| v == "1") {
        let target = fixtures().join("adapter-trained").join(name);
        adapter.save_peft(&target).unwrap();
        println!("wrote {}: run python3 tests/fixtures/make_trained_adapter.py next", target.display());
    }

    match python_with_peft() {
        Err(why) => println!("SKIP the PEFT check of {name}: {why}"),
        Ok(()) => {
            let [ids, logits] = write_prompts_and_logits(&dir, &prompts, &before, model.config.vocab_size);
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_peft_adapter.py");
            let out = Command::new("python3")
                .arg(&script)
                .args([&adapter_dir, &fixtures().join(base), &ids, &logits])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            println!("{name}: {stdout}");
            assert!(out.status.success(), "{name}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trained_adapter_round_trips_over_safetensors() {
    trained_adapter_round_trips(BASES[0].0, BASES[0].1);
}

#[test]
fn trained_adapter_round_trips_over_gguf() {
    trained_adapter_round_trips(BASES[1].0, BASES[1].1);
}

/// A fresh adapter is PEFT's default: A within ±1/√in, B zero, the ranks of the patterns; the
/// same seed gives the same tensors, another seed others.
#[test]
fn init_is_pefts_default() {
    let model = load("tiny", &Device::Cpu);
    let adapter = LoraAdapter::init(config(), &model, 7).unwrap();
    assert_eq!(adapter.layers.len(), 14);
    for (module, layer) in &adapter.layers {
        let r = if module.ends_with("down_proj") { 2 } else { 4 };
        let inp = layer.a.shape()[1];
        assert_eq!(layer.a.shape()[0], r, "{module}");
        let bound = 1.0 / (inp as f32).sqrt();
        let a = layer.a.to_vec::<f32>().unwrap();
        assert!(a.iter().all(|v| v.abs() <= bound), "{module}: A outside ±{bound}");
        let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > bound / 2.0, "{module}: A spans ±{spread} of ±{bound}");
        assert!(layer.b.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0), "{module}: B is not zero");
    }
    let names: Vec<String> = adapter.tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[0], "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
    assert_eq!(names[1], "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
    assert_eq!(names.len(), 28);
    let a = |x: &LoraAdapter| x.tensors()[0].1.to_vec::<f32>().unwrap();
    assert_eq!(a(&adapter), a(&LoraAdapter::init(config(), &model, 7).unwrap()));
    assert_ne!(a(&adapter), a(&LoraAdapter::init(config(), &model, 8).unwrap()));
    // Two modules never share their values.
    assert_ne!(
        adapter.tensors()[0].1.to_vec::<f32>().unwrap()[..64],
        adapter.tensors()[4].1.to_vec::<f32>().unwrap()[..64]
    );

    let q_only = LoraAdapter::init(LoraConfig::new(2, 4.0, &["self_attn.q_proj"]), &model, 0).unwrap();
    assert_eq!(
        q_only.layers.keys().collect::<Vec<_>>(),
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    );
    let all = LoraAdapter::init(LoraConfig::new(2, 4.0, &["all-linear"]), &model, 0).unwrap();
    assert_eq!(all.layers.len(), 14);
    let err = LoraAdapter::init(LoraConfig::new(2, 4.0, &["qkv_proj"]), &model, 0).unwrap_err();
    assert!(err.to_string().contains("qkv_proj"), "{err}");
    let err = LoraAdapter::init(LoraConfig::new(0, 4.0, &["q_proj"]), &model, 0).unwrap_err();
    assert!(err.to_string().contains("r must be"), "{err}");
}

/// The committed adapters (trained here over `tiny` and `tiny-q8_0.gguf`) give the logits
/// PEFT gives with them on the same bases loaded by transformers.
fn committed_trained_adapters_give_pefts_logits(device: &Device) {
    let dir = fixtures().join("adapter-trained");
    let expected = SafetensorsFile::open(dir.join("peft_logits.safetensors")).unwrap();
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| ids(&expected, &format!("ids.{i}"))).collect();
    for (name, base) in BASES {
        let mut model = load(base, device);
        let adapter = LoraAdapter::load_peft(dir.join(name), device).unwrap();
        let got = logits(&mut model, adapter, &prompts);
        for (i, got) in got.iter().enumerate() {
            let key = format!("{name}.logits.{i}");
            let want = expected.tensor(&key, &Device::Cpu).unwrap();
            assert_eq!(want.shape(), [prompts[i].len(), 320], "{key}");
            assert_logits(&format!("{device}, {key}"), got, &want.to_vec::<f32>().unwrap());
        }
    }
}

device_tests!(committed_trained_adapters_give_pefts_logits);
