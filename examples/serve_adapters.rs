//! Serving many adapters side by side: a quantized base projection and a set of LoRA
//! adapters of mixed ranks, a batch whose rows each pick their adapter (or none), one
//! pass for the whole batch. Saves one adapter as PEFT files and loads it back.
//! `cargo run --release --example serve_adapters`

use kiln::model::{LoraAdapter, LoraConfig, LoraLayer};
use kiln::ops::lora::{AdapterSet, lora_batched};
use kiln::ops::{QTensor, QuantFormat, qmatmul};
use kiln::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() -> kiln::Result<()> {
    let device = Device::best();
    let (dim, rows) = if device.is_cpu() { (1024, 64) } else { (4096, 256) };
    println!("device {device}, {dim}x{dim} projection, {rows} rows per batch");

    // A frozen 4-bit base weight.
    let w = Tensor::randn(&[dim, dim], 0.0, 0.02, 1, DType::F32, &Device::Cpu)?;
    let base = QTensor::quantize(&w, QuantFormat::Nf4DoubleQuant)?.to_device(&device)?;
    println!("base: {:.3} bits per weight", base.bits_per_weight());

    // Eight adapters, ranks 8 to 64, as different tenants would train them.
    let ranks = [8usize, 16, 16, 32, 8, 64, 16, 8];
    let adapters: Vec<(Tensor, Tensor, f32)> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let a = Tensor::randn(&[r, dim], 0.0, 0.02, 100 + i as u64, DType::F32, &device)?;
            let b = Tensor::randn(&[dim, r], 0.0, 0.02, 200 + i as u64, DType::F32, &device)?;
            Ok((a, b, 16.0 / r as f32))
        })
        .collect::<kiln::Result<_>>()?;
    let refs: Vec<(&Tensor, &Tensor, f32)> = adapters.iter().map(|(a, b, s)| (a, b, *s)).collect();
    let set = AdapterSet::new(&refs)?;

    // Each row picks an adapter; every ninth row is served by the base model alone.
    let picks: Vec<i32> = (0..rows).map(|t| if t % 9 == 8 { -1 } else { (t % ranks.len()) as i32 }).collect();
    let x = Tensor::randn(&[rows, dim], 0.0, 1.0, 7, DType::F32, &device)?;
    let serve = || -> kiln::Result<Tensor> { lora_batched(&x, &qmatmul(&x, &base)?, &set, &picks) };
    serve()?;
    device.synchronize()?;
    let runs = 10;
    let start = Instant::now();
    for _ in 0..runs {
        serve()?;
    }
    device.synchronize()?;
    let per_batch = start.elapsed().as_secs_f64() / runs as f64;
    println!(
        "{rows} rows over {} adapters: {:.2} ms per batch, {:.0} rows/s",
        ranks.len(),
        per_batch * 1e3,
        rows as f64 / per_batch
    );

    // Adapters travel as PEFT files.
    let mut layers = BTreeMap::new();
    layers.insert(
        "model.layers.0.self_attn.q_proj".to_string(),
        LoraLayer { a: adapters[1].0.clone(), b: adapters[1].1.clone() },
    );
    let adapter = LoraAdapter { config: LoraConfig::new(16, 16.0, &["q_proj"]), layers };
    let dir = std::env::temp_dir().join("kiln-serve-adapters");
    adapter.save_peft(&dir)?;
    let loaded = LoraAdapter::load_peft(&dir, &device)?;
    println!(
        "saved and reloaded a PEFT adapter: {} layer(s), scale {}",
        loaded.layers.len(),
        loaded.scale("model.layers.0.self_attn.q_proj")
    );
    Ok(())
}
