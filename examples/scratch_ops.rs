use kiln::ops::attention::*;
use kiln::ops::lora::*;
use kiln::ops::loss::*;
use kiln::ops::*;
use kiln::{DType, Device, Tensor};
use std::time::Instant;
fn t<R>(name: &str, flops: f64, mut f: impl FnMut() -> R) {
    f();
    let n = 3;
    let s = Instant::now();
    for _ in 0..n {
        std::hint::black_box(f());
    }
    let secs = s.elapsed().as_secs_f64() / n as f64;
    println!("{name:40} {:8.2} ms {:7.1} GFLOP/s", secs * 1e3, flops / secs / 1e9);
}
fn main() -> kiln::Result<()> {
    let dev = Device::Cpu;
    rayon::scope(|_| -> kiln::Result<()> {
        let n = 1024;
        for (out, inp) in [(576usize, 576usize), (1536, 576), (576, 1536), (192, 576)] {
            let x = Tensor::randn(&[n, inp], 0.0, 1.0, 1, DType::F32, &dev)?;
            let w = Tensor::randn(&[out, inp], 0.0, 0.02, 2, DType::F32, &dev)?;
            let q = QTensor::quantize(&w, QuantFormat::Q4_1)?;
            let dy = Tensor::randn(&[n, out], 0.0, 1.0, 3, DType::F32, &dev)?;
            let f = 2.0 * (n * out * inp) as f64;
            t(&format!("dense fwd {out}x{inp}"), f, || matmul_with(&x, &w, MatmulOptions::nt()).unwrap());
            t(&format!("q4_1 fwd {out}x{inp}"), f, || qmatmul(&x, &q).unwrap());
            t(&format!("q4_1 input grad {out}x{inp}"), f, || qmatmul_input_grad(&dy, &q).unwrap());
            t(&format!("dense input grad {out}x{inp}"), f, || matmul(&dy, &w).unwrap());
            let a = Tensor::randn(&[16, inp], 0.0, 0.02, 4, DType::F32, &dev)?;
            let b = Tensor::randn(&[out, 16], 0.0, 0.02, 5, DType::F32, &dev)?;
            let layer =
                LoraLinear { base: BaseWeight::Quantized(&q), bias: None, a: &a, b: &b, scale: 2.0, dropout: None };
            t(&format!("lora fwd q4_1 {out}x{inp}"), f, || lora_forward(&x, &layer).unwrap());
            let fo = lora_forward(&x, &layer)?;
            t(&format!("lora bwd q4_1 {out}x{inp}"), f, || lora_backward(&dy, &x, &fo.xa, &layer).unwrap());
        }
        let (b, s, h, kvh, d) = (4, 256, 9, 3, 64);
        let q = Tensor::randn(&[b, s, h, d], 0.0, 1.0, 1, DType::F32, &dev)?;
        let k = Tensor::randn(&[b, s, kvh, d], 0.0, 1.0, 2, DType::F32, &dev)?;
        let v = Tensor::randn(&[b, s, kvh, d], 0.0, 1.0, 3, DType::F32, &dev)?;
        let opt = AttentionOptions { causal: true, scale: None, seq_lens: Some(vec![s; b]) };
        let af = 2.0 * 2.0 * (b * h * s * s / 2 * d) as f64;
        t("attention fwd", af, || attention(&q, &k, &v, &opt).unwrap());
        let fwd = attention(&q, &k, &v, &opt)?;
        t("attention bwd", 2.5 * af, || attention_backward(&q, &k, &v, &fwd, &q, &opt).unwrap());
        let w = Tensor::randn(&[49152, 576], 0.0, 0.02, 2, DType::F32, &dev)?;
        let qh = QTensor::quantize(&w, QuantFormat::Q4_1)?;
        let hh = Tensor::randn(&[1020, 576], 0.0, 1.0, 1, DType::F32, &dev)?;
        let tg: Vec<i32> = (0..1020).map(|i| (i * 37 % 49152) as i32).collect();
        let tg = Tensor::from_slice(&tg, &[1020], &dev)?;
        let hf = 2.0 * 2.0 * (1020usize * 49152 * 576) as f64;
        t("linear_cross_entropy q4_1 (fwd+dh)", hf, || {
            linear_cross_entropy(&hh, Head::Quantized(&qh), &tg, Default::default()).unwrap()
        });
        let x = Tensor::randn(&[1024, 1536], 0.0, 1.0, 1, DType::F32, &dev)?;
        t("swiglu 1024x1536", 0.0, || swiglu(&x, &x).unwrap());
        let x = Tensor::randn(&[1024, 576], 0.0, 1.0, 1, DType::F32, &dev)?;
        let nw = Tensor::full(&[576], 1.0, DType::F32, &dev)?;
        t("rms_norm 1024x576", 0.0, || rms_norm(&x, &nw, 1e-5).unwrap());
        t("add 1024x576", 0.0, || add(&x, &x).unwrap());
        Ok(())
    })
}
