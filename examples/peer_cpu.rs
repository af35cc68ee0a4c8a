//! The CPU backend's matmul against numpy (OpenBLAS) and PyTorch on the same machine, in one
//! run, each peer on the kernels it picks for this CPU.
//!
//! ```text
//! cargo run --release --example peer_cpu [-- OPTIONS]
//!   --square N | MxNxK   A·B at N³ or M×N×K, f32 and bf16 (repeatable)
//!   --model              the model's products (below) at 2048 and 512 tokens
//!   --tokens T[,T..]     token counts for the model's products (implies --model)
//!   --f32 | --bf16       only that dtype
//!   --budget S           seconds of timed calls per product before stopping (default 1)
//! ```
//! With no set named it runs `--square 1024` and the model's products at 512 tokens (about
//! two minutes on a 2-core machine); `--model` at 2048 tokens adds several minutes, most of it
//! PyTorch's bf16 head.
//!
//! The model's products are SmolLM2-135M's (d = 576, FFN 1536, vocab 49152) at T tokens, for
//! each projection shape (576→576, 576→1536, 1536→576) and the head (576→49152), with the
//! weight W stored `[out, in]`: forward `x·Wᵀ` (`MatmulOptions::nt()`), and the two backward
//! products `dx = dy·W` and `dW = dyᵀ·x` (`MatmulOptions::tn()`). kiln runs f32, and bf16
//! inputs with f32 output; numpy runs f32 only (it has no bf16); PyTorch runs f32 and bf16
//! (bf16 output: its CPU `mm` has no f32 output for bf16 inputs).
//!
//! Each peer runs `examples/peer_cpu.py` in its own python3 process with as many threads as
//! kiln's rayon pool, and with `OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE` removed from that
//! process's environment only: some machines set them, and OpenBLAS would otherwise run the
//! kernels they name instead of its own choice for the CPU. PyTorch's matmul calls MKL or
//! oneDNN, not OpenBLAS, but importing torch loads numpy's OpenBLAS too, so its process gets
//! the same environment. Each peer prints the kernels it runs: OpenBLAS's kernel family
//! (threadpoolctl's `architecture`), torch's build (MKL, oneDNN) and which library each dtype's
//! matmul calls (MKL's and oneDNN's verbose lines during one small product per layout).
//!
//! Every side uses one timing rule: one untimed call, then timed calls until 25 or until at
//! least 3 ran and the budget has passed; the fastest counts (on a shared machine the fastest
//! run is the one least disturbed by other work). A first call longer than 5 budgets is the
//! measurement itself (some of PyTorch's bf16 products take tens of seconds here). Needs python3 with numpy, and torch for the
//! second peer; a missing peer is reported and skipped.

use kiln::ops::{MatmulOptions, matmul_with};
use kiln::{DType, Device, Tensor};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

const MAX_RUNS: usize = 25;
const MIN_RUNS: usize = 3;
/// An untimed first call longer than this many budgets is taken as the measurement.
const SLOW_CALLS: f64 = 5.0;
/// Set on some machines to force OpenBLAS's kernel family and cache size; the peers run
/// without them.
const FORCING_VARIABLES: [&str; 2] = ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"];
const PEER_SCRIPT: &str = include_str!("peer_cpu.py");

/// SmolLM2-135M: hidden size, FFN size, vocabulary.
const D_MODEL: usize = 576;
const D_FFN: usize = 1536;
const VOCAB: usize = 49152;

/// One product: A is `[m, k]` (`[k, m]` when `trans_a`), B is `[k, n]` (`[n, k]` when
/// `trans_b`).
struct Product {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    dtype: DType,
}

impl Product {
    fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    fn shape(&self) -> String {
        format!("{}×{}×{}", self.m, self.n, self.k)
    }

    fn dtype_name(&self) -> &'static str {
        if self.dtype == DType::BF16 { "bf16" } else { "f32" }
    }

    fn to_json(&self) -> Value {
        json!({"m": self.m, "n": self.n, "k": self.k, "trans_a": self.trans_a,
               "trans_b": self.trans_b, "dtype": self.dtype_name()})
    }
}

struct Args {
    squares: Vec<(usize, usize, usize)>,
    tokens: Vec<usize>,
    dtypes: Vec<DType>,
    budget_s: f64,
}

fn usage(problem: &str) -> ! {
    eprintln!("peer_cpu: {problem}\nsee the header of examples/peer_cpu.rs for the options");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut squares = Vec::new();
    let mut tokens = Vec::new();
    let mut model = false;
    let mut dtypes = vec![DType::F32, DType::BF16];
    let mut budget_s = 1.0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--square" => {
                let text = value();
                let dims: Vec<usize> = text
                    .split(['x', '×'])
                    .map(|d| d.parse().unwrap_or_else(|_| usage(&format!("--square {text}: not N or MxNxK"))))
                    .collect();
                squares.push(match dims[..] {
                    [n] => (n, n, n),
                    [m, n, k] => (m, n, k),
                    _ => usage(&format!("--square {text}: not N or MxNxK")),
                });
            }
            "--model" => model = true,
            "--tokens" => {
                let text = value();
                tokens = text
                    .split(',')
                    .map(|t| t.parse().unwrap_or_else(|_| usage(&format!("--tokens {text}: not a list of counts"))))
                    .collect();
            }
            "--f32" => dtypes = vec![DType::F32],
            "--bf16" => dtypes = vec![DType::BF16],
            "--budget" => {
                let text = value();
                budget_s = text.parse().unwrap_or_else(|_| usage(&format!("--budget {text}: not seconds")));
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if model && tokens.is_empty() {
        tokens = vec![2048, 512];
    }
    if squares.is_empty() && tokens.is_empty() {
        squares.push((1024, 1024, 1024));
        tokens.push(512);
    }
    Args { squares, tokens, dtypes, budget_s }
}

fn products(args: &Args) -> Vec<Product> {
    let mut list = Vec::new();
    for &dtype in &args.dtypes {
        for &(m, n, k) in &args.squares {
            list.push(Product { name: "A·B".into(), m, n, k, trans_a: false, trans_b: false, dtype });
        }
    }
    let layers = [
        ("q/o proj", D_MODEL, D_MODEL),
        ("up proj", D_MODEL, D_FFN),
        ("down proj", D_FFN, D_MODEL),
        ("head", D_MODEL, VOCAB),
    ];
    for &dtype in &args.dtypes {
        for &t in &args.tokens {
            for &(layer, d_in, d_out) in &layers {
                // W is [d_out, d_in]; x is [t, d_in]; dy is [t, d_out].
                let each = [
                    ("x·Wᵀ", t, d_out, d_in, false, true),
                    ("dy·W", t, d_in, d_out, false, false),
                    ("dyᵀ·x", d_out, d_in, t, true, false),
                ];
                for (what, m, n, k, trans_a, trans_b) in each {
                    list.push(Product { name: format!("{layer} {what}"), m, n, k, trans_a, trans_b, dtype });
                }
            }
        }
    }
    list
}

fn best_seconds(mut call: impl FnMut(), budget_s: f64) -> f64 {
    let t = Instant::now();
    call();
    let first = t.elapsed().as_secs_f64();
    if first > SLOW_CALLS * budget_s {
        // First-touch costs are lost in a call this long: it is its own measurement.
        return first;
    }
    let (mut fastest, mut spent, mut runs) = (f64::INFINITY, 0.0, 0);
    while runs < MAX_RUNS && (runs < MIN_RUNS || spent < budget_s) {
        let t = Instant::now();
        call();
        let dt = t.elapsed().as_secs_f64();
        fastest = fastest.min(dt);
        spent += dt;
        runs += 1;
    }
    fastest
}

fn kiln_seconds(p: &Product, budget_s: f64) -> kiln::Result<f64> {
    let a_shape = if p.trans_a { [p.k, p.m] } else { [p.m, p.k] };
    let b_shape = if p.trans_b { [p.n, p.k] } else { [p.k, p.n] };
    let a = Tensor::randn(&a_shape, 0.0, 1.0, 1, p.dtype, &Device::Cpu)?;
    let b = Tensor::randn(&b_shape, 0.0, 1.0, 2, p.dtype, &Device::Cpu)?;
    let options = MatmulOptions { trans_a: p.trans_a, trans_b: p.trans_b, ..Default::default() }.out_dtype(DType::F32);
    matmul_with(&a, &b, options)?;
    Ok(best_seconds(
        || {
            // The output is dropped inside the timed call, as the peers' is.
            let _ = matmul_with(&a, &b, options);
        },
        budget_s,
    ))
}

/// What a peer reported: its info and one time per product (None where it has no such
/// product), or why it could not run.
struct Peer {
    info: Value,
    probe: Vec<String>,
    seconds: Vec<Option<f64>>,
}

fn run_peer(lib: &str, job: &Value) -> Result<Peer, String> {
    let mut command = Command::new("python3");
    command.arg("-c").arg(PEER_SCRIPT).arg(lib);
    for variable in FORCING_VARIABLES {
        command.env_remove(variable);
    }
    if lib == "numpy" {
        command.env("OPENBLAS_NUM_THREADS", job["threads"].to_string());
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3 not runnable ({e})"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(job.to_string().as_bytes())
        .map_err(|e| format!("could not send the job ({e})"))?;
    let out = child.wait_with_output().map_err(|e| format!("python3 did not finish ({e})"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(result) = stdout.lines().find_map(|l| l.strip_prefix("PEER_RESULT ")) else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.trim().lines().last().unwrap_or("no output");
        return Err(format!("failed: {last}"));
    };
    let result: Value = serde_json::from_str(result).map_err(|e| format!("unreadable result ({e})"))?;
    let probe = stdout
        .lines()
        .take_while(|l| !l.starts_with("PEER_RESULT "))
        .filter(|l| l.starts_with("PROBE ") || l.starts_with("MKL_VERBOSE") || l.starts_with("onednn_verbose"))
        .map(str::to_owned)
        .collect();
    let seconds = result["seconds"].as_array().map(|v| v.iter().map(Value::as_f64).collect()).unwrap_or_default();
    Ok(Peer { info: result["info"].clone(), probe, seconds })
}

/// Which library each probed dtype called, from the verbose lines under each `PROBE` marker.
fn probe_summary(lines: &[String]) -> Vec<String> {
    let mut summary = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in lines {
        if let Some(dtype) = line.strip_prefix("PROBE ") {
            if let Some((name, calls)) = current.take() {
                let called = if calls.is_empty() {
                    "no MKL or oneDNN call (ATen's own loops)".to_owned()
                } else {
                    calls.join(", ")
                };
                summary.push(format!("{name}: {called}"));
            }
            current = (dtype != "end").then(|| (dtype.to_owned(), Vec::new()));
        } else if let Some((_, calls)) = current.as_mut() {
            let call = if let Some(rest) = line.strip_prefix("MKL_VERBOSE ") {
                // "SGEMM(N,T,...) 1.2ms ..." names the routine; the banner line names MKL's code path.
                match rest.split_once('(') {
                    Some((routine, _)) if !routine.contains(' ') => format!("MKL {routine}"),
                    _ => format!("MKL [{rest}]"),
                }
            } else {
                // onednn_verbose,...,exec,cpu,matmul,<implementation>,...
                let fields: Vec<&str> = line.split(',').collect();
                match fields.iter().position(|f| *f == "exec") {
                    Some(i) => format!("oneDNN {}", fields.get(i + 2..i + 4).map(|f| f.join(" ")).unwrap_or_default()),
                    None => continue,
                }
            };
            if !calls.contains(&call) {
                calls.push(call);
            }
        }
    }
    summary
}

fn print_peer_info(lib: &str, peer: &Result<Peer, String>) {
    match peer {
        Err(why) => println!("{lib}: {why}; not measured"),
        Ok(peer) => {
            let info = &peer.info;
            println!("{lib} {}: in its process {}", info["version"].as_str().unwrap_or("?"), info["removed"]);
            match &info["blas"] {
                Value::Array(libs) => {
                    for l in libs {
                        println!(
                            "  loaded: {} {} architecture {} threads {}",
                            l["internal_api"].as_str().unwrap_or("?"),
                            l["version"].as_str().unwrap_or("?"),
                            l["architecture"].as_str().unwrap_or("-"),
                            l["num_threads"]
                        );
                    }
                }
                other => println!("  BLAS kernels: {}", other.as_str().unwrap_or("unknown")),
            }
            if lib == "torch" {
                println!(
                    "  threads {}, mkldnn available {}, mkl available {}, CPU capability {}",
                    info["num_threads"], info["mkldnn_available"], info["mkl_available"], info["cpu_capability"]
                );
                for line in info["config"].as_array().into_iter().flatten() {
                    println!("  config: {}", line.as_str().unwrap_or("?"));
                }
                for line in probe_summary(&peer.probe) {
                    println!("  matmul calls {line}");
                }
            }
        }
    }
}

fn main() -> kiln::Result<()> {
    let args = parse_args();
    let list = products(&args);
    let threads = rayon::current_num_threads();
    for variable in FORCING_VARIABLES {
        let value = std::env::var(variable).unwrap_or_else(|_| "unset".into());
        println!("this environment: {variable}={value} (removed for the peers)");
    }

    let mut ours = Vec::with_capacity(list.len());
    for p in &list {
        ours.push(kiln_seconds(p, args.budget_s)?);
    }
    let job = json!({"threads": threads, "budget_s": args.budget_s, "max_runs": MAX_RUNS,
                     "min_runs": MIN_RUNS, "slow_calls": SLOW_CALLS,
                     "products": list.iter().map(Product::to_json).collect::<Vec<_>>()});
    let numpy = run_peer("numpy", &job);
    let torch = run_peer("torch", &job);

    println!("kiln: Device::Cpu, {threads} rayon threads, bf16 inputs with f32 output");
    print_peer_info("numpy", &numpy);
    print_peer_info("torch", &torch);
    println!();
    println!("| product | dtype | m×n×k | kiln GFLOP/s | numpy GFLOP/s | torch GFLOP/s | kiln/numpy | kiln/torch |");
    println!("|---|---|---|---|---|---|---|---|");
    let gflops = |p: &Product, s: f64| p.flops() / s / 1e9;
    let peer_gflops = |peer: &Result<Peer, String>, i: usize, p: &Product| {
        peer.as_ref().ok().and_then(|peer| peer.seconds.get(i).copied().flatten()).map(|s| gflops(p, s))
    };
    let cell = |v: Option<f64>, digits: usize| v.map_or("—".to_owned(), |v| format!("{v:.digits$}"));
    for (i, p) in list.iter().enumerate() {
        let kiln = gflops(p, ours[i]);
        let np = peer_gflops(&numpy, i, p);
        let th = peer_gflops(&torch, i, p);
        println!(
            "| {} | {} | {} | {kiln:.1} | {} | {} | {} | {} |",
            p.name,
            p.dtype_name(),
            p.shape(),
            cell(np, 1),
            cell(th, 1),
            cell(np.map(|v| kiln / v), 2),
            cell(th.map(|v| kiln / v), 2)
        );
    }
    Ok(())
}
