//! Saves that survive kill -9 and concurrent writers. A child process (this test binary,
//! re-run) saves version after version of an adapter folder or an optimizer state to one
//! place and is killed with SIGKILL at a random moment; what is there afterwards must load
//! and be one whole version, no older than the last save the child finished. Then two
//! threads save to one place while a third reads: every save succeeds and every read is a
//! whole version. Temporaries of killed writers are gone after the next save.
//!
//! `KILN_KILLS` kills per saver (30 by default); the long run is
//! `KILN_KILLS=300 cargo test --release --test crash -- --nocapture`.
#![cfg(unix)]

use kiln::model::{LoraAdapter, LoraConfig, LoraLayer};
use kiln::ops::optim::AdamWHyper;
use kiln::train::AdamW;
use kiln::{DType, Device, Tensor};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kills() -> usize {
    std::env::var("KILN_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(30)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Version `v` of the adapter: rank 2, 4 or 8 by version (so a mix of two versions does
/// not even load), alpha = v, every weight = v mod 256 (exact in bf16).
fn adapter_version(v: u32) -> LoraAdapter {
    let cpu = Device::Cpu;
    let r = [2, 4, 8][v as usize % 3];
    let layer = |inp: usize, out: usize| LoraLayer {
        a: Tensor::full(&[r, inp], (v % 256) as f32, DType::F32, &cpu).unwrap(),
        b: Tensor::full(&[out, r], (v % 256) as f32, DType::BF16, &cpu).unwrap(),
    };
    LoraAdapter {
        config: LoraConfig::new(r, v as f32, &["q_proj", "v_proj"]),
        layers: [
            ("model.layers.0.self_attn.q_proj".to_string(), layer(64, 64)),
            ("model.layers.0.self_attn.v_proj".to_string(), layer(64, 32)),
        ]
        .into_iter()
        .collect(),
    }
}

/// The version a loaded adapter is, or why it is not a whole one.
fn adapter_version_of(adapter: &LoraAdapter) -> Result<u32, String> {
    let v = adapter.config.lora_alpha as u32;
    for (module, layer) in &adapter.layers {
        let values = [layer.a.to_vec_f32().unwrap(), layer.b.to_vec_f32().unwrap()].concat();
        if values.iter().any(|&x| x != (v % 256) as f32) {
            return Err(format!("{module}: weights of another version than the config's {v}"));
        }
    }
    if adapter.config.r != [2, 4, 8][v as usize % 3] {
        return Err(format!("rank {} in version {v}", adapter.config.r));
    }
    Ok(v)
}

/// Version `v` of an optimizer state: `v` steps, master weights = v, a length that
/// changes with the version.
fn state_version(v: u32) -> AdamW {
    let cpu = Device::Cpu;
    let len = 256 + 64 * (v as usize % 5);
    let p = Tensor::full(&[len], v as f32, DType::F32, &cpu).unwrap();
    let m = Tensor::full(&[len], 0.5, DType::F32, &cpu).unwrap();
    AdamW::with_moments(&[("w", &p), ("bias", &p)], &[(&m, &m), (&m, &m)], v as u64, AdamWHyper::default()).unwrap()
}

fn state_version_of(opt: &AdamW) -> Result<u32, String> {
    let v = opt.steps() as u32;
    let len = 256 + 64 * (v as usize % 5);
    for p in opt.params() {
        let values = p.master.to_vec_f32().unwrap();
        if values.len() != len || values.iter().any(|&x| x != v as f32) {
            return Err(format!("{}: master of another version than the step count's {v}", p.name));
        }
    }
    Ok(v)
}

#[derive(Clone, Copy, Debug)]
enum Saver {
    Adapter,
    OptimizerState,
}

impl Saver {
    fn save(self, v: u32, path: &Path) -> kiln::Result<()> {
        match self {
            Saver::Adapter => adapter_version(v).save_peft(path),
            Saver::OptimizerState => state_version(v).save(path),
        }
    }
    fn load(self, path: &Path) -> Result<u32, String> {
        match self {
            Saver::Adapter => {
                adapter_version_of(&LoraAdapter::load_peft(path, &Device::Cpu).map_err(|e| e.to_string())?)
            }
            Saver::OptimizerState => state_version_of(&AdamW::load(path, &Device::Cpu).map_err(|e| e.to_string())?),
        }
    }
    fn target(self, dir: &Path) -> PathBuf {
        match self {
            Saver::Adapter => dir.join("adapter"),
            Saver::OptimizerState => dir.join("optimizer.safetensors"),
        }
    }
}

/// Temporaries the crate's savers left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".kiln-tmp."))
        .collect()
}

#[test]
#[ignore = "the child half of the kill tests below; run by them"]
fn saver_child() {
    let saver = match std::env::var("KILN_SAVER").as_deref() {
        Ok("Adapter") => Saver::Adapter,
        Ok("OptimizerState") => Saver::OptimizerState,
        other => panic!("KILN_SAVER is {other:?}"),
    };
    let path = PathBuf::from(std::env::var("KILN_SAVE_TO").unwrap());
    let mut v: u32 = std::env::var("KILN_SAVE_FROM").unwrap().parse().unwrap();
    loop {
        v += 1;
        saver.save(v, &path).unwrap();
        println!("SAVED {v}");
    }
}

/// Kills a child saving versions `from + 1, …` to one place, `kills()` times, and checks
/// after each kill that what is there is one whole version, at least the last one the child
/// reported saved.
fn survives_kills(saver: Saver) {
    let dir = scratch(&format!("{saver:?}"));
    let path = saver.target(&dir);
    saver.save(1, &path).unwrap();
    let mut current = 1u32;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut mid_save = 0usize;
    for kill in 0..kills() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "saver_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("KILN_SAVER", format!("{saver:?}"))
            .env("KILN_SAVE_TO", &path)
            .env("KILN_SAVE_FROM", current.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the first save to finish, then a random 0–20 ms more.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut saved = current;
        while stdout.read_line(&mut line).unwrap() > 0 {
            if let Some(v) = line.trim().strip_prefix("SAVED ") {
                saved = v.parse().unwrap();
                break;
            }
            line.clear();
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 20_000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Versions the child reported before it died.
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        if let Some(v) = rest.lines().filter_map(|l| l.strip_prefix("SAVED ")?.parse::<u32>().ok()).max() {
            saved = v;
        }
        if !leftovers(&dir).is_empty() {
            mid_save += 1;
        }
        let found =
            saver.load(&path).unwrap_or_else(|e| panic!("after kill {kill}: {} does not load: {e}", path.display()));
        assert!(
            found == saved || found == saved + 1,
            "after kill {kill}: version {found} is there, the child had finished {saved}"
        );
        current = found;
    }
    // The next save clears what the killed writers left.
    saver.save(current + 1, &path).unwrap();
    assert_eq!(leftovers(&dir), Vec::<String>::new(), "temporaries left after a save");
    assert_eq!(saver.load(&path).unwrap(), current + 1);
    println!(
        "{saver:?}: {} kills, {mid_save} of them mid-save (temporaries left); every time one whole version",
        kills()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_adapter_folder_survives_kill_9() {
    survives_kills(Saver::Adapter);
}

#[test]
fn an_optimizer_state_survives_kill_9() {
    survives_kills(Saver::OptimizerState);
}

/// Two threads save versions to one place while a third reads it.
fn survives_concurrent_writers(saver: Saver) {
    let dir = scratch(&format!("concurrent-{saver:?}"));
    let path = saver.target(&dir);
    saver.save(1, &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    let (saves, reads) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u32)
            .map(|w| {
                let path = &path;
                s.spawn(move || {
                    let mut n = 0u32;
                    while Instant::now() < deadline || n < 20 {
                        saver.save(2 + w + 2 * n, path).unwrap_or_else(|e| panic!("writer {w}, save {n}: {e}"));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let reader = s.spawn(|| {
            let mut reads = 0;
            while Instant::now() < deadline {
                saver.load(&path).unwrap_or_else(|e| panic!("read {reads}: {e}"));
                reads += 1;
            }
            reads
        });
        let saves: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        (saves, reader.join().unwrap())
    });
    assert_eq!(leftovers(&dir), Vec::<String>::new(), "temporaries left after the saves");
    saver.load(&path).unwrap();
    println!("{saver:?}: {saves} saves from two threads, {reads} reads, every read one whole version");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_adapter_folder_survives_concurrent_writers() {
    survives_concurrent_writers(Saver::Adapter);
}

#[test]
fn an_optimizer_state_survives_concurrent_writers() {
    survives_concurrent_writers(Saver::OptimizerState);
}
