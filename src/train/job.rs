//! The fine-tune job: a LoRA run from a fresh adapter (or a checkpoint) to a trained,
//! evaluated adapter, with everything it writes into its output folder:
//!
//! | file | what |
//! |---|---|
//! | `adapter/` | the trained adapter in PEFT's format |
//! | `checkpoint/` | adapter, optimizer state and position: `--resume` continues from it |
//! | `metrics.jsonl` | one line per step: loss, lr, grad norm, tokens/s, skipped (and eval loss when evaluated) |
//! | `loss.png` | train and eval loss against the step |
//! | `baseline.json` | the base model's numbers, measured before the first step |
//! | `summary.json` | before and after: eval loss, accuracy on held-out and training questions, sample answers, retention, speed, memory |
//!
//! Every file is written whole through a temporary name, so a kill at any moment leaves
//! each one as it was or complete; `metrics.jsonl` is appended line by line and cut back to
//! the checkpoint's step when a run resumes.

use super::company::QuestionAnswer;
use super::data::Example;
use super::eval::{RetentionReference, accuracy, answer, complete, eval_loss};
use super::general::REPLAY_PROMPTS;
use super::trainer::{StepMetrics, TrainConfig, Trainer};
use crate::model::{ChatMessage, Llama, Tokenizer};
use crate::ops::loss::IGNORE_INDEX;
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How the job runs around the training loop.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub train: TrainConfig,
    /// The output folder.
    pub out: PathBuf,
    /// Evaluate the loss on the eval examples every this many steps (and at the end).
    pub eval_every: u64,
    /// Write the checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Sequences per evaluation batch and per generation batch.
    pub eval_batch: usize,
    /// Tokens a generated answer may have.
    pub answer_tokens: usize,
    /// Named in the summary.
    pub model_name: String,
    /// Replay examples mixed into training, as a share of the training examples (at most one
    /// per prompt of [`REPLAY_PROMPTS`]): the base model's own answers to general prompts,
    /// so the adapter keeps the base's behaviour outside the data's domain. 0 turns it off.
    pub general_replay: f64,
}

/// What the job trains and evaluates on.
#[derive(Debug, Clone)]
pub struct JobData {
    pub train: Vec<Example>,
    /// Examples whose loss is the eval loss (may be empty).
    pub eval: Vec<Example>,
    /// The system prompt the questions are asked under.
    pub system_prompt: String,
    /// Questions with checkable answers, never trained on (may be empty for a user's data).
    pub heldout: Vec<QuestionAnswer>,
    /// Training questions, asked as trained (may be empty).
    pub train_probe: Vec<QuestionAnswer>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step ran; the summary as written to `summary.json`.
    Finished(Value),
    /// Stopped by the caller's flag after this step; the checkpoint holds it.
    Interrupted { step: u64 },
}

/// The files of the output folder.
pub const ADAPTER_DIR: &str = "adapter";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PLOT: &str = "loss.png";
pub const SUMMARY_FILE: &str = "summary.json";
pub const BASELINE_FILE: &str = "baseline.json";
/// The adapter's name while the job evaluates it inside the model.
const EVAL_ADAPTER: &str = "fine-tuned";

/// Runs the job: a fresh run, or (`resume`) the run whose checkpoint is in `config.out`,
/// with its own saved settings. `stop` is polled after each step: when set, the job saves a
/// checkpoint and returns [`Outcome::Interrupted`].
///
/// Errors: the trainer's, a resume from a folder without a checkpoint or with other data,
/// and a run that diverges (too many non-finite steps in a row; its last checkpoint stays).
pub fn run(
    model: &mut Llama,
    tokenizer: &Tokenizer,
    data: &JobData,
    config: &JobConfig,
    resume: bool,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let started = Instant::now();
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::Io(format!("creating {}: {e}", out.display())))?;
    let checkpoint = out.join(CHECKPOINT_DIR);
    let baseline = match (resume, read_json(&out.join(BASELINE_FILE))) {
        (true, Ok(b)) => b,
        (true, Err(e)) => {
            return Err(Error::InvalidArgument(format!("cannot resume from {}: no run there ({e})", out.display())));
        }
        (false, _) => {
            let clock = Instant::now();
            let mut b = measure(model, tokenizer, data, config, None)?;
            let replay = (config.general_replay * data.train.len() as f64).round() as usize;
            let replay = replay_answers(model, tokenizer, replay.min(REPLAY_PROMPTS.len()), config)?;
            b["replay"] = json!(replay);
            say(&format!("measured the base model in {:.0} s", clock.elapsed().as_secs_f64()));
            write_json(&out.join(BASELINE_FILE), &b)?;
            b
        }
    };
    let reference = retention_reference(&baseline)?;
    let mut train = data.train.clone();
    train.extend(replay_examples(&baseline)?);
    let mut trainer = if resume {
        let trainer = Trainer::resume(model, &checkpoint, train)?;
        cut_metrics(&out.join(METRICS_FILE), trainer.progress().step)?;
        trainer
    } else {
        remove_file(&out.join(METRICS_FILE))?;
        Trainer::new(model, config.train.clone(), train)?
    };

    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join(METRICS_FILE))
        .map_err(|e| Error::Io(format!("opening {}: {e}", out.join(METRICS_FILE).display())))?;
    let total = trainer.config().steps;
    let bar = progress_bar(total, trainer.progress().step);
    let plain_every = (total / 50).max(1);
    let (mut train_seconds, mut train_tokens) = (0f64, 0u64);
    while !trainer.finished() {
        let m = trainer.step(model, None)?;
        train_seconds += m.seconds;
        train_tokens += m.tokens as u64;
        let mut line = step_line(&m);
        let evaluate = !data.eval.is_empty() && (m.step % config.eval_every.max(1) == 0 || m.step == total);
        if evaluate {
            let loss = eval_loss(model, Some(trainer.adapter()), &data.eval, config.eval_batch)?;
            line["eval_loss"] = json!(loss);
        }
        writeln!(metrics_file, "{line}").map_err(|e| Error::Io(format!("writing {METRICS_FILE}: {e}")))?;
        let message = format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s{}",
            m.loss,
            m.lr,
            m.tokens_per_second(),
            if trainer.progress().skipped > 0 {
                format!("  skipped {}", trainer.progress().skipped)
            } else {
                String::new()
            }
        );
        bar.set_position(m.step);
        bar.set_message(message.clone());
        if bar.is_hidden() && (m.step % plain_every == 0 || m.step == total) {
            let eval =
                line.get("eval_loss").and_then(Value::as_f64).map(|l| format!("  eval {l:.4}")).unwrap_or_default();
            say(&format!("step {}/{total}  {message}{eval}", m.step));
        }
        if let Some(reason) = trainer.stop_reason() {
            bar.abandon();
            return Err(Error::InvalidArgument(format!(
                "training stopped at step {}: {reason}; the last good checkpoint is {}",
                m.step,
                checkpoint.display()
            )));
        }
        let interrupted = stop.load(Ordering::SeqCst);
        if interrupted || m.step % config.checkpoint_every.max(1) == 0 || trainer.finished() {
            trainer.save_checkpoint(&checkpoint)?;
        }
        if interrupted {
            bar.abandon_with_message(format!("interrupted: checkpoint at step {}", m.step));
            return Ok(Outcome::Interrupted { step: m.step });
        }
    }
    bar.finish();
    trainer.adapter().save_peft(out.join(ADAPTER_DIR))?;

    say("measuring the fine-tuned model");
    model.load_adapter(EVAL_ADAPTER, trainer.adapter().clone())?;
    let after = measure(model, tokenizer, data, config, Some((EVAL_ADAPTER, trainer.adapter())));
    let retention = after.as_ref().ok().map(|_| reference.measure(model, EVAL_ADAPTER));
    model.unload_adapter(EVAL_ADAPTER)?;
    let after = after?;
    let retention = retention.transpose()?;

    let (train_curve, mut eval_curve) = read_curves(&out.join(METRICS_FILE))?;
    if let Some(before) = baseline["eval_loss"].as_f64() {
        eval_curve.insert(0, (0, before));
    }
    let plot_has_text = super::plot::loss_plot(&out.join(LOSS_PLOT), &train_curve, &eval_curve)?;
    let progress = trainer.progress();
    let samples: Vec<Value> = data
        .heldout
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, q)| {
            json!({
                "question": q.question,
                "expected": q.answer,
                "before": baseline["heldout_answers"][i],
                "after": after["heldout_answers"][i],
            })
        })
        .collect();
    let summary = json!({
        "model": config.model_name,
        "device": model.device().to_string(),
        "config": trainer.config().to_json(),
        "steps": progress.step,
        "skipped_steps": progress.skipped,
        "epochs": progress.epoch as f64 + progress.batch_in_epoch as f64 / trainer.batches_per_epoch().max(1) as f64,
        "train_examples": data.train.len(),
        "replay_examples": trainer.examples_len() - data.train.len(),
        "eval_examples": data.eval.len(),
        "tokens_per_second": if train_seconds > 0.0 { train_tokens as f64 / train_seconds } else { 0.0 },
        "train_seconds": train_seconds,
        "job_seconds": started.elapsed().as_secs_f64(),
        "peak_rss_mib": peak_rss_mib(),
        "before": strip_answers(&baseline),
        "after": strip_answers(&after),
        "retention": retention.map(|r| json!({
            "top_token_agreement": r.top_token_agreement,
            "mean_kl": r.mean_kl,
            "positions": r.positions,
            "prompts": super::general::RETENTION_PROMPTS.len(),
        })),
        "samples": samples,
        "files": {
            "adapter": out.join(ADAPTER_DIR),
            "checkpoint": checkpoint,
            "metrics": out.join(METRICS_FILE),
            "loss_plot": out.join(LOSS_PLOT),
            "loss_plot_has_text": plot_has_text,
            "summary": out.join(SUMMARY_FILE),
        },
    });
    write_json(&out.join(SUMMARY_FILE), &summary)?;
    Ok(Outcome::Finished(summary))
}

/// Eval loss, accuracy on the held-out and the training questions, and the answers, for
/// the base (`None`) or the base with a loaded adapter (its name, and itself for the loss).
/// The base's measure also holds its answers to the general prompts, the retention reference.
fn measure(
    model: &Llama,
    tokenizer: &Tokenizer,
    data: &JobData,
    config: &JobConfig,
    adapter: Option<(&str, &crate::model::LoraAdapter)>,
) -> Result<Value> {
    let name = adapter.map(|(n, _)| n);
    let loss = if data.eval.is_empty() {
        None
    } else {
        Some(eval_loss(model, adapter.map(|(_, a)| a), &data.eval, config.eval_batch)?)
    };
    let ask = |questions: &[QuestionAnswer]| {
        answer(model, tokenizer, questions, &data.system_prompt, name, config.answer_tokens, config.eval_batch)
    };
    let heldout = ask(&data.heldout)?;
    let train = ask(&data.train_probe)?;
    let mut out = json!({
        "eval_loss": loss,
        "heldout_accuracy": (!data.heldout.is_empty()).then(|| accuracy(&data.heldout, &heldout)),
        "train_accuracy": (!data.train_probe.is_empty()).then(|| accuracy(&data.train_probe, &train)),
        "heldout_answers": heldout,
        "train_answers": train,
    });
    if adapter.is_none() {
        let reference = RetentionReference::new(model, tokenizer, config.answer_tokens.max(32))?;
        out["general_reference"] = json!(reference.sequences);
    }
    Ok(out)
}

/// The base model's greedy answers to the first `n` replay prompts: (prompt ids, answer ids).
fn replay_answers(
    model: &Llama,
    tokenizer: &Tokenizer,
    n: usize,
    config: &JobConfig,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let conversations: Vec<Vec<ChatMessage>> =
        REPLAY_PROMPTS[..n].iter().map(|p| vec![ChatMessage::user(*p)]).collect();
    let done = complete(model, tokenizer, &conversations, None, REPLAY_TOKENS, config.eval_batch)?;
    Ok(done.into_iter().filter(|c| !c.answer.is_empty()).map(|c| (c.prompt, c.answer)).collect())
}

/// Tokens of a replay answer at most.
const REPLAY_TOKENS: usize = 32;

/// The replay answers of `baseline.json` as examples: the prompt, then the answer's tokens
/// counted, as generated (with the end-of-sequence token when the base produced it).
fn replay_examples(baseline: &Value) -> Result<Vec<Example>> {
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = match baseline.get("replay") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::Io(format!("{BASELINE_FILE}: replay is malformed: {e}")))?,
    };
    Ok(pairs
        .into_iter()
        .map(|(prompt, answer)| {
            let ids: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
            let targets = (0..ids.len())
                .map(|j| if j + 1 >= prompt.len() && j + 1 < ids.len() { ids[j + 1] as i32 } else { IGNORE_INDEX })
                .collect();
            Example { ids, targets }
        })
        .collect())
}

fn retention_reference(baseline: &Value) -> Result<RetentionReference> {
    serde_json::from_value::<Vec<(Vec<u32>, Vec<u32>)>>(baseline["general_reference"].clone())
        .map(|sequences| RetentionReference { sequences })
        .map_err(|e| Error::Io(format!("{BASELINE_FILE}: general_reference is malformed: {e}")))
}

/// A measure without its long answer lists (they stay in `baseline.json`).
fn strip_answers(measure: &Value) -> Value {
    let mut m = measure.clone();
    if let Some(o) = m.as_object_mut() {
        for k in ["heldout_answers", "train_answers", "general_reference", "replay"] {
            o.remove(k);
        }
    }
    m
}

fn step_line(m: &StepMetrics) -> Value {
    json!({
        "step": m.step,
        "loss": m.loss,
        "lr": m.lr,
        "grad_norm": m.grad_norm,
        "tokens_per_s": m.tokens_per_second(),
        "tokens": m.tokens,
        "skipped": m.skipped,
        "epoch": m.epoch,
    })
}

/// A bar on a terminal; hidden otherwise (the job prints plain lines instead).
fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len}  {msg}  [{elapsed_precise}, {eta} left]")
        {
            bar.set_style(style);
        }
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_position(done);
    bar
}

fn say(message: &str) {
    eprintln!("{message}");
}

/// The train and eval loss curves of `metrics.jsonl`.
/// (step, loss) points.
type Curve = Vec<(u64, f64)>;

fn read_curves(path: &Path) -> Result<(Curve, Curve)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        let Some(step) = v["step"].as_u64() else { continue };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    Ok((train, eval))
}

/// Keeps the lines of `metrics.jsonl` up to `step` (a resumed run writes the rest again);
/// a torn last line (a kill mid-write) goes too.
fn cut_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fs::write_file(path, kept.as_bytes()).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::Io(format!("removing {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    bytes.push(b'\n');
    crate::fs::write_file(path, &bytes).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

/// The process's peak resident memory (Linux's VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}
