//! The fine-tune job on the tiny Llama: a short run writes every file and lowers the loss
//! on every device; a resumed run equals the uninterrupted one bit for bit on the CPU;
//! non-finite steps are skipped, counted and, too many in a row, stop the run.

#[macro_use]
mod common;

use kiln::model::{Llama, LoadOptions, LoraAdapter, LoraConfig, Tokenizer};
use kiln::train::company::CompanyData;
use kiln::train::data::{Example, tokenize_records};
use kiln::train::job::{self, JobConfig, JobData, Outcome};
use kiln::train::schedule::ScheduleKind;
use kiln::train::trainer::{TrainConfig, Trainer};
use kiln::{Device, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-finetune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny model with a tokenizer and chat template, on `device`.
fn tiny(device: &Device, dir: &Path) -> (Llama, Tokenizer) {
    let folder = common::hf_folder_with_tokenizer("tiny", dir);
    let model = Llama::from_hf_dir(&folder, &LoadOptions::new(device)).unwrap();
    (model, Tokenizer::from_hf_dir(&folder).unwrap())
}

/// `n` examples of the company data set, as the tiny tokenizer writes them.
fn company_examples(tokenizer: &Tokenizer, n: usize) -> (CompanyData, Vec<Example>) {
    let data = CompanyData::generate(5, 1).unwrap();
    let records = data.train_records();
    let examples = tokenize_records(&records[..n], tokenizer, 256, "company").unwrap();
    (data, examples)
}

fn config(steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        lora: LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "gate_proj", "down_proj"]),
        batch_size: 2,
        grad_accum: 2,
        steps,
        lr,
        warmup_steps: 1,
        schedule: ScheduleKind::Cosine,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed: 11,
        checkpointing: false,
        max_non_finite: 3,
    }
}

fn job_config(out: &Path, train: TrainConfig) -> JobConfig {
    JobConfig {
        train,
        out: out.to_path_buf(),
        eval_every: 4,
        checkpoint_every: 3,
        eval_batch: 4,
        answer_tokens: 6,
        model_name: "tiny".into(),
        general_replay: 0.5,
    }
}

fn job_data(tokenizer: &Tokenizer, n: usize) -> JobData {
    let (data, train) = company_examples(tokenizer, n);
    JobData {
        eval: train.clone(),
        train,
        system_prompt: data.system_prompt.clone(),
        heldout: data.heldout[..3].to_vec(),
        train_probe: data.train_probe()[..3].to_vec(),
    }
}

/// The bits of every tensor of an adapter, by name.
fn adapter_bits(adapter: &LoraAdapter) -> BTreeMap<String, Vec<u32>> {
    adapter
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec_f32().unwrap().iter().map(|v| v.to_bits()).collect()))
        .collect()
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join(job::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

device_tests!(a_short_job_writes_every_file_and_lowers_the_loss);

fn a_short_job_writes_every_file_and_lowers_the_loss(device: &Device) {
    let dir = temp(&format!("job-{}", device.to_string().replace(':', "")));
    let (mut model, tokenizer) = tiny(device, &dir);
    let data = job_data(&tokenizer, 8);
    let out = dir.join("run");
    let config = job_config(&out, TrainConfig { schedule: ScheduleKind::Constant, ..config(10, 2e-2) });
    let Outcome::Finished(summary) =
        job::run(&mut model, &tokenizer, &data, &config, false, &AtomicBool::new(false)).unwrap()
    else {
        panic!("the job was not interrupted")
    };
    // The loss on the data it trained on goes down.
    let (before, after) =
        (summary["before"]["eval_loss"].as_f64().unwrap(), summary["after"]["eval_loss"].as_f64().unwrap());
    assert!(after < before - 0.1, "eval loss {before} -> {after}");
    // metrics.jsonl: one line per step with the contract's fields; eval loss when evaluated.
    let lines = metrics(&out);
    assert_eq!(lines.len(), 10);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"].as_u64(), Some(i as u64 + 1));
        for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "step {}: {key} = {}", i + 1, l[key]);
        }
        assert_eq!(l["skipped"], Value::Bool(false));
        assert_eq!(l["eval_loss"].is_f64(), (i + 1) % 4 == 0 || i + 1 == 10, "step {}", i + 1);
    }
    // The adapter (PEFT's files) and the checkpoint reload.
    let adapter = LoraAdapter::load_peft(out.join(job::ADAPTER_DIR), device).unwrap();
    let checkpoint = out.join(job::CHECKPOINT_DIR);
    let in_checkpoint = LoraAdapter::load_peft(&checkpoint, device).unwrap();
    assert_eq!(adapter_bits(&adapter), adapter_bits(&in_checkpoint));
    let state: Value = serde_json::from_slice(&std::fs::read(checkpoint.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 10);
    // The replay examples joined the training data.
    assert_eq!(summary["replay_examples"].as_u64(), Some(4));
    // The plot is a PNG; the summary has the before/after numbers and the files.
    let png = std::fs::read(out.join(job::LOSS_PLOT)).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(out.join(job::SUMMARY_FILE)).unwrap()).unwrap();
    assert_eq!(on_disk, summary);
    for side in ["before", "after"] {
        for key in ["heldout_accuracy", "train_accuracy"] {
            assert!(summary[side][key].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{side}.{key}");
        }
    }
    let retention = &summary["retention"];
    assert!(retention["top_token_agreement"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)));
    assert!(retention["mean_kl"].as_f64().is_some_and(|kl| kl >= 0.0 && kl.is_finite()));
    assert_eq!(summary["samples"].as_array().unwrap().len(), 3);
    assert!(summary["tokens_per_second"].as_f64().unwrap() > 0.0);
    // The model is left without the job's adapter.
    assert!(model.adapter_names().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run stopped and resumed from its checkpoint gives the same losses and the same adapter,
/// bit for bit, as the run that was never stopped: accumulation, an epoch boundary and the
/// schedule included.
#[test]
fn a_resumed_run_equals_the_uninterrupted_run_bit_for_bit() {
    let device = Device::Cpu;
    let dir = temp("resume");
    let (model, tokenizer) = tiny(&device, &dir);
    // 7 examples in batches of 2 (4 batches an epoch), two per step: epochs end mid-step.
    let (_, examples) = company_examples(&tokenizer, 7);
    let mut straight = Trainer::new(&model, config(7, 1e-2), examples.clone()).unwrap();
    let losses: Vec<u32> = (0..7).map(|_| straight.step(&model, None).unwrap().loss.to_bits()).collect();

    let mut first = Trainer::new(&model, config(7, 1e-2), examples.clone()).unwrap();
    let mut resumed_losses: Vec<u32> = (0..3).map(|_| first.step(&model, None).unwrap().loss.to_bits()).collect();
    let checkpoint = dir.join("checkpoint");
    first.save_checkpoint(&checkpoint).unwrap();
    drop(first);
    let mut second = Trainer::resume(&model, &checkpoint, examples.clone()).unwrap();
    assert_eq!(second.progress().step, 3);
    while !second.finished() {
        resumed_losses.push(second.step(&model, None).unwrap().loss.to_bits());
    }
    assert_eq!(resumed_losses, losses);
    assert_eq!(adapter_bits(second.adapter()), adapter_bits(straight.adapter()));
    assert_eq!(second.progress(), straight.progress());

    // Other data is refused.
    let (_, other) = company_examples(&tokenizer, 6);
    let err = Trainer::resume(&model, &checkpoint, other).unwrap_err().to_string();
    assert!(err.contains("other data"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The job interrupted after its first step (the flag a Ctrl-C sets) and resumed writes the
/// same metrics as a job never interrupted.
#[test]
fn an_interrupted_job_resumes_to_the_same_curve() {
    let device = Device::Cpu;
    let dir = temp("interrupt");
    let (mut model, tokenizer) = tiny(&device, &dir);
    let data = job_data(&tokenizer, 6);
    let straight = dir.join("straight");
    job::run(&mut model, &tokenizer, &data, &job_config(&straight, config(5, 1e-2)), false, &AtomicBool::new(false))
        .unwrap();
    let stopped = dir.join("stopped");
    let stopped_config = job_config(&stopped, config(5, 1e-2));
    let outcome = job::run(&mut model, &tokenizer, &data, &stopped_config, false, &AtomicBool::new(true)).unwrap();
    assert!(matches!(outcome, Outcome::Interrupted { step: 1 }), "{outcome:?}");
    assert!(!stopped.join(job::SUMMARY_FILE).exists());
    let outcome = job::run(&mut model, &tokenizer, &data, &stopped_config, true, &AtomicBool::new(false)).unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
    let losses = |out: &Path| -> Vec<(u64, String)> {
        metrics(out).iter().map(|l| (l["step"].as_u64().unwrap(), l["loss"].to_string())).collect()
    };
    assert_eq!(losses(&stopped), losses(&straight));
    let bits = |out: &Path| adapter_bits(&LoraAdapter::load_peft(out.join(job::ADAPTER_DIR), &device).unwrap());
    assert_eq!(bits(&stopped), bits(&straight));
    // A resume without a checkpoint is an error, not a fresh run.
    let empty = dir.join("empty");
    let err =
        job::run(&mut model, &tokenizer, &data, &job_config(&empty, config(5, 1e-2)), true, &AtomicBool::new(false))
            .unwrap_err();
    assert!(err.to_string().contains("cannot resume"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A step whose gradient holds a NaN changes nothing, is reported skipped and counted; the
/// run goes on. Non-finite steps past the limit in a row stop the run with a reason.
#[test]
fn non_finite_steps_are_skipped_and_reported() {
    let device = Device::Cpu;
    let dir = temp("nonfinite");
    let (model, tokenizer) = tiny(&device, &dir);
    let (_, examples) = company_examples(&tokenizer, 8);
    // No warmup: every step but the poisoned one moves the adapter.
    let mut trainer =
        Trainer::new(&model, TrainConfig { warmup_steps: 0, ..config(6, 1e-2) }, examples.clone()).unwrap();
    let poison = |grads: &mut BTreeMap<String, Tensor>| {
        let (name, g) = grads.iter().next().map(|(n, g)| (n.clone(), g.clone())).unwrap();
        let mut values = g.to_vec_f32().unwrap();
        values[0] = f32::NAN;
        grads.insert(name, Tensor::from_slice(&values, g.shape(), &g.device()).unwrap());
    };
    let mut hook = |step: u64, grads: &mut BTreeMap<String, Tensor>| {
        if step == 2 {
            poison(grads);
        }
        Ok(())
    };
    let mut reports = Vec::new();
    for _ in 0..6 {
        let before = adapter_bits(trainer.adapter());
        let m = trainer.step(&model, Some(&mut hook)).unwrap();
        let changed = adapter_bits(trainer.adapter()) != before;
        reports.push((m.skipped, changed, m.grad_norm.is_finite()));
    }
    assert_eq!(reports[2], (true, false, false), "step 3 had the NaN");
    for (i, r) in reports.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(*r, (false, true, true), "step {}", i + 1);
    }
    assert_eq!(trainer.progress().skipped, 1);
    assert_eq!(trainer.progress().skipped_in_a_row, 0);
    assert!(trainer.stop_reason().is_none());

    // Every step poisoned: after max_non_finite (3) in a row the run says why it stops.
    let mut trainer = Trainer::new(&model, config(10, 1e-2), examples).unwrap();
    let mut always = |_: u64, grads: &mut BTreeMap<String, Tensor>| {
        poison(grads);
        Ok(())
    };
    for step in 1..=4 {
        assert!(trainer.stop_reason().is_none(), "before step {step}");
        assert!(trainer.step(&model, Some(&mut always)).unwrap().skipped);
    }
    let reason = trainer.stop_reason().expect("4 non-finite steps in a row stop the run");
    assert!(reason.contains("non-finite"), "{reason}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Settings a run cannot use are refused before anything trains.
#[test]
fn bad_settings_are_errors() {
    let device = Device::Cpu;
    let dir = temp("bad");
    let (model, tokenizer) = tiny(&device, &dir);
    let (_, examples) = company_examples(&tokenizer, 4);
    for (what, c) in [
        ("no steps", TrainConfig { steps: 0, ..config(1, 1e-2) }),
        ("lr NaN", TrainConfig { lr: f64::NAN, ..config(1, 1e-2) }),
        ("batch 0", TrainConfig { batch_size: 0, ..config(1, 1e-2) }),
        ("accum 0", TrainConfig { grad_accum: 0, ..config(1, 1e-2) }),
        ("warmup past the run", TrainConfig { warmup_steps: 5, ..config(2, 1e-2) }),
        ("negative decay", TrainConfig { weight_decay: -1.0, ..config(1, 1e-2) }),
        ("clip 0", TrainConfig { max_grad_norm: Some(0.0), ..config(1, 1e-2) }),
        ("rank 0", TrainConfig { lora: LoraConfig::new(0, 8.0, &["q_proj"]), ..config(1, 1e-2) }),
        ("unknown module", TrainConfig { lora: LoraConfig::new(4, 8.0, &["qkv"]), ..config(1, 1e-2) }),
    ] {
        assert!(Trainer::new(&model, c, examples.clone()).is_err(), "{what}");
    }
    assert!(Trainer::new(&model, config(1, 1e-2), Vec::new()).is_err(), "no examples");
    let mut trainer = Trainer::new(&model, config(1, 1e-2), examples).unwrap();
    trainer.step(&model, None).unwrap();
    assert!(trainer.step(&model, None).is_err(), "a step past the run's end");
    let _ = std::fs::remove_dir_all(&dir);
}
