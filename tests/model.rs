//! The Llama model against transformers and PEFT (`tests/fixtures/make_llama.py`): a tiny
//! Llama from Hugging Face files and from GGUF (f32, Q8_0, Q4_0, Q4_1, mixed), with and
//! without PEFT adapters, logits and greedy generation, on every device.

#[macro_use]
mod common;

use kiln::io::SafetensorsFile;
use kiln::model::{Flow, GenerationConfig, Llama, LlamaConfig, LoadOptions, Logits, LoraAdapter, Prompt, Sequence};
use kiln::ops::SamplingParams;
use kiln::{DType, Device, Error, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

struct Expected(SafetensorsFile);

impl Expected {
    fn open() -> Expected {
        Expected(SafetensorsFile::open(fixtures().join("expected.safetensors")).unwrap())
    }

    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.0.tensor(name, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.to_vec::<f32>().unwrap(), t.shape().to_vec())
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        let (dtype, _, bytes) = self.0.raw(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(dtype, "I64", "{name}");
        bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    }

    fn prompts(&self) -> Vec<Vec<u32>> {
        (0..3).map(|i| self.ids(&format!("ids.{i}"))).collect()
    }
}

fn load(name: &str, device: &Device) -> Llama {
    Llama::load(fixtures().join(name), &LoadOptions::new(device)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn adapter(name: &str, device: &Device) -> LoraAdapter {
    LoraAdapter::load_peft(fixtures().join(name), device).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// f32 through two small layers: each logit is a sum of a few hundred rounded products per
/// layer, so its error stays within a few hundred ulps of the logits' scale. The bound is
/// 2⁻¹³ of the largest logit (about 1000 f32 ulps at that scale) plus the same relative
/// part.
fn assert_logits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = |w: f32| scale / 8192.0 + w.abs() / 8192.0;
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| ((g - w).abs(), tol(*w)))
        .fold((0f32, 0f32), |m, (d, t)| if d / t > m.0 / m.1.max(f32::MIN_POSITIVE) { (d, t) } else { m });
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol(*w), "{what}: logit {i}: got {g}, want {w} (worst difference {:?})", worst);
    }
}

/// The batch's packed `Logits::All` rows of sequence i.
fn rows_of(all: &[f32], lens: &[usize], vocab: usize, i: usize) -> Vec<f32> {
    let start: usize = lens[..i].iter().sum();
    all[start * vocab..(start + lens[i]) * vocab].to_vec()
}

/// Runs the three prompts as one padded batch (sequence i with `adapters[i]`) and checks
/// each against the expected logits named by `keys[i]`.
fn check_batch(model: &Llama, adapters: [Option<&str>; 3], keys: [&str; 3], what: &str) {
    let expected = Expected::open();
    let prompts = expected.prompts();
    let batch: Vec<Sequence<'_>> =
        prompts.iter().zip(adapters).map(|(p, a)| Sequence::new(p).with_adapter(a)).collect();
    let logits = model.forward(&batch, None, Logits::All).unwrap().to_vec::<f32>().unwrap();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for (i, key) in keys.iter().enumerate() {
        let (want, shape) = expected.f32(&format!("{key}.logits.{i}"));
        assert_eq!(shape, [lens[i], 320]);
        assert_logits(&format!("{what}, sequence {i} ({key})"), &rows_of(&logits, &lens, 320, i), &want);
    }
}

fn hf_logits_match_transformers(device: &Device) {
    let model = load("tiny", device);
    assert!(model.config.tie_word_embeddings && model.weights.lm_head.is_none());
    check_batch(&model, [None; 3], ["tiny"; 3], "tiny");
}

fn peft_adapters_per_sequence_match_peft(device: &Device) {
    let mut model = load("tiny", device);
    model.load_adapter("a", adapter("adapter-tiny", device)).unwrap();
    model.load_adapter("rs", adapter("adapter-tiny-rs", device)).unwrap();
    // One forward, three sequences, three different adapters (one none).
    check_batch(&model, [Some("a"), Some("rs"), None], ["tiny.adapter", "tiny.adapter_rs", "tiny"], "mixed adapters");
    check_batch(&model, [Some("rs"), None, Some("a")], ["tiny.adapter_rs", "tiny", "tiny.adapter"], "mixed adapters");
}

fn sharded_bf16_biases_llama3_rope_match_transformers(device: &Device) {
    let mut model = load("tiny-bias", device);
    let c = &model.config;
    assert!(c.qkv_bias && c.o_bias && !c.tie_word_embeddings, "{c:?}");
    assert!(matches!(c.rope.scaling, kiln::ops::RopeScaling::Llama3 { .. }), "{c:?}");
    check_batch(&model, [None; 3], ["tiny_bias"; 3], "tiny-bias");
    model.load_adapter("a", adapter("adapter-tiny-bias", device)).unwrap();
    check_batch(
        &model,
        [Some("a"), None, Some("a")],
        ["tiny_bias.adapter", "tiny_bias", "tiny_bias.adapter"],
        "tiny-bias",
    );
}

fn gguf_logits_match_transformers_loading_the_gguf(device: &Device) {
    for file in ["tiny-f32", "tiny-q8_0", "tiny-q4_0", "tiny-q4_1", "tiny-mixed"] {
        let mut model = load(&format!("{file}.gguf"), device);
        let key = format!("gguf.{file}");
        check_batch(&model, [None; 3], [key.as_str(); 3], file);
        // PEFT's adapter, trained on Hugging Face's q/k row order, on the GGUF base.
        model.load_adapter("a", adapter("adapter-tiny", device)).unwrap();
        let with = format!("{key}.adapter");
        check_batch(&model, [Some("a"), None, Some("a")], [with.as_str(), key.as_str(), with.as_str()], file);
    }
}

fn gguf_config_equals_the_hf_config() {
    let hf = LlamaConfig::from_hf_file(fixtures().join("tiny/config.json")).unwrap();
    let gguf = LlamaConfig::from_gguf(&kiln::GgufFile::open(fixtures().join("tiny-f32.gguf")).unwrap()).unwrap();
    assert_eq!(
        (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_layers, hf.num_heads, hf.num_kv_heads),
        (gguf.vocab_size, gguf.hidden_size, gguf.intermediate_size, gguf.num_layers, gguf.num_heads, gguf.num_kv_heads)
    );
    assert_eq!(
        (hf.head_dim, hf.rms_norm_eps, hf.rope, hf.tie_word_embeddings),
        (gguf.head_dim, gguf.rms_norm_eps, gguf.rope, gguf.tie_word_embeddings)
    );
}

#[test]
fn gguf_config_equals_the_hf_config_cpu() {
    gguf_config_equals_the_hf_config();
}

/// Greedy tokens of the three prompts decoded together (each with its adapter) equal
/// transformers' `generate(do_sample=False)` of each prompt alone.
fn greedy_generation_matches_transformers(device: &Device) {
    let expected = Expected::open();
    let prompts = expected.prompts();
    let config = GenerationConfig { max_new_tokens: 12, ..GenerationConfig::default() };
    for (model_name, adapters, keys) in [
        ("tiny", [None, None, None], ["tiny"; 3]),
        ("tiny", [Some("a"), None, Some("a")], ["tiny.adapter", "tiny", "tiny.adapter"]),
        ("tiny-q4_1.gguf", [None; 3], ["gguf.tiny-q4_1"; 3]),
    ] {
        let mut model = load(model_name, device);
        model.load_adapter("a", adapter("adapter-tiny", device)).unwrap();
        let batch: Vec<Prompt> =
            prompts.iter().zip(adapters).map(|(p, a)| Prompt::new(p.clone()).with_adapter(a)).collect();
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let out = model
            .generate(&batch, &config, &mut |i, id| {
                streamed[i].push(id);
                Ok(Flow::Continue)
            })
            .unwrap();
        for (i, key) in keys.iter().enumerate() {
            let want = expected.ids(&format!("{key}.greedy.{i}"));
            assert_eq!(out[i].ids, want, "{model_name}, sequence {i} ({key}) on {device}");
            assert_eq!(streamed[i], want, "streamed tokens, sequence {i}");
        }
    }
}

/// Decoding token by token against the cache gives the logits of re-running the whole
/// prefix each time.
fn kv_cache_decoding_equals_rerunning_the_prefix(device: &Device) {
    let model = load("tiny-q4_1.gguf", device);
    let expected = Expected::open();
    let prompts = expected.prompts();
    let extra: [Vec<u32>; 3] = [vec![5, 77, 310, 9], vec![100, 3, 3, 250], vec![7, 8, 9, 10]];
    let mut state = model.new_state(3, 32).unwrap();
    let first: Vec<Sequence<'_>> = prompts.iter().map(|p| Sequence::new(p)).collect();
    let mut steps = vec![model.forward(&first, Some(&mut state), Logits::Last).unwrap().to_vec::<f32>().unwrap()];
    for t in 0..4 {
        let next: Vec<[u32; 1]> = extra.iter().map(|e| [e[t]]).collect();
        let batch: Vec<Sequence<'_>> = next.iter().map(|n| Sequence::new(n)).collect();
        steps.push(model.forward(&batch, Some(&mut state), Logits::Last).unwrap().to_vec::<f32>().unwrap());
    }
    assert_eq!(state.lens(), [prompts[0].len() + 4, prompts[1].len() + 4, prompts[2].len() + 4]);
    for i in 0..3 {
        let full: Vec<u32> = prompts[i].iter().chain(&extra[i]).copied().collect();
        let all = model.forward(&[Sequence::new(&full)], None, Logits::All).unwrap().to_vec::<f32>().unwrap();
        for (t, step) in steps.iter().enumerate() {
            let row = prompts[i].len() - 1 + t;
            assert_logits(
                &format!("sequence {i}, step {t}"),
                &step[i * 320..(i + 1) * 320],
                &all[row * 320..(row + 1) * 320],
            );
        }
    }
}

/// Adapters load, unload and swap without touching the base; coming back to an adapter
/// gives exactly its earlier logits.
fn adapter_swaps_are_exact(device: &Device) {
    let mut model = load("tiny", device);
    let ids = Expected::open().prompts()[1].clone();
    let run = |m: &Llama, a: Option<&str>| {
        m.forward(&[Sequence::new(&ids).with_adapter(a)], None, Logits::All).unwrap().to_vec::<f32>().unwrap()
    };
    let base = run(&model, None);
    model.load_adapter("x", adapter("adapter-tiny", device)).unwrap();
    let first = run(&model, Some("x"));
    assert_ne!(first, base);
    model.load_adapter("x", adapter("adapter-tiny-rs", device)).unwrap();
    let swapped = run(&model, Some("x"));
    assert_ne!(swapped, first);
    model.load_adapter("x", adapter("adapter-tiny", device)).unwrap();
    assert_eq!(run(&model, Some("x")), first, "swapping back");
    model.unload_adapter("x").unwrap();
    assert_eq!(run(&model, None), base, "the base after unloading");
    assert!(matches!(
        model.forward(&[Sequence::new(&ids).with_adapter(Some("x"))], None, Logits::All),
        Err(Error::InvalidArgument(_))
    ));
}

/// A seed fixes the sampled tokens, the same on every device as on the CPU.
fn seeded_sampling_is_the_same_on_every_device(device: &Device) {
    let prompts = Expected::open().prompts();
    let config = GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7 },
        eos_token_ids: vec![],
    };
    let batch: Vec<Prompt> = prompts.iter().map(|p| Prompt::new(p.clone())).collect();
    let run = |d: &Device| load("tiny", d).generate(&batch, &config, &mut |_, _| Ok(Flow::Continue)).unwrap();
    let here = run(device);
    assert_eq!(here, run(device), "the same seed twice");
    assert_eq!(here, run(&Device::Cpu), "{device} against the CPU");
    let other = GenerationConfig { sampling: SamplingParams { seed: 8, ..config.sampling }, ..config.clone() };
    assert_ne!(here, load("tiny", device).generate(&batch, &other, &mut |_, _| Ok(Flow::Continue)).unwrap());
}

fn generation_stops_at_eos_and_on_request(device: &Device) {
    let model = load("tiny", device);
    let expected = Expected::open();
    let prompts = expected.prompts();
    let greedy = expected.ids("tiny.greedy.0");
    // The fourth greedy token as end-of-sequence: the sequence ends with it.
    let config = GenerationConfig { max_new_tokens: 12, eos_token_ids: vec![greedy[3]], ..GenerationConfig::default() };
    let first = greedy.iter().position(|&t| t == greedy[3]).unwrap();
    let out = model.generate(&[Prompt::new(prompts[0].clone())], &config, &mut |_, _| Ok(Flow::Continue)).unwrap();
    assert_eq!(out[0].ids, greedy[..=first]);
    assert_eq!(out[0].finish, kiln::model::FinishReason::Eos);
    // The callback stops after two tokens.
    let config = GenerationConfig { max_new_tokens: 12, ..GenerationConfig::default() };
    let mut n = 0;
    let out = model
        .generate(&[Prompt::new(prompts[0].clone())], &config, &mut |_, _| {
            n += 1;
            Ok(if n == 2 { Flow::Stop } else { Flow::Continue })
        })
        .unwrap();
    assert_eq!((out[0].ids.as_slice(), out[0].finish), (&greedy[..2], kiln::model::FinishReason::Stopped));
    // No new tokens: only the prompt runs.
    let config = GenerationConfig { max_new_tokens: 0, ..GenerationConfig::default() };
    assert!(
        model.generate(&[Prompt::new(prompts[0].clone())], &config, &mut |_, _| Ok(Flow::Continue)).unwrap()[0]
            .ids
            .is_empty()
    );
}

fn bf16_activations_stay_close(device: &Device) {
    // bf16 weights and activations: logits within bf16's precision of the f32 model.
    let model = Llama::load(fixtures().join("tiny"), &LoadOptions::new(device).dtype(DType::BF16)).unwrap();
    let expected = Expected::open();
    let ids = expected.prompts()[1].clone();
    let got = model.forward(&[Sequence::new(&ids)], None, Logits::All).unwrap().to_vec::<f32>().unwrap();
    let (want, _) = expected.f32("tiny.logits.1");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    // bf16 keeps 8 bits: a relative error of 2⁻⁸ per rounding, a few dozen roundings deep.
    assert!(worst <= scale * 0.1, "bf16 logits differ by {worst} at scale {scale}");
    let argmax = |v: &[f32]| {
        v.chunks(320)
            .map(|r| r.iter().enumerate().fold(0, |b, (i, x)| if *x > r[b] { i } else { b }))
            .collect::<Vec<_>>()
    };
    let agree = argmax(&got).iter().zip(argmax(&want)).filter(|(a, b)| **a == *b).count();
    assert!(agree * 10 >= ids.len() * 8, "bf16 and f32 agree on {agree} of {} argmaxes", ids.len());
}

fn quantize_at_load_is_close(device: &Device) {
    // A dense base quantized at load (the QLoRA base) stays near the f32 model.
    for format in [kiln::ops::QuantFormat::Q8_0, kiln::ops::QuantFormat::Nf4DoubleQuant] {
        let options = LoadOptions::new(device).quantize(Some(format));
        let model = Llama::load(fixtures().join("tiny"), &options).unwrap();
        assert!(model.weights.layers.iter().all(|l| matches!(l.q.weight, kiln::model::Weight::Quantized(_))));
        let expected = Expected::open();
        let ids = expected.prompts()[0].clone();
        let got = model.forward(&[Sequence::new(&ids)], None, Logits::All).unwrap().to_vec::<f32>().unwrap();
        let (want, _) = expected.f32("tiny.logits.0");
        let mean = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).sum::<f32>() / want.len() as f32;
        assert!(mean < 1.0, "{format}: mean logit shift {mean}");
        assert!(got.iter().all(|v| v.is_finite()));
    }
}

device_tests!(
    hf_logits_match_transformers,
    peft_adapters_per_sequence_match_peft,
    sharded_bf16_biases_llama3_rope_match_transformers,
    gguf_logits_match_transformers_loading_the_gguf,
    greedy_generation_matches_transformers,
    kv_cache_decoding_equals_rerunning_the_prefix,
    adapter_swaps_are_exact,
    seeded_sampling_is_the_same_on_every_device,
    generation_stops_at_eos_and_on_request,
    bf16_activations_stay_close,
    quantize_at_load_is_close,
);

// ---------------------------------------------------------------------------------------
// Bad input: an Err naming the file, the tensor or the field; never a panic.

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_tiny(name: &str) -> PathBuf {
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, json.to_string()).unwrap();
}

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn bad_configs_name_the_field() {
    for (field, value, expect) in [
        ("hidden_size", None, "hidden_size"),
        ("num_attention_heads", Some(serde_json::json!(3)), "head"),
        ("num_key_value_heads", Some(serde_json::json!(3)), "num_key_value_heads"),
        ("vocab_size", Some(serde_json::json!("many")), "vocab_size"),
        ("rms_norm_eps", Some(serde_json::json!(-1.0)), "rms_norm_eps"),
        ("rope_parameters", Some(serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0})), "yarn"),
        ("model_type", Some(serde_json::json!("gpt2")), "gpt2"),
    ] {
        let dir = copy_tiny("config");
        edit_config(&dir, |m| match value {
            Some(v) => {
                m.insert(field.into(), v);
            }
            None => {
                m.remove(field);
            }
        });
        let err = Llama::load(&dir, &LoadOptions::new(&Device::Cpu)).map(|_| ()).unwrap_err();
        let text = message(err);
        assert!(text.contains(expect) && text.contains("config.json"), "{field}: {text}");
    }
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    // A tensor missing, and one of the wrong shape, in a copy of the checkpoint.
    let file = SafetensorsFile::open(fixtures().join("tiny/model.safetensors")).unwrap();
    let names = file.names().unwrap();
    let tensors: Vec<(String, Tensor)> =
        names.iter().map(|n| (n.clone(), file.tensor(n, &Device::Cpu).unwrap())).collect();
    let missing = "model.layers.1.mlp.up_proj.weight";
    let dir = copy_tiny("missing");
    let kept: Vec<(&str, &Tensor)> =
        tensors.iter().filter(|(n, _)| n != missing).map(|(n, t)| (n.as_str(), t)).collect();
    kiln::io::save(dir.join("model.safetensors"), &kept, &Default::default()).unwrap();
    let text = message(Llama::load(&dir, &LoadOptions::new(&Device::Cpu)).map(|_| ()).unwrap_err());
    assert!(text.contains(missing), "{text}");

    let wrong = "model.layers.0.self_attn.k_proj.weight";
    let small = Tensor::zeros(&[16, 64], DType::F32, &Device::Cpu).unwrap();
    let dir = copy_tiny("shape");
    let swapped: Vec<(&str, &Tensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), if n == wrong { &small } else { t })).collect();
    kiln::io::save(dir.join("model.safetensors"), &swapped, &Default::default()).unwrap();
    let err = Llama::load(&dir, &LoadOptions::new(&Device::Cpu)).map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::Shape(_)) && message(err.clone()).contains(wrong), "{err}");

    let dir = scratch("empty");
    std::fs::copy(fixtures().join("tiny/config.json"), dir.join("config.json")).unwrap();
    let text = message(Llama::load(&dir, &LoadOptions::new(&Device::Cpu)).map(|_| ()).unwrap_err());
    assert!(text.contains("model.safetensors"), "{text}");
    assert!(Llama::load(fixtures().join("no-such-model.gguf"), &LoadOptions::new(&Device::Cpu)).is_err());
}

#[test]
fn bad_adapters_and_prompts_are_refused() {
    let mut model = load("tiny", &Device::Cpu);
    // An adapter for another model: tiny-bias has the same shapes, so rename a module past
    // the layers, and one whose shapes do not fit.
    let mut past = adapter("adapter-tiny", &Device::Cpu);
    let (module, layer) = past.layers.pop_first().unwrap();
    past.layers.insert(module.replace("layers.0", "layers.7"), layer);
    let text = message(model.load_adapter("past", past).unwrap_err());
    assert!(text.contains("layers.7"), "{text}");
    let mut misfit = adapter("adapter-tiny", &Device::Cpu);
    let layer = misfit.layers.get_mut("model.layers.0.self_attn.k_proj").unwrap();
    layer.b = Tensor::zeros(&[64, 4], DType::F32, &Device::Cpu).unwrap();
    let text = message(model.load_adapter("misfit", misfit).unwrap_err());
    assert!(text.contains("k_proj"), "{text}");
    assert!(model.adapter_names().is_empty(), "a refused adapter leaves nothing loaded");

    // Token ids past the vocabulary, a prompt past the context or the cache, unknown adapters.
    let text = message(model.forward(&[Sequence::new(&[3, 320])], None, Logits::All).unwrap_err());
    assert!(text.contains("320") && text.contains("position 1"), "{text}");
    let long = vec![5u32; 257];
    assert!(model.forward(&[Sequence::new(&long)], None, Logits::Last).is_err());
    let config = GenerationConfig { max_new_tokens: 4, ..GenerationConfig::default() };
    assert!(model.generate(&[Prompt::new(long)], &config, &mut |_, _| Ok(Flow::Continue)).is_err());
    assert!(model.generate(&[Prompt::new(vec![])], &config, &mut |_, _| Ok(Flow::Continue)).is_err());
    let mut state = model.new_state(1, 4).unwrap();
    assert!(model.forward(&[Sequence::new(&[5, 6, 7, 8, 9])], Some(&mut state), Logits::Last).is_err());
    assert_eq!(state.lens(), [0], "a refused step writes nothing");
    assert!(model.forward(&[Sequence::new(&[5]), Sequence::new(&[6])], Some(&mut state), Logits::Last).is_err());
    assert!(model.unload_adapter("none").is_err());
    let text = message(
        model
            .generate(&[Prompt::new(vec![5]).with_adapter(Some("none"))], &config, &mut |_, _| Ok(Flow::Continue))
            .unwrap_err(),
    );
    assert!(text.contains("none"), "{text}");
}

/// SmolLM2 through its own tokenizer and chat template: greedy decoding answers the way
/// transformers does (`The capital of France is Paris.` then `<|im_end|>`), and a stop string
/// ends the answer at the token that completes it.
#[test]
fn smollm2_chat_answers_and_stops_at_a_stop_string() {
    let Some(path) = kiln::model::cached_default_model() else {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI: the default model is not cached");
        println!("SKIP: the default model is not cached");
        return;
    };
    let file = kiln::GgufFile::open(&path).unwrap();
    let tokenizer = kiln::model::Tokenizer::from_gguf(&file).unwrap();
    let model = Llama::from_gguf(&file, &LoadOptions::new(&Device::Cpu)).unwrap();
    let text = tokenizer
        .apply_chat_template(&[kiln::model::ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let ids = tokenizer.encode(&text, false).unwrap();
    let config = GenerationConfig { max_new_tokens: 20, ..GenerationConfig::default() };
    let out = model.generate(&[Prompt::new(ids.clone())], &config, &mut |_, _| Ok(Flow::Continue)).unwrap();
    // transformers 5.24, greedy, on this GGUF (dequantized to f32): the same ids.
    assert_eq!(out[0].ids, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(out[0].finish, kiln::model::FinishReason::Eos);
    assert_eq!(tokenizer.decode(&out[0].ids, true).unwrap(), "The capital of France is Paris.");

    let mut stops = kiln::model::StopStrings::new(&tokenizer, &["France"], 1);
    let out = model.generate(&[Prompt::new(ids)], &config, &mut |i, id| stops.check(i, id)).unwrap();
    assert_eq!(out[0].finish, kiln::model::FinishReason::Stopped);
    assert_eq!(tokenizer.decode(&out[0].ids, true).unwrap(), "The capital of France");
    assert_eq!(stops.text(0), Some("The capital of France"));
}

/// The config names of the three families, old and new rope spellings.
#[test]
fn configs_of_llama_mistral_and_qwen2() {
    // Qwen2: q/k/v biases without `attention_bias`, no o bias; the window only when used.
    let qwen2 = LlamaConfig::from_hf_json(
        r#"{"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "sliding_window": 32, "use_sliding_window": false, "max_position_embeddings": 512,
            "eos_token_id": [7, 8]}"#,
    )
    .unwrap();
    assert!(qwen2.qkv_bias && !qwen2.o_bias && qwen2.tie_word_embeddings);
    assert_eq!(
        (qwen2.head_dim, qwen2.rope.theta, qwen2.sliding_window, qwen2.eos_token_ids.as_slice()),
        (16, 1e6, None, &[7, 8][..])
    );
    // Mistral: its window bounds the sequences kiln runs.
    let mistral = LlamaConfig::from_hf_json(
        r#"{"model_type": "mistral", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
            "sliding_window": 128, "max_position_embeddings": 4096}"#,
    )
    .unwrap();
    assert!(!mistral.qkv_bias && !mistral.o_bias && !mistral.tie_word_embeddings);
    assert_eq!((mistral.head_dim, mistral.sliding_window, mistral.max_sequence()), (32, Some(128), 128));
    // Llama 3.1's legacy `rope_scaling` beside a top-level `rope_theta`.
    let llama = LlamaConfig::from_hf_json(
        r#"{"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "attention_bias": true, "mlp_bias": true}"#,
    )
    .unwrap();
    assert!(llama.qkv_bias && llama.o_bias && llama.mlp_bias && llama.num_kv_heads == 4);
    assert_eq!(llama.rope.theta, 500000.0);
    assert!(matches!(
        llama.rope.scaling,
        kiln::ops::RopeScaling::Llama3 { original_max_position_embeddings: 8192, .. }
    ));
}
