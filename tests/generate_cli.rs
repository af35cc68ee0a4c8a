//! `examples/generate`, the command-line contract: the real default model answers a chat
//! question on the CPU and on WGSL (lavapipe in CI); `--json`, `--logits-out` and
//! `--prompt-ids` on the tiny fixture model with a PEFT adapter give PEFT's logits.

use kiln::io::SafetensorsFile;
use kiln::{Device, model};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The example binary cargo built beside this test (`target/<profile>/examples/generate`).
fn generate_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("examples").join(format!("generate{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is missing: cargo test builds the examples", bin.display());
    bin
}

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(generate_bin()).args(args).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "generate {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

/// The default model from the cache, or a printed reason to skip (a failure in CI, where
/// the README's test command fetches it first).
fn smollm2() -> Option<PathBuf> {
    match model::cached_default_model() {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI: the default model is not cached; ci/test fetches it before the tests")
        }
        None => {
            println!("SKIP: {} is not cached (run the generate example once to fetch it)", model::DEFAULT_MODEL_FILE);
            None
        }
    }
}

fn answers_paris_on(device: &str) {
    let Some(path) = smollm2() else { return };
    let path = path.to_str().unwrap();
    let prompt = "What is the capital of France?";
    let (stdout, stderr) =
        run(&["--model", path, "--chat", "--prompt", prompt, "--max-new-tokens", "16", "--device", device]);
    println!("{device}: {stdout}{stderr}");
    assert!(stdout.contains("Paris"), "{device} answered {stdout:?}");
    if device != "cpu" {
        // One run is enough on a software adapter (about a minute and a half on lavapipe).
        return;
    }
    // --json: the same completion, its ids, and the prompt's ids.
    let (json, _) =
        run(&["--model", path, "--chat", "--prompt", prompt, "--max-new-tokens", "16", "--device", device, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["completion"].as_str().unwrap().trim(), stdout.trim(), "the streamed text is the completion");
    assert!(v["prompt_ids"].as_array().unwrap().len() > 10 && !v["completion_ids"].as_array().unwrap().is_empty());
}

#[test]
fn answers_paris_cpu() {
    answers_paris_on("cpu");
}

#[test]
fn answers_paris_wgpu() {
    if Device::wgpu_devices().is_empty() {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI: no wgpu adapter");
        println!("SKIP: no wgpu adapter");
        return;
    }
    answers_paris_on("wgpu:0");
}

#[test]
fn logits_out_with_a_peft_adapter_matches_peft() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let expected = SafetensorsFile::open(fixtures.join("expected.safetensors")).unwrap();
    let (_, _, id_bytes) = expected.raw("ids.1").unwrap();
    let ids: Vec<i64> = id_bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let out = std::env::temp_dir().join(format!("kiln-generate-logits-{}.safetensors", std::process::id()));
    let (json, _) = run(&[
        "--model",
        fixtures.join("tiny").to_str().unwrap(),
        "--adapter",
        fixtures.join("adapter-tiny").to_str().unwrap(),
        "--prompt-ids",
        &list,
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--logits-out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let file = SafetensorsFile::open(&out).unwrap();
    let (dtype, shape, bytes) = file.raw("ids").unwrap();
    assert_eq!((dtype.as_str(), shape), ("I64", vec![ids.len()]));
    assert_eq!(bytes, id_bytes);
    let logits = file.tensor("logits", &Device::Cpu).unwrap();
    assert_eq!(logits.shape(), [ids.len(), 320]);
    let want = expected.tensor("tiny.adapter.logits.1", &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let got = logits.to_vec::<f32>().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= scale / 8192.0 + w.abs() / 8192.0, "logit {g} against PEFT's {w}");
    }
    // No tokenizer in the folder: the completion is empty, its ids are transformers' greedy ones.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["completion"], "");
    let (_, _, greedy) = expected.raw("tiny.adapter.greedy.1").unwrap();
    let greedy: Vec<u64> = greedy.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u64).collect();
    let got: Vec<u64> = v["completion_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(got, greedy);
    let _ = std::fs::remove_file(out);
}

#[test]
fn bad_arguments_are_errors() {
    for args in [
        vec!["--max-new-tokens", "many", "--prompt-ids", "1"],
        vec!["--prompt", "a", "--prompt-ids", "1"],
        vec!["--device", "tpu:0", "--prompt-ids", "1"],
        vec!["--quantize", "q3_k", "--prompt-ids", "1"],
        vec!["--model", "/no/such/model.gguf", "--prompt-ids", "1"],
        vec!["--frobnicate"],
    ] {
        let out = Command::new(generate_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.starts_with("error:"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
