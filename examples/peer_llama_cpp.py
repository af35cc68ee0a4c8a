#!/usr/bin/env python3
"""kiln's Llama model against llama.cpp on the CPU, one command, both sides in one run.

    python3 examples/peer_llama_cpp.py [--threads 2] [--model GGUF] [--skip-kiln]

Runs the same workload on both sides with the same thread count, on SmolLM2-135M-Instruct
Q4_1 (kiln's cached default model, ~/.cache/kiln/SmolLM2-135M-Instruct.Q4_1.gguf):
- prefill: a 512-token prompt into an empty cache, logits of the last token;
- decode at batch 1 and batch 8: 32 steps of one token per sequence, after 128 prefilled
  positions per sequence, logits of every sequence at every step;
- kiln alone: the batch-8 decode with rank-16 adapters on all seven projections, 8 sequences
  on 8 different adapters against all 8 on one (llama.cpp applies one adapter set per
  context, not one per sequence).
Token ids are fixed (`1000 + (7919*i + 104729*seq) % 40000`, the formula of
benches/common/llama.rs), so no tokenizer is involved. Wall-clock around the decode calls,
after a warm-up: prefill is the best of 5 runs; decode is timed step by step over 5 runs of
32 steps and the median step counts (on a shared machine other processes stall single steps,
llama.cpp's spinning OpenMP threads by up to seconds). llama.cpp's own timings
(llama_perf_context, mean over all its calls) are printed next to them.

kiln's side is `cargo run --release --example peer_model -- --json` (RAYON_NUM_THREADS set to
the thread count), run with the environment as it is; llama.cpp runs in this process after
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from it, as for every CPU peer (see
examples/peer_cpu.rs). llama.cpp's side needs llama-cpp-python, which builds llama.cpp from source
(`pip install llama-cpp-python`, minutes on 2 cores; see BENCHMARKS.md for the flags used).
Not part of CI.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT_LEN = 512
DECODE_CONTEXT = 128
DECODE_STEPS = 32
RUNS = 5
REPO = Path(__file__).resolve().parent.parent
FORCING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def token_id(seq, i):
    return 1000 + (7919 * i + 104729 * seq) % 40000


def median(v):
    return sorted(v)[len(v) // 2]


def best(f):
    """The fastest of RUNS runs of f after one untimed run, in seconds."""
    f()
    fastest = float("inf")
    for _ in range(RUNS):
        t = time.perf_counter()
        f()
        fastest = min(fastest, time.perf_counter() - t)
    return fastest


def run_kiln(threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    build = subprocess.run(["cargo", "build", "--release", "--example", "peer_model"], cwd=REPO, env=env)
    if build.returncode != 0:
        sys.exit("building examples/peer_model.rs failed")
    binary = REPO / "target" / "release" / "examples" / "peer_model"
    out = subprocess.run([str(binary), "--json"], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"kiln's peer_model failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API (llama_batch / llama_decode)."""

    def __init__(self, model_path, threads, verbose):
        import llama_cpp as lc

        self.lc = lc
        self.threads = threads
        if not verbose:
            # llama.cpp logs every load and context to stderr; keep the reference alive.
            self._quiet = lc.llama_log_callback(lambda level, text, data: None)
            lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            sys.exit(f"llama.cpp could not load {model_path}")

    def context(self, n_seq, n_ctx_per_seq, n_batch):
        lc = self.lc
        p = lc.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_per_seq
        p.n_batch = n_batch
        p.n_ubatch = min(n_batch, 512)
        p.n_seq_max = n_seq
        p.n_threads = self.threads
        p.n_threads_batch = self.threads
        p.no_perf = False
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            sys.exit("llama.cpp could not create a context")
        return ctx

    def decode(self, ctx, tokens, logits_for):
        """tokens: [(token, pos, seq)], logits_for: a set of indices whose logits are wanted."""
        lc = self.lc
        batch = lc.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, (tok, pos, seq) in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if i in logits_for else 0
            batch.n_tokens = len(tokens)
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                sys.exit(f"llama_decode returned {rc}")
            # Waits for the logits, and is where llama.cpp adds the call to its own timings.
            lc.llama_synchronize(ctx)
        finally:
            lc.llama_batch_free(batch)

    def perf(self, ctx):
        d = self.lc.llama_perf_context(ctx)
        return d

    def prefill(self):
        lc = self.lc
        ctx = self.context(1, PROMPT_LEN, PROMPT_LEN)
        mem = lc.llama_get_memory(ctx)
        tokens = [(token_id(0, i), i, 0) for i in range(PROMPT_LEN)]

        def run():
            lc.llama_memory_clear(mem, True)
            self.decode(ctx, tokens, {PROMPT_LEN - 1})

        run()
        lc.llama_perf_context_reset(ctx)
        secs = best(run)
        d = self.perf(ctx)
        own = d.n_p_eval / (d.t_p_eval_ms / 1e3) if d.t_p_eval_ms > 0 else float("nan")
        lc.llama_free(ctx)
        return PROMPT_LEN / secs, own

    def decode_rate(self, batch):
        lc = self.lc
        ctx = self.context(batch, DECODE_CONTEXT + DECODE_STEPS, batch * DECODE_CONTEXT)
        mem = lc.llama_get_memory(ctx)
        prompt = [(token_id(s, i), i, s) for s in range(batch) for i in range(DECODE_CONTEXT)]
        self.decode(ctx, prompt, {len(prompt) - 1})

        steps = []
        for run in range(RUNS + 1):
            for s in range(batch):
                lc.llama_memory_seq_rm(mem, s, DECODE_CONTEXT, -1)
            if run == 1:
                lc.llama_perf_context_reset(ctx)
            for step in range(DECODE_STEPS):
                pos = DECODE_CONTEXT + step
                tokens = [(token_id(s, pos), pos, s) for s in range(batch)]
                t = time.perf_counter()
                self.decode(ctx, tokens, set(range(batch)))
                if run > 0:  # run 0 is the warm-up
                    steps.append(time.perf_counter() - t)
        d = self.perf(ctx)
        # llama.cpp counts a one-token call as decoding and a longer one as prompt evaluation.
        n, ms = (d.n_eval, d.t_eval_ms) if batch == 1 else (d.n_p_eval, d.t_p_eval_ms)
        own = n / (ms / 1e3) if ms > 0 else float("nan")
        lc.llama_free(ctx)
        return batch / median(steps), own


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "kiln" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--skip-kiln", action="store_true", help="run llama.cpp only")
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's log on stderr")
    args = ap.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"{args.model} not found: run `cargo run --release --example generate -- --prompt hi` once to fetch it")

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; threads: {args.threads}; model: {args.model}")
    kiln = None if args.skip_kiln else run_kiln(args.threads)

    # llama.cpp runs in this process, kiln's side above in its own with the environment as it
    # was. Some machines set these to force OpenBLAS's kernels; llama-cpp-python loads numpy's
    # OpenBLAS, so they go before it is imported (llama.cpp built without GGML_BLAS calls its
    # own kernels either way).
    removed = {v: os.environ.pop(v, None) for v in FORCING_VARIABLES}
    print("removed for llama.cpp: " + ", ".join(f"{v}={'unset' if x is None else x}" for v, x in removed.items()))
    import llama_cpp as lc

    peer = LlamaCpp(args.model, args.threads, args.verbose)
    libs = sorted(p.name for p in (Path(lc.__file__).parent / "lib").glob("lib*.so.*.*"))
    print(f"llama.cpp via llama-cpp-python {lc.__version__} ({', '.join(libs)})")
    print(f"llama.cpp system info: {lc.llama_print_system_info().decode().strip()}")
    prefill, prefill_own = peer.prefill()
    decode1, decode1_own = peer.decode_rate(1)
    decode8, decode8_own = peer.decode_rate(8)
    lc.llama_model_free(peer.model)
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")

    print()
    print(f"{'tokens/s':<42} {'kiln':>10} {'llama.cpp':>10} {'kiln/llama.cpp':>15}")
    rows = [
        (f"prefill {PROMPT_LEN} tokens (best of {RUNS})", "prefill", prefill),
        (f"decode batch 1 (ctx {DECODE_CONTEXT}, median step)", "decode_b1", decode1),
        (f"decode batch 8 (ctx {DECODE_CONTEXT}, median step)", "decode_b8", decode8),
    ]
    for label, key, theirs in rows:
        ours = kiln[key] if kiln else float("nan")
        print(f"{label:<42} {ours:>10.1f} {theirs:>10.1f} {ours / theirs:>15.2f}")
    print(
        f"llama.cpp's own timings (mean of its calls after a warm-up): prefill {prefill_own:.1f}, decode batch 1 "
        f"{decode1_own:.1f}, decode batch 8 {decode8_own:.1f} tokens/s"
    )
    if kiln:
        one, eight = kiln["decode_b8_one_adapter"], kiln["decode_b8_eight_adapters"]
        print(
            f"kiln decode batch 8 with rank-16 adapters: one adapter {one:.1f}, eight adapters {eight:.1f} "
            f"tokens/s ({eight / one:.2f}x)"
        )


if __name__ == "__main__":
    main()
