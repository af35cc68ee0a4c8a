//! The main job for now: on every device, multiply real-sized matrices, check the result
//! against the CPU, and print the throughput. `cargo run --release --example quickstart`

use kiln::ops::{MatmulOptions, matmul_with};
use kiln::{DType, Device, DeviceKind, Tensor};
use std::time::Instant;

fn main() -> kiln::Result<()> {
    let best = Device::best();
    println!("best device: {best} ({})", best.info()?.name);
    for device in Device::all() {
        let info = device.info()?;
        let (n, dtypes): (usize, &[DType]) = match info.kind {
            DeviceKind::Cpu => (1024, &[DType::F32]),
            DeviceKind::SoftwareAdapter => (256, &[DType::F32, DType::F16]),
            _ => (4096, &[DType::F32, DType::BF16]),
        };
        for &dtype in dtypes {
            let a = Tensor::randn(&[n, n], 0.0, 1.0, 1, dtype, &device)?;
            let b = Tensor::randn(&[n, n], 0.0, 1.0, 2, dtype, &device)?;
            let options = MatmulOptions::nt().out_dtype(DType::F32);
            let out = matmul_with(&a, &b, options)?; // warm-up: compiles kernels, fills the pool
            device.synchronize()?;
            let runs = 5;
            let start = Instant::now();
            for _ in 0..runs {
                matmul_with(&a, &b, options)?;
            }
            device.synchronize()?;
            let secs = start.elapsed().as_secs_f64() / runs as f64;
            let gflops = 2.0 * (n as f64).powi(3) / secs / 1e9;

            let reference = if device.is_cpu() {
                out.clone()
            } else {
                matmul_with(&a.to_device(&Device::Cpu)?, &b.to_device(&Device::Cpu)?, options)?
            };
            let (got, want) = (out.to_vec::<f32>()?, reference.to_vec::<f32>()?);
            // Entries are sums of n products of unit normals: scale the check by √n.
            let tol = 2.0 * n as f32 * f32::EPSILON * (n as f32).sqrt() * 4.0;
            let max_err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let verdict = if max_err <= tol { "matches the CPU" } else { "DIFFERS from the CPU" };
            println!(
                "{device} {:<40} {dtype:>4} {n}x{n}x{n}: {gflops:8.1} GFLOP/s, max |diff| {max_err:.2e} ({verdict})",
                info.name
            );
            if max_err > tol {
                return Err(kiln::Error::InvalidArgument(format!("{device} result differs from the CPU by {max_err}")));
            }
        }
    }
    Ok(())
}
