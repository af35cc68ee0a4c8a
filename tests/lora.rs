//! LoRA on every device: merge and unmerge, the fused layer forward against the unfused
//! composition, backward against finite differences, the multi-adapter batch, and PEFT
//! adapter files in and out.

#[macro_use]
mod common;

use common::{BACKEND_ROUNDINGS, U32, assert_close};
use kiln::model::{LoraAdapter, LoraConfig, LoraLayer};
use kiln::ops::lora::{merge, unmerge};
use kiln::ops::{MatmulOptions, matmul_with};
use kiln::{DType, Device, Error, Tensor};
use std::collections::BTreeMap;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-lora-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn merge_adds_the_scaled_delta_and_unmerge_takes_it_out(device: &Device) {
    let (out, inp, r, s) = (37, 64, 8, 2.0f32);
    for dtype in DType::ALL {
        let w = Tensor::randn(&[out, inp], 0.0, 1.0, 1, dtype, device).unwrap();
        let a = Tensor::randn(&[r, inp], 0.0, 0.1, 2, dtype, device).unwrap();
        let b = Tensor::randn(&[out, r], 0.0, 0.1, 3, dtype, device).unwrap();
        let merged = merge(&w, &a, &b, s).unwrap();
        assert_eq!((merged.shape(), merged.dtype()), (w.shape(), dtype));
        let (wh, ah, bh) = (w.to_vec_f32().unwrap(), a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        let mut want = vec![0f64; out * inp];
        let mut atol = vec![0f64; out * inp];
        for o in 0..out {
            for i in 0..inp {
                let (mut d, mut mass) = (0f64, 0f64);
                for k in 0..r {
                    d += bh[o * r + k] as f64 * ah[k * inp + i] as f64;
                    mass += (bh[o * r + k] as f64 * ah[k * inp + i] as f64).abs();
                }
                want[o * inp + i] = wh[o * inp + i] as f64 + s as f64 * d;
                // f32 accumulation of r terms, the scaling and the addition.
                atol[o * inp + i] = (2.0 * r as f64 + 2.0) * U32 * (s as f64 * mass + wh[o * inp + i].abs() as f64);
            }
        }
        assert_close(&format!("{device} {dtype} merge"), &merged.to_vec_f32().unwrap(), &want, &atol, dtype, 1.0);
        // Unmerging returns W up to one rounding of the merged weight and one of W.
        let back = unmerge(&merged, &a, &b, s).unwrap().to_vec_f32().unwrap();
        let wf: Vec<f64> = wh.iter().map(|&x| x as f64).collect();
        let atol_back: Vec<f64> =
            atol.iter().zip(&want).map(|(t, m)| 2.0 * t + 2.0 * dtype.unit_roundoff() * m.abs()).collect();
        assert_close(&format!("{device} {dtype} unmerge"), &back, &wf, &atol_back, dtype, 1.0);
    }
}

fn a_merged_weight_gives_the_unfused_lora_output(device: &Device) {
    // x·(W + s·B·A)ᵀ = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, in f32.
    let x = Tensor::randn(&[5, 48], 0.0, 1.0, 4, DType::F32, device).unwrap();
    let w = Tensor::randn(&[24, 48], 0.0, 1.0, 5, DType::F32, device).unwrap();
    let a = Tensor::randn(&[4, 48], 0.0, 1.0, 6, DType::F32, device).unwrap();
    let b = Tensor::randn(&[24, 4], 0.0, 1.0, 7, DType::F32, device).unwrap();
    let s = 0.5;
    let fused = matmul_with(&x, &merge(&w, &a, &b, s).unwrap(), MatmulOptions::nt()).unwrap().to_vec::<f32>().unwrap();
    let base = matmul_with(&x, &w, MatmulOptions::nt()).unwrap().to_vec::<f32>().unwrap();
    let xa = matmul_with(&x, &a, MatmulOptions::nt()).unwrap();
    let delta = matmul_with(&xa, &b, MatmulOptions::nt()).unwrap().to_vec::<f32>().unwrap();
    for (i, (f, (bv, d))) in fused.iter().zip(base.iter().zip(&delta)).enumerate() {
        let want = bv + s * d;
        assert!((f - want).abs() <= 1e-4 * (1.0 + want.abs()), "{device} [{i}]: {f} vs {want}");
    }
}

fn adapter(device: &Device) -> LoraAdapter {
    let mut config = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    config.alpha_pattern.insert("v_proj".into(), 32.0);
    let mut layers = BTreeMap::new();
    for (i, module) in ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"].iter().enumerate() {
        layers.insert(
            module.to_string(),
            LoraLayer {
                a: Tensor::randn(&[8, 32], 0.0, 0.1, i as u64, DType::BF16, device).unwrap(),
                b: Tensor::randn(&[16, 8], 0.0, 0.1, 10 + i as u64, DType::BF16, device).unwrap(),
            },
        );
    }
    LoraAdapter { config, layers }
}

fn peft_files_round_trip_bit_for_bit(device: &Device) {
    let original = adapter(device);
    let dir = temp_dir(&format!("round-{device}"));
    original.save_peft(&dir).unwrap();
    let loaded = LoraAdapter::load_peft(&dir, device).unwrap();
    let fields = |c: &LoraConfig| {
        (
            c.r,
            c.lora_alpha,
            c.target_modules.clone(),
            c.use_rslora,
            c.lora_dropout,
            c.rank_pattern.clone(),
            c.alpha_pattern.clone(),
        )
    };
    assert_eq!(fields(&loaded.config), fields(&original.config));
    assert_eq!(loaded.layers.keys().collect::<Vec<_>>(), original.layers.keys().collect::<Vec<_>>());
    for (k, l) in &original.layers {
        assert_eq!(loaded.layers[k].a.to_bytes().unwrap(), l.a.to_bytes().unwrap(), "{device} {k}");
        assert_eq!(loaded.layers[k].b.to_bytes().unwrap(), l.b.to_bytes().unwrap(), "{device} {k}");
        assert_eq!(loaded.layers[k].a.device(), *device);
    }
    assert_eq!(loaded.scale("model.layers.0.self_attn.q_proj"), 2.0);
    assert_eq!(loaded.scale("model.layers.0.self_attn.v_proj"), 4.0, "alpha_pattern applies");
    std::fs::remove_dir_all(&dir).ok();
}

/// Each backend's test writes its own copy of the files (the tests run in parallel); the
/// CPU's also saves them back.
fn an_adapter_written_by_peft_loads(device: &Device) {
    // The config and tensor names as PEFT writes them, built here by hand.
    let dir = temp_dir(&format!("peft-{device}"));
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
            "lora_alpha": 32, "lora_dropout": 0.05, "modules_to_save": null, "peft_type": "LORA", "r": 4,
            "rank_pattern": {}, "revision": null, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
            "use_dora": false, "use_rslora": true}"#,
    )
    .unwrap();
    let a: Vec<f32> = (0..4 * 6).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..5 * 4).map(|i| -(i as f32)).collect();
    let a_bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    let b_bytes: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 6], &a_bytes).unwrap(),
        ),
        (
            "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![5, 4], &b_bytes).unwrap(),
        ),
    ];
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let loaded = LoraAdapter::load_peft(&dir, device).unwrap();
    let layer = &loaded.layers["model.layers.3.self_attn.q_proj"];
    assert_eq!(layer.a.to_vec::<f32>().unwrap(), a);
    assert_eq!(layer.b.to_vec::<f32>().unwrap(), b);
    assert_eq!(loaded.scale("model.layers.3.self_attn.q_proj"), 16.0, "rsLoRA: 32 / √4");
    assert!(loaded.check_fits("model.layers.3.self_attn.q_proj", [5, 6]).is_ok());
    match loaded.check_fits("model.layers.3.self_attn.q_proj", [5, 7]) {
        Err(Error::Shape(m)) => assert!(m.contains("lora_A") && m.contains("[5, 7]"), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    if device.is_cpu() {
        // Save keeps the fields kiln does not read.
        let loaded = LoraAdapter::load_peft(&dir, &Device::Cpu).unwrap();
        let out = temp_dir("peft-out");
        loaded.save_peft(&out).unwrap();
        let text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
        assert!(text.contains("meta-llama/Llama-3.2-1B") && text.contains("use_dora"), "{text}");
        // Numbers come back as PEFT wrote them: an integer alpha stays an integer, 0.05 stays 0.05.
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(config["lora_alpha"], serde_json::json!(32), "{text}");
        assert_eq!(config["lora_dropout"], serde_json::json!(0.05), "{text}");
        assert_eq!(config["r"], serde_json::json!(4), "{text}");
        // A second save of what the first wrote is byte for byte the same.
        let again = LoraAdapter::load_peft(&out, &Device::Cpu).unwrap();
        let out2 = temp_dir("peft-out2");
        again.save_peft(&out2).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(out2.join(file)).unwrap(), "{file}");
        }
        std::fs::remove_dir_all(&out2).ok();
        std::fs::remove_dir_all(&out).ok();
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// On the CPU: malformed files, and merge's shape and dtype checks; elsewhere: merge with
/// operands on two devices.
fn malformed_or_mismatching_adapters_are_errors(device: &Device) {
    let w = Tensor::zeros(&[4, 6], DType::F32, &Device::Cpu).unwrap();
    let a = Tensor::zeros(&[2, 6], DType::F32, &Device::Cpu).unwrap();
    if device.is_cpu() {
        let dir = temp_dir("bad");
        let good = adapter(&Device::Cpu);
        good.save_peft(&dir).unwrap();
        let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{ not json").unwrap();
        assert!(matches!(LoraAdapter::load_peft(&dir, &Device::Cpu), Err(Error::Io(_))));
        std::fs::write(dir.join("adapter_config.json"), config.replace("\"r\": 8", "\"r\": 4")).unwrap();
        match LoraAdapter::load_peft(&dir, &Device::Cpu) {
            Err(Error::Shape(m)) => assert!(m.contains("lora_A") && m.contains("rank 4"), "{m}"),
            other => panic!("expected a rank error, got {other:?}"),
        }
        std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
        let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), &weights[..weights.len() - 10]).unwrap();
        assert!(matches!(LoraAdapter::load_peft(&dir, &Device::Cpu), Err(Error::Io(_))), "truncated weights");
        std::fs::remove_dir_all(&dir).ok();
        // merge checks shapes, dtypes and devices.
        let b = Tensor::zeros(&[4, 3], DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(merge(&w, &a, &b, 1.0), Err(Error::Shape(_))));
        let b16 = Tensor::zeros(&[4, 2], DType::BF16, &Device::Cpu).unwrap();
        assert!(matches!(merge(&w, &a, &b16, 1.0), Err(Error::DType(_))));
    } else {
        let b = Tensor::zeros(&[4, 2], DType::F32, device).unwrap();
        assert!(matches!(merge(&w, &a, &b, 1.0), Err(Error::DeviceMismatch(_))));
    }
}

/// Config values of the wrong type or out of range, and two tensors for one module half,
/// are refused by name, never defaulted, truncated or picked at random.
#[test]
fn hostile_configs_are_refused() {
    let dir = temp_dir("hostile");
    let good = adapter(&Device::Cpu);
    good.save_peft(&dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    for (key, value) in [
        ("r", "0"),
        ("r", "-1"),
        ("r", "2.5"),
        ("r", "\"8\""),
        ("lora_alpha", "1e39"),
        ("lora_alpha", "\"16\""),
        ("lora_alpha", "null"),
        ("use_rslora", "\"yes\""),
        ("use_rslora", "1"),
        ("lora_dropout", "\"0.1\""),
        ("lora_dropout", "-0.1"),
        ("lora_dropout", "1"),
        ("peft_type", "\"LOHA\""),
        ("peft_type", "3"),
        ("target_modules", "3"),
        ("target_modules", "[1]"),
        ("rank_pattern", "{\"q_proj\": 0}"),
        ("rank_pattern", "{\"q_proj\": -3}"),
        ("rank_pattern", "{\"q_proj\": 1.9}"),
        ("rank_pattern", "{\"q_proj\": \"8\"}"),
        ("rank_pattern", "[8]"),
        ("alpha_pattern", "{\"q_proj\": 1e39}"),
        ("alpha_pattern", "{\"q_proj\": null}"),
    ] {
        let mut c = config.clone();
        c[key] = serde_json::Value::String("@@".into());
        let text = serde_json::to_string(&c).unwrap().replace("\"@@\"", value);
        std::fs::write(dir.join("adapter_config.json"), &text).unwrap();
        match LoraAdapter::load_peft(&dir, &Device::Cpu) {
            Err(e) => assert!(e.to_string().contains(key), "{key}: {value}: the error does not name it: {e}"),
            Ok(_) => panic!("{key}: {value} loaded"),
        }
    }
    // Two tensors for one half of a module: one under PEFT's prefix, one without.
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let file = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        file.tensors().into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    let (name, view) = views.iter().find(|(n, _)| n.ends_with("q_proj.lora_A.weight")).unwrap().clone();
    views.push((name.strip_prefix("base_model.model.").unwrap().to_string(), view));
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    match LoraAdapter::load_peft(&dir, &Device::Cpu) {
        Err(e) => assert!(e.to_string().contains("both hold"), "{e}"),
        Ok(_) => panic!("two tensors for one half loaded"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// save_peft refuses what load_peft would refuse, and a refused save leaves the adapter that
/// was there as it was.
#[test]
fn a_refused_save_writes_nothing() {
    let dir = temp_dir("refused");
    let good = adapter(&Device::Cpu);
    good.save_peft(&dir).unwrap();
    let before = [
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    ];
    let module = "model.layers.0.self_attn.q_proj";
    type Breakage = Box<dyn Fn(&mut LoraAdapter)>;
    let broken: Vec<(&str, Breakage)> = vec![
        ("alpha NaN", Box::new(|a| a.config.lora_alpha = f32::NAN)),
        ("alpha infinite", Box::new(|a| a.config.lora_alpha = f32::INFINITY)),
        ("r = 0", Box::new(|a| a.config.r = 0)),
        ("dropout 1", Box::new(|a| a.config.lora_dropout = 1.0)),
        ("a rank-pattern rank of 0", Box::new(|a| _ = a.config.rank_pattern.insert("q_proj".into(), 0))),
        ("shapes that disagree with r", Box::new(|a| a.config.r = 4)),
        ("no layers", Box::new(|a| a.layers.clear())),
        (
            "a rank-1 lora_A",
            Box::new(move |a| {
                a.layers.get_mut(module).unwrap().a = Tensor::zeros(&[32], DType::BF16, &Device::Cpu).unwrap()
            }),
        ),
        (
            "lora_B whose rank is not lora_A's",
            Box::new(move |a| {
                a.layers.get_mut(module).unwrap().b = Tensor::zeros(&[16, 7], DType::BF16, &Device::Cpu).unwrap()
            }),
        ),
    ];
    for (what, break_it) in broken {
        let mut bad = good.clone();
        break_it(&mut bad);
        assert!(bad.save_peft(&dir).is_err(), "{what}: saved");
        assert!(bad.validate().is_err(), "{what}: valid");
        let after = [
            std::fs::read(dir.join("adapter_config.json")).unwrap(),
            std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        ];
        assert!(after == before, "{what}: the saved adapter changed");
    }
    // check_fits on a user-built rank-1 lora_A is an Err, not an index past the shape.
    let mut bad = good.clone();
    bad.layers.get_mut(module).unwrap().a = Tensor::zeros(&[32], DType::BF16, &Device::Cpu).unwrap();
    assert!(bad.check_fits(module, [16, 32]).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

mod layer {
    use super::*;
    use kiln::ops::lora::{BaseWeight, LoraLinear, lora_backward, lora_forward};
    use kiln::ops::{QTensor, QuantFormat};
    use proptest::prelude::*;

    struct Layer {
        x: Vec<f64>,
        w: Vec<f64>,
        a: Vec<f64>,
        b: Vec<f64>,
        bias: Vec<f64>,
        /// The dropout mask already scaled: 0 or 1 / (1 − p) per element of x.
        mask: Vec<f64>,
        tokens: usize,
        inp: usize,
        out: usize,
        r: usize,
        s: f64,
    }

    impl Layer {
        /// y = x·Wᵀ + bias + s·((x ⊙ mask)·Aᵀ)·Bᵀ in f64.
        fn forward(&self, x: &[f64], a: &[f64], b: &[f64]) -> Vec<f64> {
            let (t, i, o, r) = (self.tokens, self.inp, self.out, self.r);
            let mut y = vec![0f64; t * o];
            for tt in 0..t {
                let xa: Vec<f64> = (0..r)
                    .map(|k| (0..i).map(|ii| x[tt * i + ii] * self.mask[tt * i + ii] * a[k * i + ii]).sum())
                    .collect();
                for oo in 0..o {
                    let base: f64 = (0..i).map(|ii| x[tt * i + ii] * self.w[oo * i + ii]).sum();
                    let delta: f64 = (0..r).map(|k| xa[k] * b[oo * r + k]).sum();
                    y[tt * o + oo] = base + self.bias[oo] + self.s * delta;
                }
            }
            y
        }
    }

    fn forward_matches_f64_and_backward_matches_finite_differences(device: &Device) {
        let (tokens, inp, out, r, s) = (3, 64, 5, 4, 1.5f32);
        for quantized in [false, true] {
            let xt = Tensor::randn(&[tokens, inp], 0.0, 1.0, 1, DType::F32, device).unwrap();
            let wt = Tensor::randn(&[out, inp], 0.0, 0.5, 2, DType::F32, device).unwrap();
            let at = Tensor::randn(&[r, inp], 0.0, 0.3, 3, DType::F32, device).unwrap();
            let bt = Tensor::randn(&[out, r], 0.0, 0.3, 4, DType::F32, device).unwrap();
            let q = QTensor::quantize(&wt, QuantFormat::Q8_0).unwrap();
            let base = if quantized { BaseWeight::Quantized(&q) } else { BaseWeight::Dense(&wt) };
            let dense_w = if quantized { q.dequantize(DType::F32).unwrap() } else { wt.clone() };
            let host = |t: &Tensor| t.to_vec::<f32>().unwrap().into_iter().map(|v| v as f64).collect::<Vec<f64>>();
            let bias = Tensor::randn(&[out], 0.0, 1.0, 9, DType::F32, device).unwrap();
            let dropout = Some((0.25f32, 77u64));
            let ones = Tensor::full(&[tokens, inp], 1.0, DType::F32, device).unwrap();
            let mask = kiln::ops::dropout(&ones, 0.25, 77).unwrap();
            let linear = LoraLinear { base, bias: Some(&bias), a: &at, b: &bt, scale: s, dropout };
            let layer = Layer {
                x: host(&xt),
                w: host(&dense_w),
                a: host(&at),
                b: host(&bt),
                bias: host(&bias),
                mask: host(&mask),
                tokens,
                inp,
                out,
                r,
                s: s as f64,
            };
            let fwd = lora_forward(&xt, &linear).unwrap();
            let want = layer.forward(&layer.x, &layer.a, &layer.b);
            for (i, (g, w)) in fwd.y.to_vec::<f32>().unwrap().iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{device} q={quantized} y[{i}]: {g} vs {w}");
            }
            // L = Σ y ⊙ R, so dL/dy = R.
            let rt = Tensor::randn(&[tokens, out], 0.0, 1.0, 5, DType::F32, device).unwrap();
            let rr = host(&rt);
            let grads = lora_backward(&rt, &xt, &fwd.xa, &linear).unwrap();
            let loss = |x: &[f64], a: &[f64], b: &[f64]| -> f64 {
                layer.forward(x, a, b).iter().zip(&rr).map(|(y, r)| y * r).sum()
            };
            let h = 1e-6;
            let check = |name: &str, got: &Tensor, which: usize| {
                let got = got.to_vec::<f32>().unwrap();
                let params = [&layer.x, &layer.a, &layer.b];
                for (i, g) in got.iter().enumerate() {
                    let mut up: Vec<Vec<f64>> = params.iter().map(|p| p.to_vec()).collect();
                    let mut down = up.clone();
                    up[which][i] += h;
                    down[which][i] -= h;
                    let fd = (loss(&up[0], &up[1], &up[2]) - loss(&down[0], &down[1], &down[2])) / (2.0 * h);
                    assert!(
                        (*g as f64 - fd).abs() <= 1e-3 * (1.0 + fd.abs()),
                        "{device} q={quantized} {name}[{i}]: {g} vs {fd}"
                    );
                }
            };
            check("dx", &grads.dx, 0);
            check("dA", &grads.da, 1);
            check("dB", &grads.db, 2);
        }
    }

    /// One fused-forward case: the kernel paths differ by rank (x·Aᵀ in the GEMM's k-loop up
    /// to FUSED_XA_MAX_RANK, computed first beyond it or with dropout), by W (dense, or
    /// quantized: GEMV up to 8 tokens, GEMM beyond) and by dtype.
    #[derive(Debug, Clone)]
    struct FusedCase {
        tokens: usize,
        out: usize,
        blocks: usize,
        r: usize,
        dtype: DType,
        format: Option<QuantFormat>,
        bias: bool,
        dropout: bool,
        seed: u64,
    }

    fn fused_cases() -> impl Strategy<Value = FusedCase> {
        let formats = vec![
            None,
            Some(QuantFormat::Q8_0),
            Some(QuantFormat::Q4_0),
            Some(QuantFormat::Q4_1),
            Some(QuantFormat::Nf4),
        ];
        (
            prop::sample::select(vec![1usize, 3, 8, 9, 70]),
            prop::sample::select(vec![1usize, 37, 130]),
            prop::sample::select(vec![1usize, 3, 5]),
            prop::sample::select(vec![1usize, 5, 16, 17, 32, 33, 64]),
            prop::sample::select(DType::ALL.to_vec()),
            prop::sample::select(formats),
            any::<bool>(),
            prop::bool::weighted(0.25),
            any::<u64>(),
        )
            .prop_map(|(tokens, out, blocks, r, dtype, format, bias, dropout, seed)| FusedCase {
                tokens,
                out,
                blocks,
                r,
                dtype,
                format,
                bias,
                dropout,
                seed,
            })
    }

    /// The fused forward on the CPU against the unfused composition in f64
    /// (`x·Wᵀ + bias + s·(drop(x)·A'ᵀ)·Bᵀ`, A' = A rounded to x's dtype as the layer uses it),
    /// and xa against `drop(x)·A'ᵀ`; on any other device, y and xa against the CPU's.
    fn check_fused(device: &Device, c: &FusedCase) {
        let inp = 64 * c.blocks;
        let s = 0.75f32;
        let cpu = Device::Cpu;
        let x = Tensor::randn(&[c.tokens, inp], 0.0, 1.0, c.seed, c.dtype, &cpu).unwrap();
        let w32 = Tensor::randn(&[c.out, inp], 0.0, 0.1, c.seed ^ 1, DType::F32, &cpu).unwrap();
        let a = Tensor::randn(&[c.r, inp], 0.0, 0.1, c.seed ^ 2, DType::F32, &cpu).unwrap();
        let b = Tensor::randn(&[c.out, c.r], 0.0, 0.1, c.seed ^ 3, DType::F32, &cpu).unwrap();
        let bias = Tensor::randn(&[c.out], 0.0, 1.0, c.seed ^ 4, DType::F32, &cpu).unwrap();
        let q = c.format.map(|f| QTensor::quantize(&w32, f).unwrap());
        let w = match &q {
            Some(q) => q.dequantize(DType::F32).unwrap(),
            None => w32.to_dtype(c.dtype).unwrap(),
        };
        let dropout = c.dropout.then_some((0.3f32, c.seed ^ 5));
        let f64s = |t: &Tensor| t.to_vec_f32().unwrap().into_iter().map(|v| v as f64).collect::<Vec<f64>>();
        // The LoRA branch's input: drop(x) in x's dtype (the dropout op has its own tests).
        let x_lora = match dropout {
            Some((p, seed)) => f64s(&kiln::ops::dropout(&x, p, seed).unwrap()),
            None => f64s(&x),
        };
        let (xv, wv, av, bv, biasv) = (f64s(&x), f64s(&w), f64s(&a.to_dtype(c.dtype).unwrap()), f64s(&b), f64s(&bias));
        let (t_n, o_n, r_n, s64) = (c.tokens, c.out, c.r, s as f64);
        let (mut xa_want, mut xa_mass) = (vec![0f64; t_n * r_n], vec![0f64; t_n * r_n]);
        for t in 0..t_n {
            for j in 0..r_n {
                for i in 0..inp {
                    let v = x_lora[t * inp + i] * av[j * inp + i];
                    xa_want[t * r_n + j] += v;
                    xa_mass[t * r_n + j] += v.abs();
                }
            }
        }
        let (mut y_want, mut y_mass, mut base_mass) =
            (vec![0f64; t_n * o_n], vec![0f64; t_n * o_n], vec![0f64; t_n * o_n]);
        for t in 0..t_n {
            for o in 0..o_n {
                let e = t * o_n + o;
                for i in 0..inp {
                    let v = xv[t * inp + i] * wv[o * inp + i];
                    y_want[e] += v;
                    base_mass[e] += v.abs();
                }
                y_mass[e] = base_mass[e];
                if c.bias {
                    y_want[e] += biasv[o];
                    y_mass[e] += biasv[o].abs();
                }
                for j in 0..r_n {
                    y_want[e] += s64 * xa_want[t * r_n + j] * bv[o * r_n + j];
                    y_mass[e] += s64 * xa_mass[t * r_n + j] * bv[o * r_n + j].abs();
                }
            }
        }
        // Every term passes through at most inp + r + 2 f32 additions (and xa's rounding).
        let depth = (inp + r_n + 2) as f64;
        let y_atol: Vec<f64> = y_mass.iter().map(|m| 2.0 * depth * U32 * m).collect();
        let xa_atol: Vec<f64> = xa_mass.iter().map(|m| 2.0 * inp as f64 * U32 * m).collect();
        let run = |device: &Device| {
            let (x, a, b, bias) = (
                x.to_device(device).unwrap(),
                a.to_device(device).unwrap(),
                b.to_device(device).unwrap(),
                bias.to_device(device).unwrap(),
            );
            let (w, q) = (w.to_device(device).unwrap(), q.as_ref().map(|q| q.to_device(device).unwrap()));
            let base = match &q {
                Some(q) => BaseWeight::Quantized(q),
                None => BaseWeight::Dense(&w),
            };
            let layer = LoraLinear { base, bias: c.bias.then_some(&bias), a: &a, b: &b, scale: s, dropout };
            let fwd = lora_forward(&x, &layer).unwrap();
            assert_eq!((fwd.y.shape(), fwd.y.dtype()), (&[t_n, o_n][..], c.dtype));
            assert_eq!((fwd.xa.shape(), fwd.xa.dtype()), (&[t_n, r_n][..], DType::F32));
            (fwd.y.to_vec_f32().unwrap(), fwd.xa.to_vec::<f32>().unwrap())
        };
        let (y_cpu, xa_cpu) = run(&cpu);
        if device.is_cpu() {
            assert_close(&format!("cpu y {c:?}"), &y_cpu, &y_want, &y_atol, c.dtype, 1.0);
            assert_close(&format!("cpu xa {c:?}"), &xa_cpu, &xa_want, &xa_atol, DType::F32, 1.0);
            return;
        }
        let y_ref: Vec<f64> = y_cpu.iter().map(|&v| v as f64).collect();
        let xa_ref: Vec<f64> = xa_cpu.iter().map(|&v| v as f64).collect();
        // CUDA's tensor-core GEMM rounds each decoded weight to x's half type.
        let weight_rounding = match device {
            Device::Cuda(_) if c.dtype != DType::F32 && c.format.is_some() => c.dtype.unit_roundoff(),
            _ => 0.0,
        };
        let y_atol2: Vec<f64> = y_atol.iter().zip(&base_mass).map(|(a, m)| 2.0 * a + weight_rounding * m).collect();
        let xa_atol2: Vec<f64> = xa_atol.iter().map(|a| 2.0 * a).collect();
        let (y, xa) = run(device);
        assert_close(&format!("{device} y {c:?}"), &y, &y_ref, &y_atol2, c.dtype, BACKEND_ROUNDINGS);
        assert_close(&format!("{device} xa {c:?}"), &xa, &xa_ref, &xa_atol2, DType::F32, BACKEND_ROUNDINGS);
    }

    fn fused_forward_matches_the_unfused_composition(device: &Device) {
        proptest!(common::cases(24), |(case in fused_cases())| {
            check_fused(device, &case);
        });
    }

    fn every_fused_path_is_covered(device: &Device) {
        // xa in the k-loop (ranks 1, 16 and 32, the edges of its tile), computed first
        // (rank 33, dropout), over dense and quantized W, through the GEMV and the GEMM.
        for (r, dropout) in [(1, false), (16, false), (32, false), (33, false), (8, true)] {
            for format in [None, Some(QuantFormat::Q4_0)] {
                for tokens in [2, 70] {
                    for dtype in [DType::F32, DType::BF16] {
                        let case =
                            FusedCase { tokens, out: 67, blocks: 2, r, dtype, format, bias: true, dropout, seed: 3 };
                        check_fused(device, &case);
                    }
                }
            }
        }
    }

    #[test]
    fn layer_shapes_are_checked() {
        let x = Tensor::zeros(&[2, 8], DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros(&[3, 8], DType::F32, &Device::Cpu).unwrap();
        let a = Tensor::zeros(&[2, 8], DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(&[3, 4], DType::F32, &Device::Cpu).unwrap();
        let linear = LoraLinear { base: BaseWeight::Dense(&w), bias: None, a: &a, b: &b, scale: 1.0, dropout: None };
        match lora_forward(&x, &linear) {
            Err(Error::Shape(m)) => assert!(m.contains("[3, 4]") && m.contains("[2, 8]"), "{m}"),
            other => panic!("expected a shape error, got {other:?}"),
        }
    }

    device_tests!(
        forward_matches_f64_and_backward_matches_finite_differences,
        fused_forward_matches_the_unfused_composition,
        every_fused_path_is_covered,
    );
}

fn a_mixed_adapter_batch_equals_each_row_with_its_own_adapter(device: &Device) {
    use kiln::ops::lora::{AdapterSet, lora_batched};
    let (inp, out) = (40, 37);
    let ranks = [4usize, 8, 16];
    let rows = [0i32, -1, 2, 1, 2, 0, -1];
    let tokens = rows.len();
    let adapters: Vec<(Tensor, Tensor, f32)> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            (
                Tensor::randn(&[r, inp], 0.0, 0.3, 20 + i as u64, DType::BF16, device).unwrap(),
                Tensor::randn(&[out, r], 0.0, 0.3, 30 + i as u64, DType::BF16, device).unwrap(),
                0.5 + i as f32,
            )
        })
        .collect();
    let refs: Vec<(&Tensor, &Tensor, f32)> = adapters.iter().map(|(a, b, s)| (a, b, *s)).collect();
    let set = AdapterSet::new(&refs).unwrap();
    let x = Tensor::randn(&[tokens, inp], 0.0, 1.0, 40, DType::F32, device).unwrap();
    let y = Tensor::randn(&[tokens, out], 0.0, 1.0, 41, DType::F32, device).unwrap();
    let got = lora_batched(&x, &y, &set, &rows).unwrap().to_vec::<f32>().unwrap();
    let (xh, yh) = (x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
    for (t, &a) in rows.iter().enumerate() {
        for o in 0..out {
            let (mut want, mut mass) = (yh[t * out + o] as f64, yh[t * out + o].abs() as f64);
            if a >= 0 {
                let (ah, bh, s) = (&adapters[a as usize].0, &adapters[a as usize].1, adapters[a as usize].2);
                let (ah, bh) = (ah.to_vec_f32().unwrap(), bh.to_vec_f32().unwrap());
                let r = ranks[a as usize];
                for j in 0..r {
                    let v: f64 = (0..inp).map(|i| xh[t * inp + i] as f64 * ah[j * inp + i] as f64).sum();
                    let vm: f64 = (0..inp).map(|i| (xh[t * inp + i] as f64 * ah[j * inp + i] as f64).abs()).sum();
                    want += s as f64 * v * bh[o * r + j] as f64;
                    mass += s as f64 * vm * (bh[o * r + j] as f64).abs();
                }
            }
            let g = got[t * out + o] as f64;
            // f32 sums of in + r terms.
            let tol = 2.0 * (inp + 16) as f64 * U32 * mass;
            assert!((g - want).abs() <= tol, "{device} row {t} (adapter {a}) [{o}]: {g} vs {want}");
        }
    }
    assert!(matches!(lora_batched(&x, &y, &set, &[0, 1, 3, 0, 0, 0, 0]), Err(Error::InvalidArgument(_))));
    assert!(matches!(lora_batched(&x, &y, &set, &[-2, 1, 0, 0, 0, 0, 0]), Err(Error::InvalidArgument(_))));
    assert!(matches!(lora_batched(&x, &y, &set, &[0, 1]), Err(Error::Shape(_))));
}

device_tests!(
    merge_adds_the_scaled_delta_and_unmerge_takes_it_out,
    a_merged_weight_gives_the_unfused_lora_output,
    peft_files_round_trip_bit_for_bit,
    an_adapter_written_by_peft_loads,
    malformed_or_mismatching_adapters_are_errors,
    a_mixed_adapter_batch_equals_each_row_with_its_own_adapter,
);
