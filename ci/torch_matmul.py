"""torch (cuBLAS) on the shapes the kiln benches measure, timed with CUDA events after a
warm-up; prints JSON with median seconds:
  "<dtype>/<n>"          a @ b.T, square n (benches/matmul.rs)
  "linear_bf16/<t>"      x @ W.T, x [t, 8192], W [8192, 8192] bf16 (benches/quant.rs)
  "adamw_fused/100M"     torch.optim.AdamW(fused=True).step() over 25 f32 tensors of 4M
                         with f32 gradients (benches/optim.rs, "plain")
  "sdpa_fwd", "sdpa_bwd" scaled_dot_product_attention (its flash backend), bf16, causal,
                         batch 4, 32 heads of 128, sequence 4096 (benches/attention.rs);
                         backward timed alone, from a retained graph
  "sdpa_decode"          one query token per head against an 8192-token cache with 8 kv
                         heads (grouped-query), bf16
"""
import json

import torch

RUNS = 20


def median_seconds(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


out = {}
for name, dtype in [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]:
    for n in [1024, 2048, 4096]:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        out[f"{name}/{n}"] = median_seconds(lambda: a @ b.T)
w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for t in [1, 16, 64, 512]:
    x = torch.randn(t, 8192, device="cuda", dtype=torch.bfloat16)
    out[f"linear_bf16/{t}"] = median_seconds(lambda: x @ w.T)
params = [torch.randn(4_000_000, device="cuda", requires_grad=True) for _ in range(25)]
for p in params:
    p.grad = torch.randn_like(p) * 0.1
opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
out["adamw_fused/100M"] = median_seconds(opt.step)
import torch.nn.functional as F

q, k, v = (torch.randn(4, 32, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
    out["sdpa_fwd"] = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.randn_like(o)
    out["sdpa_bwd"] = median_seconds(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
qd = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
kd, vd = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
out["sdpa_decode"] = median_seconds(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
print(json.dumps({"torch": torch.__version__, "tf32": torch.backends.cuda.matmul.allow_tf32, "times": out}))
