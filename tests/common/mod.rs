//! Shared by the test files: the devices every test body runs on, the macro that names a
//! test per backend, and the tolerance check.
#![allow(dead_code, unused_macros)]

pub mod gguf;

use kiln::{DType, Device, DeviceKind};
use std::sync::Once;

/// Every device present, CPU first. Prints, once per test binary, the devices the tests run
/// on and why any backend is skipped. With `CI=true`, a missing wgpu adapter is a failure:
/// CI installs lavapipe so the WGSL kernels really run.
pub fn devices() -> Vec<Device> {
    static REPORT: Once = Once::new();
    let all = Device::all();
    REPORT.call_once(|| {
        let names: Vec<String> = all
            .iter()
            .map(|d| match d.info() {
                Ok(i) if i.kind == DeviceKind::SoftwareAdapter => format!("{d} ({}, software)", i.name),
                Ok(i) => format!("{d} ({})", i.name),
                Err(e) => format!("{d} (info failed: {e})"),
            })
            .collect();
        println!("kiln tests run on: {}", names.join(", "));
        if Device::cuda_devices().is_empty() {
            println!("SKIP cuda runtime tests: no CUDA GPU or driver on this machine");
        }
        if Device::wgpu_devices().is_empty() {
            println!("SKIP wgpu runtime tests: no wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
        }
    });
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            !Device::wgpu_devices().is_empty(),
            "CI=true but no wgpu adapter was found: the WGSL tests must run on lavapipe in CI"
        );
    }
    kiln::set_poison_outputs(true);
    all
}

/// The devices other than the CPU, which are checked against it.
pub fn gpu_devices() -> Vec<Device> {
    devices().into_iter().filter(|d| !d.is_cpu()).collect()
}

/// A backend, as the tests are named after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
    Wgpu,
}

/// The devices of one backend. A GPU backend with no device prints SKIP and the reason (a
/// missing wgpu adapter fails under CI=true, through [`devices`]).
pub fn backend_devices(backend: Backend) -> Vec<Device> {
    let all = devices();
    let of: Vec<Device> = all
        .into_iter()
        .filter(|d| match backend {
            Backend::Cpu => d.is_cpu(),
            Backend::Cuda => matches!(d, Device::Cuda(_)),
            Backend::Wgpu => matches!(d, Device::Wgpu(_)),
        })
        .collect();
    if of.is_empty() {
        let why = match backend {
            Backend::Cuda => "no CUDA GPU or driver on this machine",
            _ => "no wgpu adapter (install mesa-vulkan-drivers for lavapipe)",
        };
        println!("SKIP {backend:?}: {why}");
    }
    of
}

/// Turns each check body `fn name(device: &Device)` into three tests, `name_cpu`,
/// `name_cuda` and `name_wgpu`, so a failing backend shows by name. A body checks the CPU
/// against its f64 reference, and any other device against the CPU.
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {
        $(
            pastey::paste! {
                #[test]
                fn [<$name _cpu>]() {
                    for device in common::backend_devices(common::Backend::Cpu) {
                        $name(&device);
                    }
                }

                #[test]
                fn [<$name _cuda>]() {
                    for device in common::backend_devices(common::Backend::Cuda) {
                        $name(&device);
                    }
                }

                #[test]
                fn [<$name _wgpu>]() {
                    for device in common::backend_devices(common::Backend::Wgpu) {
                        $name(&device);
                    }
                }
            }
        )*
    };
}

/// The proptest configuration of the property tests: `cases` fresh inputs, no persisted
/// failures.
pub fn cases(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config { cases, failure_persistence: None, ..Default::default() }
}

/// Unit roundoff of f32 accumulation.
pub const U32: f64 = f32::EPSILON as f64 / 2.0;

/// Asserts `|got - want| <= atol[i] + roundings * (u * |want| + s / 2)` for every element,
/// where u is the output dtype's unit roundoff and s its smallest subnormal (rounding error
/// is relative for normal values, absolute for subnormal ones). NaN fails, so an element a
/// kernel left poisoned fails too. `atol` is per element: it scales with each element's
/// reduction. `roundings` counts the output roundings the comparison allows (1 for one
/// round-to-nearest).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: &[f64], dtype: DType, roundings: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {} elements, expected {}", got.len(), want.len());
    let u = dtype.unit_roundoff();
    let subnormal = match dtype {
        DType::F32 => 2f64.powi(-149),
        DType::F16 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-133),
        DType::U32 | DType::I32 => 0.0,
    };
    let tol = |i: usize| atol[i] + roundings * (u * want[i].abs() + subnormal / 2.0);
    let mut worst: Option<(usize, f64)> = None;
    let mut bad = 0usize;
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        let within = err <= tol(i); // false for NaN
        if !within {
            bad += 1;
            let ratio = if err.is_nan() { f64::INFINITY } else { err / tol(i).max(f64::MIN_POSITIVE) };
            if worst.is_none_or(|(_, r)| ratio > r) {
                worst = Some((i, ratio));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {bad} of {} elements out of tolerance; worst at {i}: got {}, want {}, tol {}",
            got.len(),
            got[i],
            want[i],
            tol(i)
        );
    }
}

/// Output roundings allowed when a backend is compared with the CPU: each result may be one
/// ulp (2u) from the exact value when a backend rounds either way, as WGSL allows.
pub const BACKEND_ROUNDINGS: f64 = 4.0;

/// The tiny Llama fixtures' folder.
pub fn llama_fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

/// A Hugging Face folder of `model` (a fixture folder) with a tokenizer: the tiny GGUF's
/// vocabulary and merges as a byte-level BPE `tokenizer.json`, and a `tokenizer_config.json`
/// naming the special tokens and a chat template.
pub fn hf_folder_with_tokenizer(model: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join(model);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(llama_fixtures().join(model)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let gguf = kiln::io::GgufFile::open(llama_fixtures().join("tiny-f32.gguf")).unwrap();
    let tokenizer = kiln::model::Tokenizer::from_gguf(&gguf).unwrap();
    std::fs::write(out.join("tokenizer.json"), tokenizer.inner().to_string(true).unwrap()).unwrap();
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(out.join("tokenizer_config.json"), config.to_string()).unwrap();
    out
}

pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}";

/// The example binary `name` beside the test binaries (`target/<profile>/examples/<name>`),
/// built first when cargo runs the test (a no-op when it is fresh).
pub fn example_bin(name: &str) -> std::path::PathBuf {
    use std::path::Path;
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut build = std::process::Command::new(cargo);
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--quiet", "--example", name]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success(), "cargo build --example {name} failed");
    }
    assert!(bin.is_file(), "{} is missing: build it with cargo build --example {name}", bin.display());
    bin
}
