//! Times the CPU GEMM through a Q4_1 weight beside the dense product it stands for
//! (1024 tokens, f32 activations; the LoRA/QLoRA training shapes of SmolLM2-135M).
use kiln::ops::*;
use kiln::{DType, Device, Tensor};
use std::time::Instant;

/// Best of several runs, in seconds.
fn best<R>(mut f: impl FnMut() -> R) -> f64 {
    f();
    (0..15)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(f());
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> kiln::Result<()> {
    let dev = Device::Cpu;
    let tokens = 1024;
    for (out, inp) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
        let x = Tensor::randn(&[tokens, inp], 0.0, 1.0, 1, DType::F32, &dev)?;
        let w = Tensor::randn(&[out, inp], 0.0, 0.02, 2, DType::F32, &dev)?;
        let q = QTensor::quantize(&w, QuantFormat::Q4_1)?;
        let dy = Tensor::randn(&[tokens, out], 0.0, 1.0, 3, DType::F32, &dev)?;
        let flops = 2.0 * (tokens * out * inp) as f64;
        let cases: [(&str, f64); 4] = [
            ("dense fwd", best(|| matmul_with(&x, &w, MatmulOptions::nt()).unwrap())),
            ("q4_1 fwd", best(|| qmatmul(&x, &q).unwrap())),
            ("dense input grad", best(|| matmul(&dy, &w).unwrap())),
            ("q4_1 input grad", best(|| qmatmul_input_grad(&dy, &q).unwrap())),
        ];
        for (name, secs) in cases {
            println!("W {out}x{inp} {name:18} {:7.2} ms {:6.1} GFLOP/s", secs * 1e3, flops / secs / 1e9);
        }
    }
    Ok(())
}
