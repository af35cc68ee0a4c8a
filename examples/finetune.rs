//! The fine-tune job from one command: LoRA (QLoRA over a 4-bit base) on a model, with a
//! progress bar, evaluation before and after, the adapter in PEFT's format, checkpoints to
//! resume from, a metrics log, a loss plot, a summary, and optionally a merged GGUF.
//!
//! With no arguments it teaches SmolLM2-135M-Instruct (fetched once, Q4_1) the knowledge
//! base of a fictional company generated from the seed, and shows what it learned.
//!
//! ```text
//! cargo run --release --example finetune -- [--model GGUF_FILE|HF_DIR] [--data FILE.jsonl] [--eval FILE.jsonl]
//!     [--out DIR] [--rank R] [--alpha A] [--targets q_proj,k_proj,...] [--steps N | --epochs E] [--batch B]
//!     [--grad-accum G] [--seq-len L] [--lr LR] [--warmup W] [--schedule cosine|linear|constant]
//!     [--quantize FORMAT] [--resume DIR] [--device D] [--seed S] [--export-gguf FILE]
//! ```

use kiln::model::{Llama, LoadOptions, LoraConfig, PROJECTIONS, Tokenizer};
use kiln::ops::QuantFormat;
use kiln::train::company::CompanyData;
use kiln::train::data::{load_examples, tokenize_records, write_jsonl};
use kiln::train::general::REPLAY_PROMPTS;
use kiln::train::job::{self, JobConfig, JobData, Outcome};
use kiln::train::schedule::ScheduleKind;
use kiln::train::trainer::TrainConfig;
use kiln::{Device, Error, Result};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

const USAGE: &str = "usage: finetune [--model GGUF_FILE|HF_DIR] [--data FILE.jsonl] [--eval FILE.jsonl] [--out DIR] \
[--rank R] [--alpha A] [--targets q_proj,k_proj,...] [--steps N | --epochs E] [--batch B] [--grad-accum G] \
[--seq-len L] [--lr LR] [--warmup W] [--schedule cosine|linear|constant] [--quantize nf4|nf4dq|q8_0|q4_0|q4_1] \
[--resume DIR] [--device cpu|cuda:N|wgpu:N] [--seed S] [--export-gguf FILE] [--checkpointing] \
[--eval-every N] [--checkpoint-every N] [--general-replay SHARE]";

/// The command's settings: what `run.json` in the output folder records, so `--resume DIR`
/// continues with the same model and data.
#[derive(Debug, Clone)]
struct Args {
    model: Option<PathBuf>,
    data: Option<PathBuf>,
    eval: Option<PathBuf>,
    out: Option<PathBuf>,
    rank: usize,
    alpha: f32,
    targets: Vec<String>,
    steps: Option<u64>,
    epochs: Option<f64>,
    batch: usize,
    grad_accum: usize,
    seq_len: usize,
    lr: f64,
    warmup: u64,
    schedule: ScheduleKind,
    quantize: Option<QuantFormat>,
    resume: Option<PathBuf>,
    device: Option<String>,
    seed: u64,
    export_gguf: Option<PathBuf>,
    checkpointing: bool,
    eval_every: Option<u64>,
    checkpoint_every: Option<u64>,
    general_replay: f64,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            model: None,
            data: None,
            eval: None,
            out: None,
            rank: 16,
            alpha: 32.0,
            targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            steps: None,
            epochs: None,
            batch: 8,
            grad_accum: 1,
            seq_len: 256,
            lr: 2e-3,
            warmup: 8,
            schedule: ScheduleKind::Cosine,
            quantize: None,
            resume: None,
            device: None,
            seed: 42,
            export_gguf: None,
            checkpointing: false,
            eval_every: None,
            checkpoint_every: None,
            general_replay: 0.2,
        }
    }
}

/// Epochs of the default run over the company data.
const DEFAULT_EPOCHS: f64 = 4.0;

fn parse_args() -> Result<Args> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    let bad = |m: String| Error::InvalidArgument(format!("{m}\n{USAGE}"));
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| bad(format!("{name} needs a value")));
        fn number<T: std::str::FromStr>(flag: &str, v: String) -> Result<T> {
            v.parse().map_err(|_| Error::InvalidArgument(format!("{flag}: {v:?} is not a valid number\n{USAGE}")))
        }
        match flag.as_str() {
            "--model" => args.model = Some(value(&flag)?.into()),
            "--data" => args.data = Some(value(&flag)?.into()),
            "--eval" => args.eval = Some(value(&flag)?.into()),
            "--out" => args.out = Some(value(&flag)?.into()),
            "--rank" => args.rank = number(&flag, value(&flag)?)?,
            "--alpha" => args.alpha = number(&flag, value(&flag)?)?,
            "--targets" => {
                let v = value(&flag)?;
                args.targets = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                if let Some(t) = args.targets.iter().find(|t| !PROJECTIONS.contains(&t.as_str()) && *t != "all-linear")
                {
                    return Err(bad(format!("--targets: {t:?} is not one of {}", PROJECTIONS.join(", "))));
                }
            }
            "--steps" => args.steps = Some(number(&flag, value(&flag)?)?),
            "--epochs" => args.epochs = Some(number(&flag, value(&flag)?)?),
            "--batch" => args.batch = number(&flag, value(&flag)?)?,
            "--grad-accum" => args.grad_accum = number(&flag, value(&flag)?)?,
            "--seq-len" => args.seq_len = number(&flag, value(&flag)?)?,
            "--lr" => args.lr = number(&flag, value(&flag)?)?,
            "--warmup" => args.warmup = number(&flag, value(&flag)?)?,
            "--schedule" => args.schedule = value(&flag)?.parse()?,
            "--quantize" => args.quantize = Some(value(&flag)?.parse::<QuantFormat>()?),
            "--resume" => args.resume = Some(value(&flag)?.into()),
            "--device" => args.device = Some(value(&flag)?),
            "--seed" => args.seed = number(&flag, value(&flag)?)?,
            "--export-gguf" => args.export_gguf = Some(value(&flag)?.into()),
            "--checkpointing" => args.checkpointing = true,
            "--eval-every" => args.eval_every = Some(number(&flag, value(&flag)?)?),
            "--checkpoint-every" => args.checkpoint_every = Some(number(&flag, value(&flag)?)?),
            "--general-replay" => args.general_replay = number(&flag, value(&flag)?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(bad(format!("unknown argument {other:?}"))),
        }
    }
    if args.steps.is_some() && args.epochs.is_some() {
        return Err(bad("give --steps or --epochs, not both".into()));
    }
    if !(args.general_replay.is_finite() && args.general_replay >= 0.0) {
        return Err(bad("--general-replay must be a share ≥ 0".into()));
    }
    if args.epochs.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
        return Err(bad("--epochs must be positive".into()));
    }
    if args.batch == 0 || args.grad_accum == 0 || args.seq_len < 2 || args.rank == 0 {
        return Err(bad("--batch, --grad-accum and --rank must be at least 1, --seq-len at least 2".into()));
    }
    Ok(args)
}

impl Args {
    fn to_json(&self) -> Value {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        json!({
            "model": path(&self.model),
            "data": path(&self.data),
            "eval": path(&self.eval),
            "seq_len": self.seq_len,
            "quantize": self.quantize.map(|q| q.to_string()),
            "device": self.device,
            "seed": self.seed,
            "checkpointing": self.checkpointing,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
            "general_replay": self.general_replay,
        })
    }

    /// `--resume DIR`: the settings of the run in DIR (its `run.json`), with this command's
    /// `--export-gguf` and `--device` when given.
    fn resumed(&self, dir: &Path) -> Result<Args> {
        let path = dir.join(RUN_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::InvalidArgument(format!("--resume {}: no {RUN_FILE} ({e})", dir.display())))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        let path_of = |k: &str| v[k].as_str().map(PathBuf::from);
        let bad = |k: &str| Error::Io(format!("{}: {k} is malformed", path.display()));
        Ok(Args {
            model: path_of("model"),
            data: path_of("data"),
            eval: path_of("eval"),
            out: Some(dir.to_path_buf()),
            seq_len: v["seq_len"].as_u64().ok_or_else(|| bad("seq_len"))? as usize,
            quantize: v["quantize"].as_str().map(str::parse).transpose()?,
            device: self.device.clone().or_else(|| v["device"].as_str().map(String::from)),
            seed: v["seed"].as_u64().ok_or_else(|| bad("seed"))?,
            checkpointing: v["checkpointing"].as_bool().unwrap_or(false),
            eval_every: v["eval_every"].as_u64(),
            checkpoint_every: v["checkpoint_every"].as_u64(),
            general_replay: v["general_replay"].as_f64().unwrap_or(0.0),
            resume: Some(dir.to_path_buf()),
            export_gguf: self.export_gguf.clone(),
            ..Args::default()
        })
    }
}

const RUN_FILE: &str = "run.json";

fn main() {
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<()> {
    let started = Instant::now();
    let parsed = parse_args()?;
    let args = match &parsed.resume {
        Some(dir) => parsed.resumed(dir)?,
        None => parsed,
    };
    let device = match &args.device {
        Some(name) => {
            let device: Device = name.parse()?;
            device.info().map_err(|e| Error::NoDevice(format!("--device {name}: {e}")))?;
            device
        }
        None => Device::best(),
    };
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => kiln::model::default_model()?,
    };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(timestamp()));

    let options = LoadOptions::new(&device).quantize(args.quantize);
    let mut model = Llama::load(&model_path, &options)?;
    let tokenizer = if model_path.is_dir() {
        Tokenizer::from_hf_dir(&model_path)?
    } else {
        Tokenizer::from_gguf(&kiln::io::GgufFile::open(&model_path)?)?
    };
    eprintln!(
        "{}: {} layers, hidden {}, on {device}; output in {}",
        model_path.display(),
        model.config.num_layers,
        model.config.hidden_size,
        out.display()
    );

    // The data: the user's JSONL (every line read and tokenized before training starts, an
    // error naming its line), or the company's knowledge base, written out beside the run so
    // other tools train on the very same examples.
    let user_eval = args.eval.as_ref().map(|p| load_examples(p, &tokenizer, args.seq_len)).transpose()?;
    let (train, eval, system_prompt, heldout, train_probe) = match &args.data {
        Some(path) => {
            let train = load_examples(path, &tokenizer, args.seq_len)?;
            (train, user_eval.unwrap_or_default(), String::new(), Vec::new(), Vec::new())
        }
        None => {
            let company = CompanyData::generate(args.seed, 1)?;
            let (train_records, eval_records) = (company.train_records(), company.heldout_records());
            write_jsonl(&out.join("data").join("train.jsonl"), &train_records)?;
            write_jsonl(&out.join("data").join("eval.jsonl"), &eval_records)?;
            eprintln!(
                "data: the knowledge base of {}: {} facts as {} training examples, {} held-out questions",
                company.company.name,
                company.facts.len(),
                company.train.len(),
                company.heldout.len()
            );
            let train = tokenize_records(&train_records, &tokenizer, args.seq_len, "company data (train)")?;
            let eval = match user_eval {
                Some(eval) => eval,
                None => tokenize_records(&eval_records, &tokenizer, args.seq_len, "company data (held out)")?,
            };
            let probe = company.train_probe();
            (train, eval, company.system_prompt.clone(), company.heldout, probe)
        }
    };

    // The job adds the replay examples to the training data.
    let replay = ((args.general_replay * train.len() as f64).round() as usize).min(REPLAY_PROMPTS.len());
    let batches_per_epoch = (train.len() + replay).div_ceil(args.batch) as f64;
    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, e) => ((e.unwrap_or(DEFAULT_EPOCHS) * batches_per_epoch) / args.grad_accum as f64).ceil() as u64,
    }
    .max(1);
    let mut lora = LoraConfig::new(args.rank, args.alpha, &args.targets.iter().map(String::as_str).collect::<Vec<_>>());
    lora.lora_dropout = 0.0;
    let config = JobConfig {
        train: TrainConfig {
            lora,
            batch_size: args.batch,
            grad_accum: args.grad_accum,
            steps,
            lr: args.lr,
            warmup_steps: args.warmup.min(steps),
            schedule: args.schedule,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: args.seed,
            checkpointing: args.checkpointing,
            max_non_finite: 10,
        },
        out: out.clone(),
        eval_every: args.eval_every.unwrap_or((steps / 4).max(1)),
        checkpoint_every: args.checkpoint_every.unwrap_or((steps / 4).max(1)),
        eval_batch: 40,
        answer_tokens: 20,
        model_name: model_path.display().to_string(),
        general_replay: args.general_replay,
    };
    if args.resume.is_none() {
        std::fs::create_dir_all(&out).map_err(|e| Error::Io(format!("creating {}: {e}", out.display())))?;
        let mut settings = args.to_json();
        settings["model"] = json!(model_path.display().to_string());
        let text = serde_json::to_string_pretty(&settings).map_err(|e| Error::Io(e.to_string()))?;
        std::fs::write(out.join(RUN_FILE), text).map_err(|e| Error::Io(format!("writing {RUN_FILE}: {e}")))?;
    }

    // Ctrl-C: the job saves a checkpoint after the step in flight and returns.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C while the checkpoint is written: leave now (the checkpoint is
            // written whole or not at all).
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .map_err(|e| Error::Io(format!("installing the Ctrl-C handler: {e}")))?;

    let data = JobData { train, eval, system_prompt, heldout, train_probe };
    let outcome = job::run(&mut model, &tokenizer, &data, &config, args.resume.is_some(), &stop)?;
    let summary = match outcome {
        Outcome::Interrupted { step } => {
            eprintln!(
                "stopped at step {step}; continue with: cargo run --release --example finetune -- --resume {}",
                out.display()
            );
            return Ok(());
        }
        Outcome::Finished(summary) => summary,
    };
    if let Some(path) = &args.export_gguf {
        let adapter = kiln::model::LoraAdapter::load_peft(out.join(job::ADAPTER_DIR), &device)?;
        kiln::model::export_gguf(&model, Some(&adapter), &model_path, path)?;
        eprintln!("wrote {} (the adapter merged into the base, Q8_0)", path.display());
    }
    print_summary(&summary, started.elapsed().as_secs_f64());
    Ok(())
}

fn print_summary(s: &Value, total_seconds: f64) {
    let pct = |v: &Value| v.as_f64().map(|x| format!("{:.0}%", 100.0 * x)).unwrap_or_else(|| "-".into());
    let num = |v: &Value| v.as_f64().map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    println!();
    println!("                       before    after");
    println!("eval loss              {:>6}   {:>6}", num(&s["before"]["eval_loss"]), num(&s["after"]["eval_loss"]));
    println!(
        "held-out questions     {:>6}   {:>6}",
        pct(&s["before"]["heldout_accuracy"]),
        pct(&s["after"]["heldout_accuracy"])
    );
    println!(
        "training questions     {:>6}   {:>6}",
        pct(&s["before"]["train_accuracy"]),
        pct(&s["after"]["train_accuracy"])
    );
    if let Some(r) = s["retention"].as_object() {
        println!(
            "general prompts: the base's top token kept at {} of {} positions, mean KL {}",
            pct(&r["top_token_agreement"]),
            r["positions"],
            num(&r["mean_kl"])
        );
    }
    for sample in s["samples"].as_array().into_iter().flatten() {
        println!();
        println!("Q: {}", sample["question"].as_str().unwrap_or_default());
        println!("  expected: {}", sample["expected"].as_str().unwrap_or_default());
        println!("  before:   {}", one_line(&sample["before"]));
        println!("  after:    {}", one_line(&sample["after"]));
    }
    println!();
    println!(
        "{} steps, {:.0} tokens/s training, {:.0} s in all, peak memory {} MiB",
        s["steps"],
        s["tokens_per_second"].as_f64().unwrap_or(0.0),
        total_seconds,
        s["peak_rss_mib"].as_f64().map(|m| format!("{m:.0}")).unwrap_or_else(|| "?".into())
    );
    let files = &s["files"];
    for (what, key) in [
        ("adapter (PEFT)", "adapter"),
        ("checkpoint", "checkpoint"),
        ("metrics", "metrics"),
        ("loss plot", "loss_plot"),
        ("summary", "summary"),
    ] {
        println!("{what:<15} {}", files[key].as_str().unwrap_or_default());
    }
}

fn one_line(v: &Value) -> String {
    v.as_str().unwrap_or_default().replace('\n', " ")
}

/// `YYYYmmdd-HHMMSS` in UTC, for the default output folder.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
