//! The CPU backend's f32 matmul against numpy (OpenBLAS) on the same machine, in one run.
//!
//! `cargo run --release --example peer_cpu [size]` (default 1024). Needs python3 with numpy.
//! Both sides report their best of the same number of timed runs after a warm-up: on a
//! shared machine the fastest run is the one least disturbed by other work.

use kiln::ops::matmul;
use kiln::{DType, Device, Tensor};
use std::process::Command;
use std::time::Instant;

const RUNS: usize = 25;

fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn main() -> kiln::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let flops = 2.0 * (n as f64).powi(3);
    let a = Tensor::randn(&[n, n], 0.0, 1.0, 1, DType::F32, &Device::Cpu)?;
    let b = Tensor::randn(&[n, n], 0.0, 1.0, 2, DType::F32, &Device::Cpu)?;
    matmul(&a, &b)?;
    let times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let c = matmul(&a, &b);
            let dt = t.elapsed().as_secs_f64();
            drop(c);
            dt
        })
        .collect();
    let ours = flops / best(times) / 1e9;
    println!("kiln cpu f32 matmul {n}^3: {ours:.1} GFLOP/s ({} threads)", rayon::current_num_threads());

    let script = format!(
        "import numpy as np, time\n\
         a = np.random.rand({n}, {n}).astype(np.float32); b = np.random.rand({n}, {n}).astype(np.float32)\n\
         a @ b\n\
         ts = []\n\
         for _ in range({RUNS}):\n    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n\
         print(min(ts))\n"
    );
    match Command::new("python3").arg("-c").arg(&script).output() {
        Ok(out) if out.status.success() => {
            let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
            let peer = flops / secs / 1e9;
            println!("numpy (OpenBLAS) f32 matmul {n}^3: {peer:.1} GFLOP/s");
            println!("ratio kiln / numpy: {:.2}", ours / peer);
        }
        Ok(out) => println!("numpy run failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => println!("python3 not runnable ({e}); no peer measured"),
    }
    Ok(())
}
