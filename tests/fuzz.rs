//! Loader fuzzing, on stable Rust: every loader (PEFT adapters, kiln's and torch's optimizer
//! states, safetensors files, GGUF files, ggml blocks, NF4 state) is fed mutations of valid
//! inputs (bytes flipped, inserted, cut and spliced; JSON values and safetensors headers
//! rewritten with wrong types, ranks, offsets, names and numbers; GGUF counts, lengths, types,
//! dims and offsets set to hostile values) and must answer `Ok` or `Err`, never panic. What
//! loads must save, and `save → load → save` must give the same bytes (GGUF, which kiln only
//! reads: every tensor that loads holds the file's bytes).
//!
//! Each loader runs `KILN_FUZZ_ITERS` inputs (2,000 by default) from seed `KILN_FUZZ_SEED`;
//! the long run is
//! `KILN_FUZZ_ITERS=100000 cargo test --release --test fuzz -- --nocapture`.
//! A failing input is written under the cargo target's tmp directory and its path printed.

mod common;

use kiln::model::{LoraAdapter, LoraConfig, LoraLayer};
use kiln::ops::optim::{AdamWHyper, Penalty};
use kiln::ops::quant::{Nf4Absmax, Nf4State, QTensor, QuantFormat};
use kiln::train::AdamW;
use kiln::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn iterations() -> usize {
    std::env::var("KILN_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

fn base_seed() -> u64 {
    std::env::var("KILN_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x6b69_6c6e)
}

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Numbers and tokens that break parsers and arithmetic.
const NUMBER_TOKENS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "-3",
    "1.9",
    "0.5",
    "2",
    "3",
    "7",
    "8",
    "16",
    "255",
    "256",
    "65535",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "1e39",
    "1e308",
    "1e400",
    "-1e400",
    "1e-50",
    "3.4028236e38",
    "NaN",
    "Infinity",
    "null",
    "true",
    "\"8\"",
    "\"\"",
    "[]",
    "{}",
    "[4]",
    "{\"a\": 1}",
];

/// Strings that break names and enumerations.
const STRING_TOKENS: &[&str] = &[
    "",
    "0",
    "-1",
    "none",
    "ewc",
    "l2_anchor",
    "LORA",
    "F32",
    "BF16",
    "F16",
    "F64",
    "I8",
    "U8",
    "BOOL",
    "a\nb",
    "\r",
    "18446744073709551615",
    "18446744073709551616",
    "9221120237041090560",
    "9218868437227405312",
    "18442240474082181120",
    "4607182418800017408",
    "13830554455654793216",
    "kiln.adamw.v1",
    "kiln.adamw.v2",
    "model.layers.0.self_attn.q_proj",
    "lora_A.weight",
    "\u{0}",
];

/// Rewrites the bytes a few times: bits, interesting bytes and integers, inserted, deleted,
/// repeated and spliced ranges, truncation.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, others: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        let at = rng.below(len + 1);
        match rng.below(10) {
            0 if len > 0 => bytes[at.min(len - 1)] ^= 1 << rng.below(8),
            1 if len > 0 => {
                bytes[at.min(len - 1)] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'-', b'.', b'e', b'9', b'"'])
            }
            2 => {
                let n = 1 + rng.below(16);
                let fresh: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, fresh);
            }
            3 if len > 0 => {
                let end = (at + 1 + rng.below(64)).min(len);
                bytes.drain(at.min(len - 1)..end);
            }
            4 => bytes.truncate(at),
            5 if len >= 8 => {
                let value = *rng.pick(&[0u64, 1, u32::MAX as u64, u64::MAX, 1 << 31, 1 << 63, 0x7ff0_0000_0000_0000]);
                let at = at.min(len - 8);
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            6 if len > 0 => {
                let start = at.min(len - 1);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk = bytes[start..end].to_vec();
                let to = rng.below(len + 1);
                bytes.splice(to..to, chunk);
            }
            7 if !others.is_empty() => {
                let other = *rng.pick(others);
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(256)).min(other.len());
                let to = rng.below(len + 1);
                let cut = (to + rng.below(64)).min(len);
                bytes.splice(to..cut, other[start..end].iter().copied());
            }
            8 if len > 0 => {
                // A digit changed: numbers in JSON headers and text shift.
                if let Some(i) = (0..len).map(|k| (at + k) % len).find(|&i| bytes[i].is_ascii_digit()) {
                    bytes[i] = b'0' + rng.below(10) as u8;
                }
            }
            _ if len > 0 => bytes[at.min(len - 1)] = rng.next() as u8,
            _ => bytes.push(rng.next() as u8),
        }
    }
}

/// A random JSON value, written as text (so out-of-range numbers stay what they are).
fn random_json_token(rng: &mut Rng) -> String {
    if rng.chance(0.6) {
        rng.pick(NUMBER_TOKENS).to_string()
    } else {
        serde_json::to_string(rng.pick(STRING_TOKENS)).unwrap()
    }
}

/// Every place in a JSON document (as a JSON pointer), the root excluded.
fn json_pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                json_pointers(v, p, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                json_pointers(v, p, out);
            }
        }
        _ => {}
    }
}

/// Rewrites a JSON document a few times: a value replaced by a hostile token, a key removed,
/// renamed or added, an array element repeated. Text that is not JSON gets byte mutations.
fn mutate_json(rng: &mut Rng, text: &[u8], keys: &[&str]) -> Vec<u8> {
    let Ok(mut doc) = serde_json::from_slice::<Value>(text) else {
        let mut bytes = text.to_vec();
        mutate_bytes(rng, &mut bytes, &[]);
        return bytes;
    };
    // Tokens that serde_json's Value cannot hold (1e400, NaN) go in as placeholders.
    let mut raw: Vec<(String, String)> = Vec::new();
    let mut placeholder = |rng: &mut Rng| {
        let key = format!("@@raw{}@@", raw.len());
        raw.push((format!("\"{key}\""), random_json_token(rng)));
        Value::String(key)
    };
    for _ in 0..1 + rng.below(3) {
        let mut pointers = Vec::new();
        json_pointers(&doc, String::new(), &mut pointers);
        let choice = rng.below(5);
        if choice == 4 || pointers.is_empty() {
            // Add a key, known or not, at the top.
            let key = if rng.chance(0.7) { rng.pick(keys).to_string() } else { "unknown_key".to_string() };
            let v = placeholder(rng);
            if let Some(map) = doc.as_object_mut() {
                map.insert(key, v);
            }
            continue;
        }
        let pointer = rng.pick(&pointers).clone();
        let (parent, last) = pointer.rsplit_once('/').unwrap();
        match choice {
            0 | 1 => {
                let v = placeholder(rng);
                *doc.pointer_mut(&pointer).unwrap() = v;
            }
            2 => match doc.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(items)) => {
                    let i: usize = last.parse().unwrap();
                    if rng.chance(0.5) {
                        items.remove(i);
                    } else {
                        let copy = items[i].clone();
                        items.insert(i, copy);
                    }
                }
                _ => {}
            },
            _ => {
                // Rename a key (to another known one: duplicates and swaps).
                if let Some(Value::Object(map)) = doc.pointer_mut(parent) {
                    let old = last.replace("~1", "/").replace("~0", "~");
                    if let Some(v) = map.remove(&old) {
                        map.insert(rng.pick(keys).to_string(), v);
                    }
                }
            }
        }
    }
    let mut text = serde_json::to_string(&doc).unwrap();
    for (key, token) in raw {
        text = text.replace(&key, &token);
    }
    text.into_bytes()
}

/// Mutates a safetensors file: its JSON header structurally (dtypes, shapes, offsets, names,
/// metadata), its length prefix, or its bytes.
fn mutate_safetensors(rng: &mut Rng, file: &[u8], others: &[&[u8]]) -> Vec<u8> {
    let header_len = file.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    match (rng.below(6), header_len) {
        (4, Some(n)) if 8 + n < file.len() => {
            // Only the data: the file stays well formed, its numbers do not.
            let mut out = file.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = 8 + n + rng.below(file.len() - 8 - n);
                let random = rng.next() as u8;
                out[at] = *rng.pick(&[0u8, 0x7f, 0x80, 0xff, random]);
            }
            out
        }
        (5, Some(n)) if 8 + n <= file.len() => {
            // One metadata value replaced by a string of the kind the readers parse.
            let Ok(mut header) = serde_json::from_slice::<Value>(&file[8..8 + n]) else { return file.to_vec() };
            if let Some(Value::Object(meta)) = header.get_mut("__metadata__") {
                let keys: Vec<String> = meta.keys().cloned().collect();
                let key = if keys.is_empty() || rng.chance(0.1) {
                    "fisher_samples.bias".into()
                } else {
                    rng.pick(&keys).clone()
                };
                let value = match rng.below(3) {
                    0 => rng.pick(STRING_TOKENS).to_string(),
                    1 if !keys.is_empty() => rng.pick(&keys).clone(),
                    _ => {
                        let mut v = meta.get(&key).and_then(Value::as_str).unwrap_or("").as_bytes().to_vec();
                        mutate_bytes(rng, &mut v, &[]);
                        String::from_utf8_lossy(&v).into_owned()
                    }
                };
                meta.insert(key, Value::String(value));
            }
            let header = serde_json::to_vec(&header).unwrap();
            let mut out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&header);
            out.extend_from_slice(&file[8 + n..]);
            out
        }
        (0 | 1, Some(n)) if 8 + n <= file.len() => {
            let keys = [
                "dtype",
                "shape",
                "data_offsets",
                "__metadata__",
                "format",
                "params",
                "step",
                "lr",
                "beta2",
                "penalty",
                "lambda",
                "max_grad_norm",
                "stochastic_rounding",
            ];
            let mut header = mutate_json(rng, &file[8..8 + n], &keys);
            if rng.chance(0.3) {
                mutate_bytes(rng, &mut header, &[]);
            }
            let mut out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&header);
            out.extend_from_slice(&file[8 + n..]);
            out
        }
        (2, Some(_)) => {
            let mut out = file.to_vec();
            let value = *rng.pick(&[0u64, 1, 2, 7, u64::MAX, 1 << 40, file.len() as u64, file.len() as u64 - 7]);
            out[..8].copy_from_slice(&value.to_le_bytes());
            out
        }
        _ => {
            let mut out = file.to_vec();
            mutate_bytes(rng, &mut out, others);
            out
        }
    }
}

/// What a loader made of one input: refused it, or loaded it and passed the round trip.
type Outcome = Result<Loaded, String>;

#[derive(PartialEq)]
enum Loaded {
    Refused,
    Accepted,
}

/// Runs `case` for `iterations()` inputs, each under `catch_unwind`. A panic or a failed
/// round trip fails the test, names the iteration and keeps its input (which the case
/// writes to the path it is given before it runs the loader).
fn run(loader: &str, mut case: impl FnMut(&mut Rng, &Path) -> Outcome) {
    let iters = iterations();
    let seed = base_seed();
    let work = scratch(loader);
    let mut loaded = 0usize;
    for i in 0..iters {
        let mut rng = Rng(seed ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f));
        let input = work.join("input");
        let _ = std::fs::remove_dir_all(&input);
        let _ = std::fs::remove_file(&input);
        let outcome = catch_unwind(AssertUnwindSafe(|| case(&mut rng, &input)));
        let failure = match outcome {
            Ok(Ok(result)) => {
                loaded += (result == Loaded::Accepted) as usize;
                None
            }
            Ok(Err(e)) => Some(e),
            Err(p) => Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(why) = failure {
            let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-failure-{loader}-{seed}-{i}"));
            let _ = std::fs::remove_dir_all(&keep);
            let _ = std::fs::rename(&input, &keep);
            panic!("{loader}: input {i} (seed {seed}): {why}; the input is at {}", keep.display());
        }
    }
    println!(
        "{loader}: {iters} mutated inputs from seed {seed}: {loaded} loaded and round-tripped exactly, the rest refused, no panic"
    );
    let _ = std::fs::remove_dir_all(&work);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn same_files(a: &Path, b: &Path, files: &[&str]) -> Result<(), String> {
    for f in files {
        let (x, y) = (
            std::fs::read(a.join(f)).map_err(|e| e.to_string())?,
            std::fs::read(b.join(f)).map_err(|e| e.to_string())?,
        );
        if x != y {
            return Err(format!("save → load → save changed {f}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The PEFT adapter loader.

const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

fn seed_adapters() -> Vec<(Vec<u8>, Vec<u8>)> {
    let cpu = Device::Cpu;
    let dir = scratch("adapter-seeds");
    let mut seeds = Vec::new();
    let layer = |r: usize, inp: usize, out: usize, dtype: DType, seed: u64| LoraLayer {
        a: Tensor::randn(&[r, inp], 0.0, 1.0, seed, dtype, &cpu).unwrap(),
        b: Tensor::randn(&[out, r], 0.0, 1.0, seed + 1, dtype, &cpu).unwrap(),
    };
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    config.rank_pattern.insert("v_proj".into(), 2);
    config.alpha_pattern.insert("v_proj".into(), 3.0);
    let adapter = LoraAdapter {
        config,
        layers: [
            ("model.layers.0.self_attn.q_proj".to_string(), layer(4, 8, 6, DType::F32, 1)),
            ("model.layers.0.self_attn.v_proj".to_string(), layer(2, 8, 4, DType::BF16, 3)),
        ]
        .into_iter()
        .collect(),
    };
    adapter.save_peft(&dir).unwrap();
    let read =
        |d: &Path| (std::fs::read(d.join(ADAPTER_FILES[0])).unwrap(), std::fs::read(d.join(ADAPTER_FILES[1])).unwrap());
    seeds.push(read(&dir));
    // A config as PEFT writes it, with the fields kiln keeps but does not read.
    let peft_config = br#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layers_pattern": null,
        "lora_alpha": 16, "lora_dropout": 0.05, "modules_to_save": null, "peft_type": "LORA", "r": 4,
        "rank_pattern": {"v_proj": 2}, "revision": null, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
        "use_dora": false, "use_rslora": true}"#;
    seeds.push((peft_config.to_vec(), seeds[0].1.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    seeds
}

#[test]
fn the_adapter_loader_survives_mutated_files() {
    let seeds = seed_adapters();
    let others: Vec<&[u8]> = seeds.iter().flat_map(|(c, w)| [c.as_slice(), w.as_slice()]).collect();
    let keys = [
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "peft_type",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "task_type",
        "bias",
        "fan_in_fan_out",
        "use_dora",
        "q_proj",
        "v_proj",
    ];
    // The unmutated seeds load and round-trip.
    let work = scratch("adapter-seed-check");
    for (config, weights) in &seeds {
        write_adapter(&work.join("in"), config, weights);
        round_trip_adapter(&work.join("in"), &work).unwrap();
    }
    let _ = std::fs::remove_dir_all(&work);
    run("adapter", |rng, input| {
        let (config, weights) = rng.pick(&seeds).clone();
        let (config, weights) = match rng.below(3) {
            0 => (mutate_json(rng, &config, &keys), weights),
            1 => (config, mutate_safetensors(rng, &weights, &others)),
            _ => (mutate_json(rng, &config, &keys), mutate_safetensors(rng, &weights, &others)),
        };
        write_adapter(input, &config, &weights);
        round_trip_adapter(input, input.parent().unwrap())
    });
}

fn write_adapter(dir: &Path, config: &[u8], weights: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(ADAPTER_FILES[0]), config).unwrap();
    std::fs::write(dir.join(ADAPTER_FILES[1]), weights).unwrap();
}

/// Loads `input`; what loads must save, load again and save to the same bytes.
fn round_trip_adapter(input: &Path, work: &Path) -> Outcome {
    let Ok(adapter) = LoraAdapter::load_peft(input, &Device::Cpu) else { return Ok(Loaded::Refused) };
    for (module, layer) in &adapter.layers {
        let (a, b) = (layer.a.shape(), layer.b.shape());
        adapter.check_fits(module, [b[0], a[1]]).map_err(|e| format!("{module} does not fit its own shapes: {e}"))?;
        let s = adapter.scale(module);
        if !s.is_finite() {
            return Err(format!("{module} loaded with scale {s}"));
        }
    }
    let (first, second) = (work.join("saved-1"), work.join("saved-2"));
    adapter.save_peft(&first).map_err(|e| format!("loaded, but does not save: {e}"))?;
    let again = LoraAdapter::load_peft(&first, &Device::Cpu).map_err(|e| format!("saved, but does not load: {e}"))?;
    again.save_peft(&second).map_err(|e| format!("second save: {e}"))?;
    same_files(&first, &second, &ADAPTER_FILES)?;
    Ok(Loaded::Accepted)
}

// ---------------------------------------------------------------------------------------
// The AdamW state loader.

fn seed_states() -> Vec<Vec<u8>> {
    let cpu = Device::Cpu;
    let dir = scratch("adamw-seeds");
    let w1 = Tensor::randn(&[3, 4], 0.0, 1.0, 1, DType::BF16, &cpu).unwrap();
    let w2 = Tensor::randn(&[5], 0.0, 1.0, 2, DType::F32, &cpu).unwrap();
    let grads = [
        Tensor::randn(&[3, 4], 0.0, 0.1, 3, DType::F32, &cpu).unwrap(),
        Tensor::randn(&[5], 0.0, 0.1, 4, DType::F32, &cpu).unwrap(),
    ];
    let g: Vec<&Tensor> = grads.iter().collect();
    let mut seeds = Vec::new();
    let hypers = [
        AdamWHyper::default(),
        AdamWHyper {
            max_grad_norm: Some(1.0),
            penalty: Penalty::Ewc { lambda: 50.0 },
            stochastic_rounding: Some(7),
            beta2: 0.95,
            ..AdamWHyper::default()
        },
        AdamWHyper { penalty: Penalty::L2Anchor { lambda: 0.1 }, ..AdamWHyper::default() },
    ];
    for (i, hyper) in hypers.into_iter().enumerate() {
        let mut opt = AdamW::new(&[("layers.0.w", &w1), ("bias", &w2)], hyper).unwrap();
        opt.step(&g, &mut []).unwrap();
        if i > 0 {
            opt.accumulate_fisher(&g).unwrap();
            opt.set_anchor().unwrap();
            opt.step(&g, &mut []).unwrap();
        }
        let path = dir.join(format!("state-{i}.safetensors"));
        opt.save(&path).unwrap();
        seeds.push(std::fs::read(&path).unwrap());
    }
    // A v1 file (f32 hyperparameter bits), as earlier versions wrote it.
    let master = Tensor::from_f32(&[1.0, 2.0], &[2], DType::F32, &cpu).unwrap();
    let zeros = Tensor::zeros(&[2], DType::F32, &cpu).unwrap();
    let meta: HashMap<String, String> = [
        ("format", "kiln.adamw.v1".to_string()),
        ("params", "p".to_string()),
        ("step", "3".to_string()),
        ("lr", 1e-3f32.to_bits().to_string()),
        ("beta1", 0.9f32.to_bits().to_string()),
        ("beta2", 0.999f32.to_bits().to_string()),
        ("eps", 1e-8f32.to_bits().to_string()),
        ("weight_decay", 0.01f32.to_bits().to_string()),
        ("max_grad_norm", "none".to_string()),
        ("penalty", "none".to_string()),
        ("lambda", 0f32.to_bits().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = dir.join("v1.safetensors");
    kiln::io::save(&path, &[("p.master", &master), ("p.exp_avg", &zeros), ("p.exp_avg_sq", &zeros)], &meta).unwrap();
    seeds.push(std::fs::read(&path).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    seeds
}

#[test]
fn the_optimizer_state_loader_survives_mutated_files() {
    let seeds = seed_states();
    let others: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let work = scratch("adamw-seed-check");
    for seed in &seeds {
        std::fs::write(work.join("in"), seed).unwrap();
        round_trip_state(&work.join("in"), &work).unwrap();
    }
    let _ = std::fs::remove_dir_all(&work);
    run("adamw", |rng, input| {
        let seed = rng.pick(&seeds).clone();
        let file = mutate_safetensors(rng, &seed, &others);
        std::fs::write(input, &file).unwrap();
        round_trip_state(input, input.parent().unwrap())
    });
}

/// Loads `input`; what loads must take a step, save, load again and save to the same bytes.
fn round_trip_state(input: &Path, work: &Path) -> Outcome {
    let Ok(opt) = AdamW::load(input, &Device::Cpu) else { return Ok(Loaded::Refused) };
    let (first, second) = (work.join("saved-1"), work.join("saved-2"));
    opt.save(&first).map_err(|e| format!("loaded, but does not save: {e}"))?;
    let again = AdamW::load(&first, &Device::Cpu).map_err(|e| format!("saved, but does not load: {e}"))?;
    again.save(&second).map_err(|e| format!("second save: {e}"))?;
    if std::fs::read(&first).unwrap() != std::fs::read(&second).unwrap() {
        return Err("save → load → save changed the bytes".into());
    }
    // A state that loads takes a step (zero gradients of the right shapes).
    let mut opt = opt;
    if opt.params().iter().map(|p| p.master.elem_count()).sum::<usize>() <= 1 << 16 {
        let grads: Vec<Tensor> =
            opt.params().iter().map(|p| Tensor::zeros(p.master.shape(), DType::F32, &Device::Cpu).unwrap()).collect();
        let g: Vec<&Tensor> = grads.iter().collect();
        opt.step(&g, &mut []).map_err(|e| format!("loaded, but refuses a step: {e}"))?;
    }
    Ok(Loaded::Accepted)
}

/// A torch optimizer's moments (the fixture written by the documented Python lines), mutated:
/// what resumes must take a step, save, load and save to the same bytes.
#[test]
fn the_torch_moments_loader_survives_mutated_files() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw_torch_moments");
    let params = kiln::io::load(format!("{dir}/params.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let named: Vec<(&str, &Tensor)> = names.iter().map(|n| (n.as_str(), &params[*n])).collect();
    let seed = std::fs::read(format!("{dir}/moments.safetensors")).unwrap();
    run("torch-moments", |rng, input| {
        let file = mutate_safetensors(rng, &seed, &[]);
        std::fs::write(input, &file).unwrap();
        let Ok(opt) = AdamW::from_torch_moments(&named, input, AdamWHyper::default()) else {
            return Ok(Loaded::Refused);
        };
        let saved = input.parent().unwrap().join("resumed");
        opt.save(&saved).map_err(|e| format!("resumed, but does not save: {e}"))?;
        round_trip_state(&saved, input.parent().unwrap())
    });
}

// ---------------------------------------------------------------------------------------
// Plain safetensors files (kiln::io).

fn seed_tensor_files() -> Vec<Vec<u8>> {
    let cpu = Device::Cpu;
    let tensors = [
        Tensor::randn(&[2, 3], 0.0, 1.0, 1, DType::F32, &cpu).unwrap(),
        Tensor::randn(&[4], 0.0, 1.0, 2, DType::BF16, &cpu).unwrap(),
        Tensor::randn(&[1, 2, 2], 0.0, 1.0, 3, DType::F16, &cpu).unwrap(),
        Tensor::zeros(&[0, 3], DType::F32, &cpu).unwrap(),
        Tensor::from_f32(&[7.0], &[], DType::F32, &cpu).unwrap(),
    ];
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let named: Vec<(&str, &Tensor)> = ["w", "b", "c", "empty", "scalar"].into_iter().zip(tensors.iter()).collect();
    vec![kiln::io::to_bytes(&named, &meta).unwrap(), kiln::io::to_bytes(&named[..2], &HashMap::new()).unwrap()]
}

#[test]
fn the_safetensors_loader_survives_mutated_files() {
    let seeds = seed_tensor_files();
    let others: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    run("safetensors", |rng, input| {
        let seed = rng.pick(&seeds).clone();
        let file = mutate_safetensors(rng, &seed, &others);
        std::fs::write(input, &file).unwrap();
        let Ok(tensors) = kiln::io::load(input, &Device::Cpu) else { return Ok(Loaded::Refused) };
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let first =
            kiln::io::to_bytes(&named, &HashMap::new()).map_err(|e| format!("loaded, but does not save: {e}"))?;
        let work = input.parent().unwrap().join("saved");
        std::fs::write(&work, &first).unwrap();
        let again = kiln::io::load(&work, &Device::Cpu).map_err(|e| format!("saved, but does not load: {e}"))?;
        let named: Vec<(&str, &Tensor)> = again.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if kiln::io::to_bytes(&named, &HashMap::new()).unwrap() != first {
            return Err("save → load → save changed the bytes".into());
        }
        Ok(Loaded::Accepted)
    });
}

// ---------------------------------------------------------------------------------------
// GGUF files (kiln::io::GgufFile).

fn seed_gguf_files() -> Vec<Vec<u8>> {
    use common::gguf::{GgufBuilder, I32, Q4_K, T_ARRAY, T_BOOL, T_STRING, array, kv, string, tensor};
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut strings = string(b"a");
    strings.extend(string(b"bc"));
    let built = GgufBuilder::new()
        .kv(kv("words", T_ARRAY, &array(T_STRING, 2, &strings)))
        .kv(kv("flag", T_BOOL, &[1]))
        .tensor(tensor("k", &[256, 1], Q4_K, vec![0; 144]))
        .tensor(tensor("ids", &[3], I32, vec![7; 12]))
        .bytes();
    vec![
        std::fs::read(format!("{fixtures}/kiln.gguf")).unwrap(),
        std::fs::read(format!("{fixtures}/kiln_align64.gguf")).unwrap(),
        built,
    ]
}

/// A GGUF file with its structural fields (counts, lengths, types, dims, offsets) set to
/// hostile or nearby values, its bytes mutated, or both.
fn mutate_gguf(rng: &mut Rng, file: &[u8], fields: &[common::gguf::Field], others: &[&[u8]]) -> Vec<u8> {
    let mut out = file.to_vec();
    let what = rng.below(3);
    if what != 1 {
        for _ in 0..1 + rng.below(2) {
            let field = *rng.pick(fields);
            let mut old = [0u8; 8];
            old[..field.width].copy_from_slice(&out[field.at..field.at + field.width]);
            let old = u64::from_le_bytes(old);
            let value = match rng.below(3) {
                0 => *rng.pick(&common::gguf::breaking_values(field, file.len() as u64)),
                1 => old.wrapping_add(*rng.pick(&[1u64, 2, 31, 32, 64, u64::MAX, u64::MAX - 31])),
                _ => *rng.pick(&[0u64, 1, 2, 3, 8, 9, 30, 255, 1 << 31, u32::MAX as u64, 1 << 32, u64::MAX]),
            };
            out = common::gguf::with_field(&out, field, value);
        }
    }
    if what != 0 {
        mutate_bytes(rng, &mut out, others);
    }
    out
}

#[test]
fn the_gguf_reader_survives_mutated_files() {
    let seeds = seed_gguf_files();
    let fields: Vec<Vec<common::gguf::Field>> = seeds.iter().map(|s| common::gguf::fields(s)).collect();
    let others: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let cpu = Device::Cpu;
    run("gguf", |rng, input| {
        let i = rng.below(seeds.len());
        let file = mutate_gguf(rng, &seeds[i], &fields[i], &others);
        std::fs::write(input, &file).unwrap();
        let Ok(gguf) = kiln::io::GgufFile::open(input) else { return Ok(Loaded::Refused) };
        for key in gguf.metadata().keys() {
            let _ = (gguf.get_str(key), gguf.get_u32(key), gguf.get_str_array(key), gguf.get_f32_array(key));
        }
        for info in gguf.tensor_infos() {
            let name = info.name();
            let bytes = gguf.tensor_bytes(name).map_err(|e| format!("tensor {name:?} listed, but: {e}"))?;
            if bytes.len() as u64 != info.n_bytes() {
                return Err(format!("tensor {name:?}: {} bytes, its info says {}", bytes.len(), info.n_bytes()));
            }
            match gguf.load(name, &cpu) {
                Ok(kiln::io::GgufTensor::Dense(t)) => {
                    if t.to_bytes().map_err(|e| e.to_string())? != bytes {
                        return Err(format!("tensor {name:?} does not hold the file's bytes"));
                    }
                }
                Ok(kiln::io::GgufTensor::Quantized(q)) => {
                    if q.to_bytes().map_err(|e| e.to_string())? != bytes {
                        return Err(format!("quantized tensor {name:?} does not hold the file's blocks"));
                    }
                    check_dequantizes(&q)?;
                }
                Err(e) if e.to_string().contains(&format!("{name:?}")) => {}
                Err(e) => return Err(format!("tensor {name:?} refused without naming it: {e}")),
            }
        }
        Ok(Loaded::Accepted)
    });
}

// ---------------------------------------------------------------------------------------
// Quantized weights from their stored parts.

/// Shapes a hostile caller passes: wrong ranks, zero, unaligned and overflowing dimensions.
fn hostile_shape(rng: &mut Rng, rows: usize, cols: usize) -> Vec<usize> {
    let dims = [0usize, 1, 31, 32, 64, 96, 128, 1 << 32, usize::MAX / 32, usize::MAX, 542_551_296_285_575_048];
    match rng.below(6) {
        0 => vec![rows, cols],
        1 => vec![*rng.pick(&dims), cols],
        2 => vec![rows, *rng.pick(&dims)],
        3 => vec![*rng.pick(&dims), *rng.pick(&dims)],
        4 => (0..rng.below(4)).map(|_| *rng.pick(&dims)).collect(),
        _ => vec![rows * 2, cols / 2],
    }
}

#[test]
fn ggml_blocks_load_or_are_refused() {
    let cpu = Device::Cpu;
    let w = Tensor::randn(&[4, 64], 0.0, 1.0, 5, DType::F32, &cpu).unwrap();
    let seeds: Vec<(QuantFormat, Vec<u8>)> = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1]
        .into_iter()
        .map(|f| (f, QTensor::quantize(&w, f).unwrap().to_bytes().unwrap()))
        .collect();
    run("ggml-blocks", |rng, input| {
        let (format, mut bytes) = rng.pick(&seeds).clone();
        let format = if rng.chance(0.1) { *rng.pick(&[QuantFormat::Nf4, QuantFormat::Nf4DoubleQuant]) } else { format };
        if rng.chance(0.8) {
            mutate_bytes(rng, &mut bytes, &[]);
        }
        let shape = hostile_shape(rng, 4, 64);
        std::fs::write(input, format!("{format:?} {shape:?} {bytes:?}")).unwrap();
        let Ok(q) = QTensor::from_ggml_blocks(format, &bytes, &shape, &cpu) else { return Ok(Loaded::Refused) };
        if q.to_bytes().map_err(|e| e.to_string())? != bytes {
            return Err("the blocks do not come back unchanged".into());
        }
        check_dequantizes(&q)
    });
}

#[test]
fn nf4_state_loads_or_is_refused() {
    let cpu = Device::Cpu;
    let w = Tensor::randn(&[4, 128], 0.0, 1.0, 6, DType::F32, &cpu).unwrap();
    let seeds: Vec<Nf4State> = [QuantFormat::Nf4, QuantFormat::Nf4DoubleQuant]
        .into_iter()
        .map(|f| QTensor::quantize(&w, f).unwrap().nf4_state().unwrap())
        .collect();
    let hostile = [0.0f32, -1.0, 1e38, f32::MAX, f32::INFINITY, f32::NAN, f32::MIN_POSITIVE / 4.0];
    run("nf4-state", |rng, input| {
        let mut state = rng.pick(&seeds).clone();
        for _ in 0..1 + rng.below(3) {
            match rng.below(6) {
                0 => mutate_bytes(rng, &mut state.packed, &[]),
                1 => state.block_size = *rng.pick(&[0, 1, 32, 64, 128, 4096, usize::MAX]),
                _ => match &mut state.absmax {
                    Nf4Absmax::F32(absmax) => {
                        if rng.chance(0.3) {
                            absmax.truncate(rng.below(absmax.len() + 1));
                        } else if !absmax.is_empty() {
                            let i = rng.below(absmax.len());
                            absmax[i] = *rng.pick(&hostile);
                        }
                    }
                    Nf4Absmax::DoubleQuant { quantized, nested_absmax, nested_code, offset, nested_block_size } => {
                        match rng.below(5) {
                            0 => mutate_bytes(rng, quantized, &[]),
                            1 => *offset = *rng.pick(&hostile),
                            2 => *nested_block_size = *rng.pick(&[0, 1, 64, 256, 512, usize::MAX]),
                            3 if !nested_code.is_empty() => {
                                let i = rng.below(nested_code.len());
                                nested_code[i] = *rng.pick(&hostile);
                            }
                            _ if !nested_absmax.is_empty() => {
                                let i = rng.below(nested_absmax.len());
                                nested_absmax[i] = *rng.pick(&hostile);
                            }
                            _ => nested_absmax.clear(),
                        }
                    }
                },
            }
        }
        let shape = hostile_shape(rng, 4, 128);
        std::fs::write(input, format!("{shape:?} {state:?}")).unwrap();
        let Ok(q) = QTensor::from_nf4(&state, &shape, &cpu) else { return Ok(Loaded::Refused) };
        if q.nf4_state().map_err(|e| e.to_string())? != state {
            return Err("the state does not come back unchanged".into());
        }
        check_dequantizes(&q)
    });
}

/// A quantized weight that loaded dequantizes to finite numbers.
fn check_dequantizes(q: &QTensor) -> Outcome {
    let [rows, cols] = q.shape();
    if rows.saturating_mul(cols) > 1 << 16 {
        return Ok(Loaded::Accepted);
    }
    let values = q.dequantize(DType::F32).map_err(|e| format!("loaded, but does not dequantize: {e}"))?;
    let values = values.to_vec::<f32>().map_err(|e| e.to_string())?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!("loaded, but dequantizes to {} at {i}", values[i])),
        None => Ok(Loaded::Accepted),
    }
}

// ---------------------------------------------------------------------------------------
// Models (kiln::model::Llama): GGUF files and Hugging Face config.json.

#[test]
fn the_model_loader_survives_mutated_files() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
    let seeds: Vec<Vec<u8>> = ["tiny-q4_1.gguf", "tiny-mixed.gguf"]
        .iter()
        .map(|f| std::fs::read(format!("{fixtures}/{f}")).unwrap())
        .collect();
    let fields: Vec<Vec<common::gguf::Field>> = seeds.iter().map(|s| common::gguf::fields(s)).collect();
    let others: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let config = std::fs::read(format!("{fixtures}/tiny/config.json")).unwrap();
    let keys =
        ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters"];
    let options = kiln::model::LoadOptions::new(&Device::Cpu);
    run("model", |rng, input| {
        // A loaded model must run: the forward pass of a short prompt gives finite logits
        // or a clean error.
        let model = if rng.below(2) == 0 {
            let i = rng.below(seeds.len());
            std::fs::write(input, mutate_gguf(rng, &seeds[i], &fields[i], &others)).unwrap();
            kiln::model::Llama::load(input, &options)
        } else {
            std::fs::create_dir_all(input).unwrap();
            std::fs::write(input.join("config.json"), mutate_json(rng, &config, &keys)).unwrap();
            std::fs::copy(format!("{fixtures}/tiny/model.safetensors"), input.join("model.safetensors")).unwrap();
            kiln::model::Llama::load(input, &options)
        };
        let Ok(model) = model else { return Ok(Loaded::Refused) };
        let vocab = model.config.vocab_size as u32;
        let ids = [1 % vocab, 5 % vocab, 7 % vocab];
        match model.forward(&[kiln::model::Sequence::new(&ids)], None, kiln::model::Logits::Last) {
            Ok(logits) if logits.shape() == [1, vocab as usize] => Ok(Loaded::Accepted),
            Ok(logits) => Err(format!("logits of shape {:?} for a vocabulary of {vocab}", logits.shape())),
            Err(_) => Ok(Loaded::Refused),
        }
    });
}
