//! `examples/grads`, the command-line contract: for a batch of two sequences on the tiny
//! fixture model (f32 safetensors, and Q8_0 GGUF) with the PEFT adapter `adapter-tiny`, the
//! file it writes holds the loss and every LoRA gradient PyTorch autograd gives
//! (`tests/fixtures/make_grads_cli.py`), on every device, with and without activation
//! checkpointing; bad flags give exit status 2 and a message.

use kiln::Device;
use kiln::io::SafetensorsFile;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The example binary beside this test (`target/<profile>/examples/grads`), built first when
/// cargo runs the test (a no-op when it is fresh), once per test binary.
fn grads_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build)
}

fn build() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("examples").join(format!("grads{}", std::env::consts::EXE_SUFFIX));
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut build = Command::new(cargo);
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--quiet", "--example", "grads"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success(), "cargo build --example grads failed");
    }
    assert!(bin.is_file(), "{} is missing: build it with cargo build --example grads", bin.display());
    bin
}

fn grads(args: &[&str]) -> Output {
    Command::new(grads_bin()).args(args).output().unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn expected() -> SafetensorsFile {
    SafetensorsFile::open(fixtures().join("grads_cli_expected.safetensors")).unwrap()
}

/// `ids.0;ids.1` of the fixture, as `--prompt-ids` takes them.
fn batch_flag(expected: &SafetensorsFile) -> String {
    (0..2)
        .map(|i| {
            let (_, _, bytes) = expected.raw(&format!("ids.{i}")).unwrap();
            let ids: Vec<String> =
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string()).collect();
            ids.join(",")
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn f32s(file: &SafetensorsFile, name: &str) -> (Vec<usize>, Vec<f32>) {
    let (dtype, shape, bytes) = file.raw(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(dtype, "F32", "{name}");
    (shape, bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

/// f32 gradients through two small layers against PyTorch's in f64 (rounded once to f32):
/// each value is a sum of a few hundred rounded products per layer, so its error stays within
/// a few hundred ulps of the tensor's scale. The bound is 2⁻¹³ of the tensor's largest value
/// (about 1000 f32 ulps at that scale) plus the same relative part, as for the logits in
/// tests/model.rs. Returns the worst |got − want| / bound.
fn assert_close(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = |w: f32| scale / 8192.0 + w.abs() / 8192.0;
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ratio = (g - w).abs() / tol(*w).max(f32::MIN_POSITIVE);
        assert!(ratio <= 1.0, "{what}: element {i}: got {g}, want {w} (bound {})", tol(*w));
        worst = worst.max(ratio);
    }
    worst
}

/// Runs the tool on `device` for `model` (a key of the fixture and its path) and checks the
/// file against PyTorch's; returns the file's bytes.
fn check(device: &str, key: &str, model: &Path, checkpointing: bool) -> Vec<u8> {
    let expected = expected();
    let out = std::env::temp_dir().join(format!(
        "kiln-grads-{}-{key}-{}-{checkpointing}.safetensors",
        std::process::id(),
        device.replace(':', "")
    ));
    let batch = batch_flag(&expected);
    let adapter = fixtures().join("adapter-tiny");
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt-ids",
        &batch,
        "--device",
        device,
        "--out",
        out.to_str().unwrap(),
    ];
    if checkpointing {
        args.push("--checkpointing");
    }
    let run = grads(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "grads {args:?} failed:\n{stderr}");
    let bytes = std::fs::read(&out).unwrap();
    let file = SafetensorsFile::open(&out).unwrap();
    let _ = std::fs::remove_file(&out);

    let what = format!("{device}, {key}, checkpointing {checkpointing}");
    let (shape, loss) = f32s(&file, "loss");
    let (_, want_loss) = f32s(&expected, &format!("{key}.loss"));
    assert_eq!(shape, [1], "{what}: loss shape");
    assert!(
        (loss[0] - want_loss[0]).abs() <= want_loss[0].abs() / 8192.0,
        "{what}: loss {} against {}",
        loss[0],
        want_loss[0]
    );

    let prefix = format!("{key}.grad.");
    let mut want_names: Vec<String> = expected
        .names()
        .unwrap()
        .into_iter()
        .filter_map(|n| n.strip_prefix(&prefix).map(|k| format!("grad.{k}")))
        .collect();
    let mut got_names: Vec<String> = file.names().unwrap().into_iter().filter(|n| n != "loss").collect();
    want_names.sort();
    got_names.sort();
    assert_eq!(got_names, want_names, "{what}: one gradient per tensor of the adapter, under its key");
    let mut worst = (0f32, String::new());
    for name in &got_names {
        let (shape, got) = f32s(&file, name);
        let (want_shape, want) = f32s(&expected, &format!("{key}.{name}"));
        assert_eq!(shape, want_shape, "{what}: {name} shape");
        let ratio = assert_close(&format!("{what}: {name}"), &got, &want);
        if ratio > worst.0 {
            worst = (ratio, name.clone());
        }
    }
    println!(
        "{what}: loss {} (PyTorch {}), {} gradients, worst at {:.3} of the bound ({})",
        loss[0],
        want_loss[0],
        got_names.len(),
        worst.0,
        worst.1
    );
    bytes
}

/// Both models, with and without checkpointing: checkpointing recomputes the same ops on
/// the same inputs, so the files are the same bytes.
fn matches_pytorch_on(device: &str) {
    let models = [("tiny", fixtures().join("tiny")), ("gguf.tiny-q8_0", fixtures().join("tiny-q8_0.gguf"))];
    for (key, path) in &models {
        let plain = check(device, key, path, false);
        let checkpointed = check(device, key, path, true);
        assert!(plain == checkpointed, "{device}, {key}: --checkpointing changed the file");
    }
}

#[test]
fn matches_pytorch_cpu() {
    matches_pytorch_on("cpu");
}

#[test]
fn matches_pytorch_wgpu() {
    if Device::wgpu_devices().is_empty() {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI: no wgpu adapter");
        println!("SKIP: no wgpu adapter");
        return;
    }
    matches_pytorch_on("wgpu:0");
}

#[test]
fn matches_pytorch_cuda() {
    if Device::cuda_devices().is_empty() {
        println!("SKIP: no CUDA device");
        return;
    }
    matches_pytorch_on("cuda:0");
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    let tiny = fixtures().join("tiny");
    let adapter = fixtures().join("adapter-tiny");
    let (tiny, adapter) = (tiny.to_str().unwrap(), adapter.to_str().unwrap());
    let out = std::env::temp_dir().join(format!("kiln-grads-bad-{}.safetensors", std::process::id()));
    let out = out.to_str().unwrap();
    let full = |ids: &str| -> Vec<String> {
        ["--model", tiny, "--adapter", adapter, "--prompt-ids", ids, "--out", out].map(String::from).to_vec()
    };
    let with = |mut args: Vec<String>, extra: &[&str]| {
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let without = |flag: &str| {
        let args = full("5,6,7");
        let i = args.iter().position(|a| a == flag).unwrap();
        [&args[..i], &args[i + 2..]].concat()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(full("5,6,7"), &["--bogus"]), "unknown argument \"--bogus\""),
        (without("--out"), "--out is required"),
        (without("--model"), "--model is required"),
        (without("--adapter"), "--adapter is required"),
        (without("--prompt-ids"), "--prompt-ids is required"),
        (full("5,x,7"), "\"x\" is not a token id"),
        (full("5,6;"), "\"\" is not a token id"),
        (full("5,6;7"), "sequence 1 has 1 id(s)"),
        (full("-3,4"), "\"-3\" is not a token id"),
        (with(full("5,6,7"), &["--device", "gpu"]), "--device: "),
        (with(full("5,6,7"), &["--device"]), "--device needs a value"),
    ];
    for (args, message) in cases {
        let run = grads(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?} exited with {:?}:\n{stderr}", run.status);
        assert!(stderr.contains(message) && stderr.contains("usage: grads"), "{args:?}: {stderr}");
        assert!(!Path::new(out).exists(), "{args:?} wrote {out}");
    }
    // Well-formed flags that fail later: status 1, the reason, no file.
    let missing = fixtures().join("no-such-adapter");
    let args = ["--model", tiny, "--adapter", missing.to_str().unwrap(), "--prompt-ids", "5,6", "--out", out];
    let run = grads(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no-such-adapter"), "{stderr}");
    let run = grads(&with(full("5,6,320"), &["--device", "cpu"]).iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("token id 320"), "{stderr}");
    assert!(!Path::new(out).exists());
    // --help: the usage on stdout, status 0.
    let run = grads(&["--help"]);
    assert!(run.status.success() && String::from_utf8_lossy(&run.stdout).contains("usage: grads"));
}

/// An adapter file whose keys lack `base_model.model.` (which the loader accepts): the
/// gradients are written under those keys, with the same values.
#[test]
fn gradients_keep_the_adapter_files_own_keys() {
    let source = fixtures().join("adapter-tiny");
    let dir = std::env::temp_dir().join(format!("kiln-grads-bare-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(source.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let file = SafetensorsFile::open(source.join("adapter_model.safetensors")).unwrap();
    let tensors: Vec<(String, kiln::Tensor)> = file
        .names()
        .unwrap()
        .into_iter()
        .map(|n| (n.strip_prefix("base_model.model.").unwrap().to_string(), file.tensor(&n, &Device::Cpu).unwrap()))
        .collect();
    let named: Vec<(&str, &kiln::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = kiln::io::to_bytes(&named, &Default::default()).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();

    let expected = expected();
    let batch = batch_flag(&expected);
    let tiny = fixtures().join("tiny");
    let out = dir.join("grads.safetensors");
    let args = [
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &batch,
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = grads(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = SafetensorsFile::open(&out).unwrap();
    let mut names = got.names().unwrap();
    names.sort();
    let mut want: Vec<String> = tensors.iter().map(|(n, _)| format!("grad.{n}")).chain(["loss".into()]).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, _) in &tensors {
        let (_, g) = f32s(&got, &format!("grad.{name}"));
        let (_, w) = f32s(&expected, &format!("tiny.grad.base_model.model.{name}"));
        assert_close(name, &g, &w);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
