"""torch.matmul (cuBLAS) on the shapes benches/matmul.rs measures: a @ b.T, square n.

Prints JSON: {"<dtype>/<n>": median seconds}. Timed with CUDA events after a warm-up.
"""
import json

import torch

RUNS = 20
out = {}
for name, dtype in [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]:
    for n in [1024, 2048, 4096]:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b.T
        times = []
        for _ in range(RUNS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b.T
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        out[f"{name}/{n}"] = times[len(times) // 2]
print(json.dumps({"torch": torch.__version__, "tf32": torch.backends.cuda.matmul.allow_tf32, "times": out}))
