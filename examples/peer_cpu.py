"""One CPU matmul peer of `cargo run --release --example peer_cpu`: numpy or torch.

peer_cpu.rs runs this script in its own python3 process per peer (`python3 -c <this file>
numpy|torch`), with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from that process's
environment so each library picks its own kernels for the CPU it finds. The job comes as JSON
on stdin:
    {"threads": 2, "budget_s": 1.0, "max_runs": 25, "min_runs": 3, "slow_calls": 5.0,
     "products": [{"m": 2048, "n": 576, "k": 576, "trans_a": false, "trans_b": true,
                   "dtype": "f32"}, ...]}
Operands are stored as kiln's side stores them: A is [m, k] ([k, m] with trans_a), B is
[k, n] ([n, k] with trans_b); the transposes are views, so each library sees the layout and
passes its own transpose flags. numpy has no bf16: its bf16 products are skipped (null).
torch's bf16 products write bf16 (its CPU `mm` has no f32 output for bf16 inputs).

The timing rule is the one kiln's side uses: one untimed call, then timed calls until
`max_runs` or until at least `min_runs` ran and `budget_s` has passed; the fastest counts. A
first call longer than `slow_calls` budgets is the measurement itself.

Output: any lines the libraries print, then one line `PEER_RESULT <json>` with "info" (the
library's version and which kernels it runs) and "seconds" (one per product, null if
skipped).
"""

import ctypes
import json
import os
import sys
import time

VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def best_seconds(fn, job):
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    if first > job["slow_calls"] * job["budget_s"]:
        return first
    fastest, spent, runs = float("inf"), 0.0, 0
    while runs < job["max_runs"] and (runs < job["min_runs"] or spent < job["budget_s"]):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        fastest, spent, runs = min(fastest, dt), spent + dt, runs + 1
    return fastest


def blas_info():
    """What threadpoolctl sees loaded: for OpenBLAS, the kernel family it chose."""
    try:
        import threadpoolctl
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    keep = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "prefix")
    return [{k: lib.get(k) for k in keep} for lib in threadpoolctl.threadpool_info()]


def operands(lib, p):
    a_shape = [p["k"], p["m"]] if p["trans_a"] else [p["m"], p["k"]]
    b_shape = [p["n"], p["k"]] if p["trans_b"] else [p["k"], p["n"]]
    if lib == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal(a_shape, dtype=np.float32)
        b = rng.standard_normal(b_shape, dtype=np.float32)
    else:
        import torch

        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[p["dtype"]]
        a = torch.randn(a_shape).to(dtype)
        b = torch.randn(b_shape).to(dtype)
    a = a.T if p["trans_a"] else a
    b = b.T if p["trans_b"] else b
    return a, b


def torch_kernel_probe(torch):
    """Which library each dtype's matmul calls here: MKL and oneDNN print a line per call
    when verbose, ATen's own loops print nothing. The lines go to C's stdout, so it is
    flushed around each probe to keep them under their marker."""
    libc = ctypes.CDLL(None)
    x = torch.randn(64, 64)
    for dtype in (torch.float32, torch.bfloat16):
        print(f"PROBE {str(dtype).removeprefix('torch.')}", flush=True)
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON), torch.backends.mkldnn.verbose(
            torch.backends.mkldnn.VERBOSE_ON
        ):
            y = x.to(dtype)
            y @ y.T
            y @ y
            y.T @ y
        libc.fflush(None)
    print("PROBE end", flush=True)


def main():
    lib = sys.argv[1]
    job = json.load(sys.stdin)
    info = {"removed": {v: os.environ.get(v, "absent") for v in VARIABLES}}
    if lib == "numpy":
        import numpy as np

        info["version"] = np.__version__
        mm = lambda a, b: a @ b
    else:
        import torch

        torch.set_num_threads(job["threads"])
        torch_kernel_probe(torch)
        info["version"] = torch.__version__
        info["num_threads"] = torch.get_num_threads()
        info["mkldnn_available"] = torch.backends.mkldnn.is_available()
        info["mkl_available"] = torch.backends.mkl.is_available()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        words = ("Math Kernel Library", "MKL-DNN", "oneDNN", "BLAS_INFO", "CPU capability")
        config = [line.strip() for line in torch.__config__.show().splitlines()]
        info["config"] = [line for line in config if any(w in line for w in words)]
        # Build settings are one long line: keep only the BLAS and MKL(-DNN) entries.
        info["config"] = [
            ", ".join(s for s in line.removeprefix("- Build settings: ").split(", ") if s.startswith(("BLAS_INFO", "USE_MKL")))
            if "Build settings" in line
            else line
            for line in info["config"]
        ]
        mm = lambda a, b: a @ b
    seconds = []
    for p in job["products"]:
        if lib == "numpy" and p["dtype"] != "f32":
            seconds.append(None)
            continue
        a, b = operands(lib, p)
        seconds.append(best_seconds(lambda: mm(a, b), job))
    info["blas"] = blas_info()
    print("PEER_RESULT " + json.dumps({"info": info, "seconds": seconds}), flush=True)


main()
