//! Text generation from the command line: a Llama-style model from a GGUF file or a Hugging
//! Face folder (SmolLM2-135M-Instruct, fetched once, when none is given), an optional PEFT
//! adapter, a prompt as text or ids, greedy or sampled decoding streamed to stdout.
//!
//! ```sh
//! cargo run --release --example generate -- --chat --prompt "What is the capital of France?"
//! ```
//!
//! Flags: `[--model GGUF_FILE|HF_DIR] [--adapter DIR] [--prompt TEXT | --prompt-ids 1,2,3]
//! [--chat] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//! [--device cpu|cuda:N|wgpu:N] [--quantize FORMAT] [--logits-out FILE] [--json]`.
//! The completion goes to stdout as it is generated (diagnostics to stderr); `--json` prints
//! `{"prompt_ids": [...], "completion_ids": [...], "completion": "..."}` instead.
//! `--logits-out` writes a safetensors file with `ids` (the prompt's ids, i64) and `logits`
//! (`[prompt_len, vocab]` f32: the logits at every prompt position, the adapter included).
//! `--int8-activations` lets quantized products round activations to 8 bits on the CPU, as
//! llama.cpp does (faster, not exact). `--prompt-ids` feeds ids directly, so a model folder without tokenizer files works too
//! (the completion is then printed as ids, and `completion` in `--json` is empty).

use kiln::io::GgufFile;
use kiln::model::{Flow, GenerationConfig, Llama, LoadOptions, Logits, LoraAdapter, Prompt, Sequence, Tokenizer};
use kiln::ops::{QuantFormat, SamplingParams};
use kiln::{Device, Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    model: Option<PathBuf>,
    adapter: Option<PathBuf>,
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    chat: bool,
    max_new_tokens: usize,
    sampling: SamplingParams,
    device: Option<String>,
    quantize: Option<QuantFormat>,
    logits_out: Option<PathBuf>,
    json: bool,
    int8_activations: bool,
}

const USAGE: &str = "usage: generate [--model GGUF_FILE|HF_DIR] [--adapter DIR] [--prompt TEXT | --prompt-ids 1,2,3] \
[--chat] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device cpu|cuda:N|wgpu:N] \
[--quantize nf4|nf4dq|q8_0|q4_0|q4_1] [--logits-out FILE] [--json] [--int8-activations]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: None,
        adapter: None,
        prompt: None,
        prompt_ids: None,
        chat: false,
        max_new_tokens: 64,
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        device: None,
        quantize: None,
        logits_out: None,
        json: false,
        int8_activations: false,
    };
    let mut it = std::env::args().skip(1);
    let bad = |m: String| Error::InvalidArgument(format!("{m}\n{USAGE}"));
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| bad(format!("{name} needs a value")));
        fn number<T: std::str::FromStr>(flag: &str, v: String) -> Result<T> {
            v.parse().map_err(|_| Error::InvalidArgument(format!("{flag}: {v:?} is not a valid number\n{USAGE}")))
        }
        match flag.as_str() {
            "--model" => args.model = Some(value("--model")?.into()),
            "--adapter" => args.adapter = Some(value("--adapter")?.into()),
            "--prompt" => args.prompt = Some(value("--prompt")?),
            "--prompt-ids" => {
                let v = value("--prompt-ids")?;
                let ids = v
                    .split(',')
                    .map(|s| s.trim().parse::<u32>().map_err(|_| bad(format!("--prompt-ids: {s:?} is not a token id"))))
                    .collect::<Result<Vec<u32>>>()?;
                args.prompt_ids = Some(ids);
            }
            "--chat" => args.chat = true,
            "--max-new-tokens" => args.max_new_tokens = number(&flag, value(&flag)?)?,
            "--temperature" => args.sampling.temperature = number(&flag, value(&flag)?)?,
            "--top-k" => args.sampling.top_k = number(&flag, value(&flag)?)?,
            "--top-p" => args.sampling.top_p = number(&flag, value(&flag)?)?,
            "--seed" => args.sampling.seed = number(&flag, value(&flag)?)?,
            "--device" => args.device = Some(value("--device")?),
            "--quantize" => args.quantize = Some(value("--quantize")?.parse::<QuantFormat>()?),
            "--logits-out" => args.logits_out = Some(value("--logits-out")?.into()),
            "--json" => args.json = true,
            "--int8-activations" => args.int8_activations = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(bad(format!("unknown argument {other:?}"))),
        }
    }
    if args.prompt.is_some() && args.prompt_ids.is_some() {
        return Err(bad("give --prompt or --prompt-ids, not both".into()));
    }
    if args.chat && args.prompt_ids.is_some() {
        return Err(bad("--chat wraps a text prompt; it does not take --prompt-ids".into()));
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let device = match &args.device {
        Some(name) => {
            let device: Device = name.parse()?;
            device.info().map_err(|e| Error::NoDevice(format!("--device {name}: {e}")))?;
            device
        }
        None => Device::best(),
    };
    let path = match &args.model {
        Some(p) => p.clone(),
        None => kiln::model::default_model()?,
    };
    let started = Instant::now();
    let options = LoadOptions::new(&device).quantize(args.quantize).int8_activations(args.int8_activations);
    // The tokenizer is needed for a text prompt and to print text; ids work without one.
    let (mut model, tokenizer) = if path.is_dir() {
        let model = Llama::from_hf_dir(&path, &options)?;
        let tokenizer = if path.join("tokenizer.json").is_file() { Some(Tokenizer::from_hf_dir(&path)) } else { None };
        (model, tokenizer)
    } else {
        let file = GgufFile::open(&path)?;
        let tokenizer =
            if file.get("tokenizer.ggml.tokens").is_some() { Some(Tokenizer::from_gguf(&file)) } else { None };
        (Llama::from_gguf(&file, &options)?, tokenizer)
    };
    let tokenizer = match tokenizer {
        Some(Err(e)) if args.prompt.is_some() => return Err(e),
        Some(Err(e)) => {
            eprintln!("no tokenizer ({e}): the completion is printed as ids");
            None
        }
        Some(Ok(t)) => Some(t),
        None => None,
    };
    eprintln!(
        "{}: {} layers, hidden {}, vocab {}, on {device}, loaded in {:.2} s",
        path.display(),
        model.config.num_layers,
        model.config.hidden_size,
        model.config.vocab_size,
        started.elapsed().as_secs_f64()
    );
    let adapter = match &args.adapter {
        Some(dir) => {
            model.load_adapter("adapter", LoraAdapter::load_peft(dir, &device)?)?;
            Some("adapter")
        }
        None => None,
    };

    let prompt_ids: Vec<u32> = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tokenizer = tokenizer.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no tokenizer: pass --prompt-ids", path.display()))
            })?;
            if args.chat {
                let messages = [kiln::model::ChatMessage::new("user", text)];
                let rendered = tokenizer.apply_chat_template(&messages, true)?;
                tokenizer.encode(&rendered, false)?
            } else {
                tokenizer.encode(text, true)?
            }
        }
        (None, None) => return Err(Error::InvalidArgument(format!("give --prompt or --prompt-ids\n{USAGE}"))),
    };
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }

    if let Some(out) = &args.logits_out {
        let logits = model.forward(&[Sequence::new(&prompt_ids).with_adapter(adapter)], None, Logits::All)?;
        let ids: Vec<i64> = prompt_ids.iter().map(|&i| i as i64).collect();
        write_logits(out, &ids, &logits)?;
        eprintln!("wrote {}", out.display());
    }

    let config =
        GenerationConfig { max_new_tokens: args.max_new_tokens, sampling: args.sampling, eos_token_ids: Vec::new() };
    let mut stream = tokenizer.as_ref().map(|t| t.decoder_stream(true));
    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    let generated =
        model.generate(&[Prompt::new(prompt_ids.clone()).with_adapter(adapter)], &config, &mut |_, id| {
            if !args.json {
                if let Some(stream) = stream.as_mut() {
                    if let Some(piece) = stream.step(id)? {
                        let _ = write!(stdout, "{piece}");
                        let _ = stdout.flush();
                    }
                }
            }
            Ok(Flow::Continue)
        })?;
    let seconds = started.elapsed().as_secs_f64();
    let completion_ids = generated.into_iter().next().map(|g| g.ids).unwrap_or_default();
    let completion = match &tokenizer {
        Some(t) => t.decode(&completion_ids, true)?,
        None => String::new(),
    };
    if args.json {
        // The keys in the documented order.
        let json = |v: serde_json::Value| v.to_string();
        writeln!(
            stdout,
            "{{\"prompt_ids\": {}, \"completion_ids\": {}, \"completion\": {}}}",
            json(prompt_ids.clone().into()),
            json(completion_ids.clone().into()),
            json(completion.into())
        )
        .map_err(|e| Error::Io(e.to_string()))?;
    } else {
        if tokenizer.is_none() {
            write!(stdout, "{}", completion_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
                .map_err(|e| Error::Io(e.to_string()))?;
        }
        writeln!(stdout).map_err(|e| Error::Io(e.to_string()))?;
    }
    eprintln!(
        "{} prompt tokens, {} new tokens in {seconds:.2} s ({:.1} tokens/s)",
        prompt_ids.len(),
        completion_ids.len(),
        completion_ids.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

/// `ids` as i64 and `logits` as f32, in one safetensors file.
fn write_logits(path: &std::path::Path, ids: &[i64], logits: &kiln::Tensor) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let values = logits.to_vec::<f32>()?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let logit_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        ("ids", TensorView::new(Dtype::I64, vec![ids.len()], &id_bytes).map_err(|e| Error::Io(e.to_string()))?),
        (
            "logits",
            TensorView::new(Dtype::F32, logits.shape().to_vec(), &logit_bytes).map_err(|e| Error::Io(e.to_string()))?,
        ),
    ];
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Io(e.to_string()))?;
    // Written beside the target, synced, then renamed over it: a crash leaves the old file or
    // the new one, never half of one.
    let io = |e: std::io::Error| Error::Io(format!("writing {}: {e}", path.display()));
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(&bytes).and_then(|_| file.sync_all()))
        .and_then(|_| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(io)
}
