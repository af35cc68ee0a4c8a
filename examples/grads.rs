//! The loss and a PEFT LoRA adapter's gradients for a batch, written to a safetensors file,
//! to set beside PyTorch's (transformers + PEFT + autograd on the same model and adapter).
//!
//! ```sh
//! cargo run --release --example grads -- --model tests/fixtures/llama/tiny \
//!     --adapter tests/fixtures/llama/adapter-tiny --prompt-ids '5,9,17,33;40,41,42' --out grads.safetensors
//! ```
//!
//! Flags: `--model GGUF_FILE|HF_DIR --adapter DIR --prompt-ids 1,2,3[;4,5,6...]
//! [--device cpu|cuda:N|wgpu:N] [--checkpointing] --out FILE.safetensors`.
//! Each `;`-separated list is one sequence of the batch; each position predicts the next id
//! (Hugging Face's causal-LM loss with `labels = input_ids`: the mean over every predicted
//! position of every sequence). The file holds `loss` (f32, `[1]`) and, for every tensor of
//! the adapter, its gradient (f32, the tensor's shape) under the adapter file's own key
//! prefixed by `grad.` (`grad.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
//! It is written beside the target, synced and renamed over it.
//!
//! Exit status: 0 on success, 2 for bad flags (with the usage on stderr), 1 for any other
//! error (a model or adapter that cannot be read or does not fit, an id past the vocabulary).

use kiln::io::SafetensorsFile;
use kiln::model::{Llama, LoadOptions, LoraAdapter, StepOptions, TrainSequence, Trainable, lora_tensor_names};
use kiln::{Device, Error, GgufFile, Result, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const USAGE: &str = "usage: grads --model GGUF_FILE|HF_DIR --adapter DIR --prompt-ids 1,2,3[;4,5,6...] \
[--device cpu|cuda:N|wgpu:N] [--checkpointing] --out FILE.safetensors";

struct Args {
    model: PathBuf,
    adapter: PathBuf,
    batch: Vec<Vec<u32>>,
    device: Option<Device>,
    checkpointing: bool,
    out: PathBuf,
}

/// The flags, or a message saying which one is wrong.
fn parse_args(args: impl IntoIterator<Item = String>) -> std::result::Result<Args, String> {
    let (mut model, mut adapter, mut batch, mut device, mut checkpointing, mut out) =
        (None, None, None, None, false, None);
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--adapter" => adapter = Some(PathBuf::from(value("--adapter")?)),
            "--prompt-ids" => batch = Some(parse_batch(&value("--prompt-ids")?)?),
            "--device" => {
                let name = value("--device")?;
                device = Some(name.parse::<Device>().map_err(|e| format!("--device: {e}"))?);
            }
            "--checkpointing" => checkpointing = true,
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let missing = |name: &str| format!("{name} is required");
    Ok(Args {
        model: model.ok_or_else(|| missing("--model"))?,
        adapter: adapter.ok_or_else(|| missing("--adapter"))?,
        batch: batch.ok_or_else(|| missing("--prompt-ids"))?,
        device,
        checkpointing,
        out: out.ok_or_else(|| missing("--out"))?,
    })
}

/// `1,2,3;4,5` as one list of ids per sequence; each needs two ids at least, so that it
/// predicts something.
fn parse_batch(text: &str) -> std::result::Result<Vec<Vec<u32>>, String> {
    text.split(';')
        .enumerate()
        .map(|(i, seq)| {
            let ids = seq
                .split(',')
                .map(|s| s.trim().parse::<u32>().map_err(|_| format!("--prompt-ids: {s:?} is not a token id")))
                .collect::<std::result::Result<Vec<u32>, String>>()?;
            if ids.len() < 2 {
                return Err(format!("--prompt-ids: sequence {i} has {} id(s); each needs two at least", ids.len()));
            }
            Ok(ids)
        })
        .collect()
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let device = match &args.device {
        Some(device) => {
            device.info().map_err(|e| Error::NoDevice(format!("--device {device}: {e}")))?;
            *device
        }
        None => Device::best(),
    };
    let options = LoadOptions::new(&device);
    let model = if args.model.is_dir() {
        Llama::from_hf_dir(&args.model, &options)?
    } else {
        Llama::from_gguf(&GgufFile::open(&args.model)?, &options)?
    };
    let adapter = LoraAdapter::load_peft(&args.adapter, &device)?;
    let keys = file_keys(&args.adapter, &adapter)?;

    let batch: Vec<TrainSequence> = args.batch.iter().map(|ids| TrainSequence::causal(ids)).collect();
    let step = model.train_step(
        &batch,
        Trainable::Lora(&adapter),
        &StepOptions::default().checkpointing(args.checkpointing),
    )?;
    if !step.non_finite.is_empty() {
        eprintln!("warning: non-finite gradients for {}", step.non_finite.join(", "));
    }

    let loss = Tensor::from_slice(&[step.loss], &[1], &Device::Cpu)?;
    let mut named: Vec<(String, &Tensor)> = vec![("loss".to_string(), &loss)];
    for (name, grad) in &step.grads {
        let key =
            keys.get(name).ok_or_else(|| Error::InvalidArgument(format!("no tensor in the adapter for {name}")))?;
        named.push((format!("grad.{key}"), grad));
    }
    let named: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let bytes = kiln::io::to_bytes(&named, &HashMap::new())?;
    write_atomically(&args.out, &bytes)?;
    eprintln!(
        "{} sequence(s), {} counted targets on {device}: loss {}, gradient norm {}; wrote {}",
        batch.len(),
        step.counted,
        step.loss,
        step.grad_norm,
        args.out.display()
    );
    Ok(())
}

/// For each of the adapter's tensors, the step's name for it (`lora_tensor_names`) mapped to
/// the key it has in `adapter_model.safetensors` (with or without `base_model.model.`).
fn file_keys(dir: &Path, adapter: &LoraAdapter) -> Result<HashMap<String, String>> {
    let file = SafetensorsFile::open(dir.join("adapter_model.safetensors"))?;
    let names = file.names()?;
    let mut keys = HashMap::new();
    for module in adapter.layers.keys() {
        for (half, step_name) in ["lora_A", "lora_B"].into_iter().zip(lora_tensor_names(module)) {
            let bare = format!("{module}.{half}.weight");
            let key = names
                .iter()
                .find(|n| **n == step_name || **n == bare)
                .ok_or_else(|| Error::Io(format!("{}: no key for {bare}", dir.display())))?;
            keys.insert(step_name, key.clone());
        }
    }
    Ok(keys)
}

/// `bytes` written beside `path`, synced, then renamed over it: a crash leaves the old file
/// or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|_| file.sync_all()))
        .and_then(|_| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}
