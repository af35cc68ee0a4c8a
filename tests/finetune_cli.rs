//! `examples/finetune`, the command-line contract, on the tiny model (and, when it is cached,
//! a few steps on SmolLM2 with the GGUF export): a malformed JSONL line is an error naming
//! the line before anything trains; a run on a user's JSONL writes every file; Ctrl-C saves a
//! checkpoint and `--resume` finishes the run; a kill -9 at any moment leaves a checkpoint and
//! an adapter that load.

#[macro_use]
mod common;

use kiln::Device;
use kiln::model::{Llama, LoadOptions, LoraAdapter};
use kiln::train::AdamW;
use kiln::train::job;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn finetune_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| common::example_bin("finetune"))
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-finetune-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A user's data in the three formats.
const USER_DATA: &str = r#"{"messages": [{"role": "system", "content": "You answer for Acme."}, {"role": "user", "content": "Who makes the Zed?"}, {"role": "assistant", "content": "Acme makes the Zed."}]}
{"prompt": "The Zed costs ", "completion": "$5."}
{"text": "Acme was founded in 1901."}
{"messages": [{"role": "user", "content": "Is the Zed blue?"}, {"role": "assistant", "content": "Yes, the Zed is blue."}, {"role": "user", "content": "And the Yon?"}, {"role": "assistant", "content": "The Yon is red."}]}
"#;

/// Arguments of a run on the tiny model and `data`, written into `dir`.
fn tiny_args(dir: &Path, data: &str, steps: u64) -> Vec<String> {
    let model = common::hf_folder_with_tokenizer("tiny", dir);
    let data_path = dir.join("data.jsonl");
    std::fs::write(&data_path, data).unwrap();
    [
        "--model",
        model.to_str().unwrap(),
        "--data",
        data_path.to_str().unwrap(),
        "--eval",
        data_path.to_str().unwrap(),
        "--out",
        dir.join("run").to_str().unwrap(),
        "--steps",
        &steps.to_string(),
        "--batch",
        "2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--seq-len",
        "128",
        "--device",
        "cpu",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
        "--general-replay",
        "0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn finetune(args: &[String]) -> Output {
    Command::new(finetune_bin()).args(args).output().unwrap()
}

fn spawn(args: &[String]) -> Child {
    Command::new(finetune_bin()).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn metrics_lines(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join(job::METRICS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the run has logged `steps` steps (or the child ended).
fn wait_for_steps(child: &mut Child, run: &Path, steps: usize) {
    let start = Instant::now();
    while metrics_lines(run).len() < steps && child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(300), "no progress in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The checkpoint folder loads whole: adapter, optimizer state and position.
fn check_checkpoint(run: &Path) -> u64 {
    let checkpoint = run.join(job::CHECKPOINT_DIR);
    let adapter = LoraAdapter::load_peft(&checkpoint, &Device::Cpu).unwrap();
    let optimizer = AdamW::load(checkpoint.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(optimizer.params().len(), adapter.tensors().len());
    let state: Value = serde_json::from_slice(&std::fs::read(checkpoint.join("trainer_state.json")).unwrap()).unwrap();
    state["step"].as_u64().unwrap()
}

#[test]
fn a_malformed_line_is_an_error_naming_it_before_training() {
    let dir = temp("malformed");
    let bad = format!(
        "{}{}\n",
        USER_DATA.lines().take(2).map(|l| format!("{l}\n")).collect::<String>(),
        r#"{"prompt": "no completion"}"#
    );
    let out = finetune(&tiny_args(&dir, &bad, 3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("data.jsonl:3:"), "{stderr}");
    assert!(!dir.join("run").join(job::CHECKPOINT_DIR).exists(), "nothing trained");
    let out = finetune(&["--epochs".into(), "1".into(), "--steps".into(), "2".into()]);
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGINT (Ctrl-C) mid-run: the command saves a checkpoint and exits cleanly; `--resume`
/// finishes the run, and every step is logged once.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run() {
    let dir = temp("ctrlc");
    let args = tiny_args(&dir, USER_DATA, 300);
    let run = dir.join("run");
    let mut child = spawn(&args);
    wait_for_steps(&mut child, &run, 3);
    // SAFETY: kill(2) with a live child's pid and SIGINT.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped at step"), "{stderr}");
    let step = check_checkpoint(&run);
    assert!((3..300).contains(&step), "stopped at {step}");
    assert!(!run.join(job::SUMMARY_FILE).exists());

    let out = finetune(&["--resume".into(), run.to_str().unwrap().into()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<u64> = metrics_lines(&run).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=300).collect::<Vec<_>>());
    assert_eq!(check_checkpoint(&run), 300);
    for file in [job::SUMMARY_FILE, job::LOSS_PLOT, job::BASELINE_FILE, "run.json"] {
        assert!(run.join(file).is_file(), "{file}");
    }
    LoraAdapter::load_peft(run.join(job::ADAPTER_DIR), &Device::Cpu).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// kill -9 at several moments of a run that checkpoints every step: each time, the
/// checkpoint (and the adapter, once written) load, and `--resume` goes on from it.
#[cfg(unix)]
#[test]
fn kill_9_never_leaves_a_checkpoint_that_does_not_load() {
    let dir = temp("kill9");
    let mut args = tiny_args(&dir, USER_DATA, 120);
    args.extend(["--checkpoint-every".into(), "1".into()]);
    let run = dir.join("run");
    let mut child = spawn(&args);
    wait_for_steps(&mut child, &run, 2);
    for delay_ms in [0u64, 7, 23, 41] {
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let step = check_checkpoint(&run);
        assert!(step <= 120);
        child = spawn(&["--resume".into(), run.to_str().unwrap().into()]);
        wait_for_steps(&mut child, &run, step as usize + 2);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(check_checkpoint(&run), 120);
    LoraAdapter::load_peft(run.join(job::ADAPTER_DIR), &Device::Cpu).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default command on the real model, cut to two steps, with the GGUF export: every
/// file is written, the adapter loads, and the exported GGUF loads and answers as the base
/// with the adapter does.
#[test]
fn a_few_steps_on_smollm2_with_the_gguf_export() {
    let Some(_) = kiln::model::cached_default_model() else {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI: the default model is not cached");
        println!("SKIP: the default model is not cached");
        return;
    };
    let dir = temp("smollm2");
    let run = dir.join("run");
    let gguf = dir.join("merged.gguf");
    let args: Vec<String> =
        ["--steps", "2", "--device", "cpu", "--out", run.to_str().unwrap(), "--export-gguf", gguf.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let out = finetune(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("held-out questions"), "{stdout}");
    for file in [job::SUMMARY_FILE, job::LOSS_PLOT, job::METRICS_FILE, "data/train.jsonl", "data/eval.jsonl"] {
        assert!(run.join(file).is_file(), "{file}");
    }
    let summary: Value = serde_json::from_slice(&std::fs::read(run.join(job::SUMMARY_FILE)).unwrap()).unwrap();
    assert_eq!(summary["steps"], 2);
    assert!(summary["replay_examples"].as_u64().unwrap() > 0);
    let adapter = LoraAdapter::load_peft(run.join(job::ADAPTER_DIR), &Device::Cpu).unwrap();

    // The export answers as the base with the adapter: the same greedy tokens on the
    // held-out questions' prompts, up to where Q8_0 (the export) and Q4_1 (the base) part.
    let options = LoadOptions::new(&Device::Cpu);
    let mut tuned = Llama::load(kiln::model::default_model().unwrap(), &options).unwrap();
    tuned.load_adapter("a", adapter).unwrap();
    let merged = Llama::load(&gguf, &options).unwrap();
    let file = kiln::io::GgufFile::open(&gguf).unwrap();
    let tokenizer = kiln::model::Tokenizer::from_gguf(&file).unwrap();
    assert!(file.get_str("tokenizer.chat_template").is_ok());
    let data = kiln::train::company::CompanyData::generate(42, 1).unwrap();
    let questions = &data.heldout[..4];
    let a = kiln::train::eval::answer(&tuned, &tokenizer, questions, &data.system_prompt, Some("a"), 6, 4).unwrap();
    let b = kiln::train::eval::answer(&merged, &tokenizer, questions, &data.system_prompt, None, 6, 4).unwrap();
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same >= 3, "adapter {a:?}\nexport  {b:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
