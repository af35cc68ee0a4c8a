"""Joins criterion's CUDA estimates with torch's times (ci/torch_matmul.py) into markdown."""
import json
import os
import sys

out = sys.argv[1]
root = os.path.join(out, "criterion")
try:
    with open(os.path.join(out, "torch.json")) as f:
        data = json.load(f)
    torch, header = data["times"], f"torch {data['torch']} (tf32 {data['tf32']})"
except (OSError, ValueError, KeyError):
    torch, header = {}, "torch: not measured"

# (group, function, parameter) -> (median seconds, throughput dict)
results = {}
for dirpath, _, files in os.walk(root):
    if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
        continue
    with open(os.path.join(dirpath, "estimates.json")) as f:
        secs = json.load(f)["median"]["point_estimate"] / 1e9
    with open(os.path.join(dirpath, "benchmark.json")) as f:
        bench = json.load(f)
    results[(bench["group_id"], bench.get("function_id"), bench.get("value_str"))] = (secs, bench.get("throughput") or {})

with open(os.path.join(out, "gpu.txt")) as f:
    print("GPU:", " ".join(f.read().split()))
print(header)


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}" if theirs else "-"


print("\n## matmul (a @ b.T): kiln time / cuBLAS time\n")
print("| group | dtype | n | kiln ms | TFLOP/s | cuBLAS ms | kiln / cuBLAS |")
print("|---|---|---|---|---|---|---|")
for (group, fn, param), (secs, tp) in sorted(results.items()):
    if not group.startswith("matmul/cuda"):
        continue
    dtype = fn.split("_")[0]
    ref = torch.get(f"{dtype}/{param}")
    flops = tp.get("Elements", 0)
    print(f"| {group} | {fn} | {param} | {secs * 1e3:.3f} | {flops / secs / 1e12:.1f} | "
          f"{ref * 1e3 if ref else float('nan'):.3f} | {ratio(secs, ref)} |")

print("\n## quantized GEMV, batch 1, 8192x8192: GB/s of weight bytes; torch bf16 x @ W.T time / kiln time\n")
print("| group | format | kiln us | GB/s | of copy GB/s | torch bf16 us | speed-up over torch |")
print("|---|---|---|---|---|---|---|")
for (group, fn, param), (secs, tp) in sorted(results.items()):
    if not group.startswith("quant_gemv/cuda"):
        continue
    copy = results.get((group, "copy", param))
    copy_gbs = copy[1].get("Bytes", 0) / copy[0] / 1e9 if copy else 0
    gbs = tp.get("Bytes", 0) / secs / 1e9
    ref = torch.get("linear_bf16/1")
    share = f"{gbs / copy_gbs:.2f}" if copy_gbs else "-"
    speedup = f"{ref / secs:.2f}" if ref else "-"
    print(f"| {group} | {fn} | {secs * 1e6:.1f} | {gbs:.0f} | {share} | {ref * 1e6 if ref else float('nan'):.1f} | {speedup} |")

print("\n## quantized GEMM, 8192x8192: torch bf16 time / kiln time\n")
print("| group | format | tokens | kiln us | TFLOP/s | torch bf16 us | speed-up over torch |")
print("|---|---|---|---|---|---|---|")
for (group, fn, param), (secs, tp) in sorted(results.items()):
    if not group.startswith("quant_gemm/cuda"):
        continue
    tokens = param.split("/t")[-1]
    ref = torch.get(f"linear_bf16/{tokens}")
    flops = tp.get("Elements", 0)
    speedup = f"{ref / secs:.2f}" if ref else "-"
    print(f"| {group} | {fn} | {tokens} | {secs * 1e6:.1f} | {flops / secs / 1e12:.1f} | "
          f"{ref * 1e6 if ref else float('nan'):.1f} | {speedup} |")

print("\n## fused AdamW, 100M parameters: GB/s read + written; torch fused AdamW time / kiln time\n")
print("| group | config | kiln ms | GB/s | of copy GB/s | torch fused ms | speed-up over torch |")
print("|---|---|---|---|---|---|---|")
for (group, fn, param), (secs, tp) in sorted(results.items()):
    if not group.startswith("adamw/cuda") or fn == "copy":
        continue
    copies = [v for (g, f, _), v in results.items() if g == group and f == "copy"]
    copy_gbs = copies[0][1].get("Bytes", 0) / copies[0][0] / 1e9 if copies else 0
    gbs = tp.get("Bytes", 0) / secs / 1e9
    ref = torch.get("adamw_fused/100M") if fn == "plain" else None
    share = f"{gbs / copy_gbs:.2f}" if copy_gbs else "-"
    speedup = f"{ref / secs:.2f}" if ref else "-"
    print(f"| {group} | {fn} | {secs * 1e3:.2f} | {gbs:.0f} | {share} | {ref * 1e3 if ref else float('nan'):.2f} | {speedup} |")

print("\n## LoRA: time over the base product (layer) and over one adapter (batched)\n")
print("| group | bench | kiln us | ratio |")
print("|---|---|---|---|")
for (group, fn, param), (secs, tp) in sorted(results.items()):
    if not group.startswith("lora_") or "/cuda" not in group:
        continue
    ref_fn = "base" if group.startswith("lora_layer") else "adapters1"
    ref = results.get((group, ref_fn, param))
    ratio = f"{secs / ref[0]:.2f}" if ref else "-"
    print(f"| {group} | {fn} | {secs * 1e6:.1f} | {ratio} |")

print("\n## attention: TFLOP/s of unmasked work; torch sdpa (flash) time / kiln time; decode GB/s of cache read\n")
print("| group | shape | kiln ms | TFLOP/s or GB/s | torch ms | speed-up over torch | of copy GB/s |")
print("|---|---|---|---|---|---|---|")
for (group, fn, param), (secs, tp) in sorted(results.items()):
    if not group.startswith("attention_") or "/cuda" not in group or fn == "copy":
        continue
    kind = group.split("/")[0].split("_")[1]
    ref = torch.get(f"sdpa_{kind}")
    speedup = f"{ref / secs:.2f}" if ref else "-"
    if kind == "decode":
        copy = results.get((group, "copy", param))
        copy_gbs = copy[1].get("Bytes", 0) / copy[0] / 1e9 if copy else 0
        rate = tp.get("Bytes", 0) / secs / 1e9
        share = f"{rate / copy_gbs:.2f}" if copy_gbs else "-"
        rate_s = f"{rate:.0f} GB/s"
    else:
        rate_s, share = f"{tp.get('Elements', 0) / secs / 1e12:.1f}", "-"
    print(f"| {group} | {param} | {secs * 1e3:.3f} | {rate_s} | {ref * 1e3 if ref else float('nan'):.3f} | {speedup} | {share} |")
