"""Joins criterion's estimates for matmul/cuda:* with torch's times into a markdown table."""
import json
import os
import sys

out = sys.argv[1]
root = os.path.join(out, "criterion")
torch = {}
try:
    with open(os.path.join(out, "torch.json")) as f:
        data = json.load(f)
        torch = data["times"]
        header = f"torch {data['torch']} (tf32 {data['tf32']})"
except (OSError, ValueError, KeyError):
    header = "torch: not measured"

with open(os.path.join(out, "gpu.txt")) as f:
    print("GPU:", " ".join(f.read().split()))
print(header)
print()
print("| bench | n | kiln ms | TFLOP/s | cuBLAS ms | kiln / cuBLAS time |")
print("|---|---|---|---|---|---|")
for dirpath, _, files in sorted(os.walk(root)):
    if "estimates.json" not in files or not dirpath.endswith("new"):
        continue
    rel = os.path.relpath(os.path.dirname(dirpath), root)  # matmul_cuda_0/bf16_nt/4096
    parts = rel.split(os.sep)
    if len(parts) < 3:
        continue
    dtype, n = parts[-2].split("_")[0], parts[-1]
    with open(os.path.join(dirpath, "estimates.json")) as f:
        secs = json.load(f)["median"]["point_estimate"] / 1e9
    tflops = 2 * int(n) ** 3 / secs / 1e12
    ref = torch.get(f"{dtype}/{n}")
    ratio = f"{secs / ref:.2f}" if ref else "-"
    ref_ms = f"{ref * 1e3:.3f}" if ref else "-"
    print(f"| {'/'.join(parts[:-1])} | {n} | {secs * 1e3:.3f} | {tflops:.1f} | {ref_ms} | {ratio} |")
