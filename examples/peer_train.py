#!/usr/bin/env python3
"""kiln's LoRA training step against PyTorch + PEFT on the CPU, one command, both sides in one run.

    python3 examples/peer_train.py [--threads 2] [--steps 3] [--model GGUF] [--skip-kiln]

The workload (the one of examples/peer_train.rs): SmolLM2-135M-Instruct (kiln's cached
default GGUF, ~/.cache/kiln/SmolLM2-135M-Instruct.Q4_1.gguf), LoRA rank 16, alpha 32, on
q/k/v/o/gate/up/down of every layer, a batch of 4 sequences of 256 tokens, labels =
input_ids (Hugging Face's causal-LM loss), one forward + backward per step (no optimizer: the
step is the part both sides compute). Token ids are fixed (`1000 + (7919*i + 104729*seq) %
40000`, benches/common/llama.rs). Each configuration runs in a process of its own so its peak
resident memory is its own; the step time is the median of `--steps` steps after one untimed
step (PyTorch's bf16: one timed step unless `--bf16-all-steps`, as it takes minutes per step
on a CPU without AVX512-BF16 or AMX).

- PyTorch: transformers loads the GGUF dequantized (f32 weights), PEFT adds the adapters
  (lora_B initialised to random values as kiln's side does, so every gradient is live);
  f32, and bf16 under `torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN; AMX where the
  CPU has it). OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from its process, as for
  every CPU peer; threadpoolctl names the BLAS it loaded.
- kiln: `target/release/examples/peer_train` with the Q4_1 weights kept quantized (the QLoRA
  case), f32 and bf16 activations, and f32 with activation checkpointing; RAYON_NUM_THREADS is
  the thread count and the environment is otherwise left as it is.

Prints one JSON line per configuration and a table of tokens/s and peak RSS with the ratios.
Not part of CI.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BATCH, SEQ_LEN, RANK, ALPHA = 4, 256, 16, 32
REPO = Path(__file__).resolve().parent.parent
FORCING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_id(seq, i):
    return 1000 + (7919 * i + 104729 * seq) % 40000


def default_model():
    cache = os.environ.get("KILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")
    return os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")


def torch_step(model_path, dtype, steps, threads):
    """Runs in a child process: PyTorch + PEFT, prints one JSON line."""
    import torch
    from peft import LoraConfig, get_peft_model
    from threadpoolctl import threadpool_info
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.train()
    ids = torch.tensor([[token_id(s, i) for i in range(SEQ_LEN)] for s in range(BATCH)])

    def step():
        if dtype == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    times, loss = [], float("nan")
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = step()
        if i > 0:
            times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    blas = [(x.get("internal_api"), x.get("architecture")) for x in threadpool_info() if x.get("user_api") == "blas"]
    print(json.dumps({
        "peer": "pytorch+peft", "dtype": dtype, "checkpointing": False,
        "tokens_per_s": round(BATCH * SEQ_LEN / median, 1), "step_s": round(median, 3), "loss": round(loss, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "blas": blas,
        "onednn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }), flush=True)


def run_child(args):
    out = subprocess.run(args[0], env=args[1], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args[0])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--skip-kiln", action="store_true")
    ap.add_argument("--bf16-all-steps", action="store_true",
                    help="time PyTorch's bf16 over --steps steps too (one step otherwise)")
    ap.add_argument("--torch-child", choices=["f32", "bf16"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_child:
        torch_step(a.model, a.torch_child, a.steps, a.threads)
        return
    if not os.path.exists(a.model):
        sys.exit(f"{a.model} is missing: `cargo run --release --example generate -- --prompt hi` fetches it")

    results = []
    torch_env = {k: v for k, v in os.environ.items() if k not in FORCING_VARIABLES}
    torch_env["OMP_NUM_THREADS"] = str(a.threads)
    kiln_env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    if not a.skip_kiln:
        build = subprocess.run(["cargo", "build", "--release", "--example", "peer_train"], cwd=REPO)
        if build.returncode != 0:
            sys.exit("building examples/peer_train.rs failed")
    kiln = str(REPO / "target" / "release" / "examples" / "peer_train")
    configs = []
    for dtype in ("f32", "bf16"):
        # PyTorch's bf16 without AVX512-BF16 or AMX takes minutes per step: one timed step.
        torch_steps = a.steps if dtype == "f32" or a.bf16_all_steps else 1
        configs.append(([sys.executable, __file__, "--torch-child", dtype, "--steps", str(torch_steps),
                         "--threads", str(a.threads), "--model", a.model], torch_env))
        if not a.skip_kiln:
            configs.append(([kiln, "--dtype", dtype, "--steps", str(a.steps)], kiln_env))
    if not a.skip_kiln:
        configs.append(([kiln, "--dtype", "f32", "--checkpointing", "--steps", str(a.steps)], kiln_env))
    for config in configs:
        r = run_child(config)
        print(json.dumps(r), flush=True)
        results.append(r)

    def find(peer, dtype, ck=False):
        return next((r for r in results if r["peer"] == peer and r["dtype"] == dtype and r["checkpointing"] == ck), None)

    print(f"\n{'configuration':34} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for r in results:
        name = f"{r['peer']} {r['dtype']}{' checkpointing' if r['checkpointing'] else ''}"
        print(f"{name:34} {r['tokens_per_s']:9.1f} {r['peak_rss_mib']:13.0f}")
    for dtype in ("f32", "bf16"):
        k, t = find("kiln", dtype), find("pytorch+peft", dtype)
        if k and t:
            print(f"{dtype}: kiln / PyTorch tokens/s {k['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
                  f"peak RSS {k['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")
    k, kc = find("kiln", "f32"), find("kiln", "f32", True)
    if k and kc:
        print(f"checkpointing: step time {k['tokens_per_s'] / kc['tokens_per_s']:.2f}x, "
              f"peak RSS {kc['peak_rss_mib']:.0f} vs {k['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
