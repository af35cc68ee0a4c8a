//! Lists every device kiln can use: names, memory, compute capability, adapter limits and
//! features. `cargo run --example devices`

use kiln::Device;

fn main() {
    for device in Device::all() {
        match device.info() {
            Ok(info) => {
                println!("{device}: {} [{:?}]", info.name, info.kind);
                if let Some(bytes) = info.memory_bytes {
                    println!("    memory: {:.1} GiB", bytes as f64 / (1u64 << 30) as f64);
                }
                if let Some((major, minor)) = info.compute_capability {
                    println!("    compute capability: {major}.{minor}");
                }
                for (key, value) in &info.details {
                    println!("    {key}: {value}");
                }
            }
            Err(e) => println!("{device}: could not be queried: {e}"),
        }
    }
    println!("best: {}", Device::best());
}
