#!/usr/bin/env python3
"""The fine-tune job's training speed against PyTorch + PEFT doing the same run, one command.

    python3 examples/peer_finetune.py [--steps 12] [--threads 2] [--out DIR]

1. kiln: `target/release/examples/finetune --steps N --device cpu --out DIR` (build it first
   with `cargo build --release --example finetune`): the default run (SmolLM2-135M-Instruct,
   Q4_1 base, LoRA rank 16 / alpha 32 on all seven projections, batches of 8, the company
   data set and the replay examples) cut to N steps. Its tokens/s is read from
   DIR/metrics.jsonl: every token of every sequence trained on, padding not counted, over
   steps 2..N (the first step warms the allocator).
2. PyTorch + PEFT, in a process of its own, on the very same token sequences: the chat
   records of DIR/data/train.jsonl rendered with the model's chat template (loss on the
   assistant's tokens, as kiln's loader counts them) and the replay sequences kiln saved in
   DIR/baseline.json; transformers loads the GGUF dequantized (f32), PEFT adds LoRA with the
   same rank, alpha and targets; AdamW with the same learning rate and clipping; batches of 8
   sequences grouped by length, padded on the right; N steps, tokens/s counted the same way.
   OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from its process only; threadpoolctl
   names the BLAS it loaded.

Prints both, and kiln / PyTorch. Not part of CI.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORCING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, RANK, ALPHA, LR = 8, 16, 32, 2e-3


def default_model():
    cache = os.environ.get("KILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")
    return Path(cache) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def kiln_run(steps, threads, out):
    binary = REPO / "target" / "release" / "examples" / "finetune"
    if not binary.is_file():
        sys.exit(f"{binary} is missing: cargo build --release --example finetune")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run([str(binary), "--steps", str(steps), "--device", "cpu", "--out", str(out),
                    "--eval-every", str(steps + 1)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    timed = lines[1:]
    tokens = sum(l["tokens"] for l in timed)
    seconds = sum(l["tokens"] / l["tokens_per_s"] for l in timed)
    return tokens / seconds


def torch_sequences(out, tokenizer):
    """(ids, labels) of every training sequence: chat records masked to the assistant's
    turns (the prefix renders' lengths, as kiln's loader counts), then the replay pairs."""
    sequences = []
    for line in (out / "data" / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [i if start >= len(prefix) else -100 for i, (start, _) in zip(ids, enc["offset_mapping"])]
        sequences.append((ids, labels))
    baseline = json.loads((out / "baseline.json").read_text())
    for prompt, answer in baseline.get("replay") or []:
        sequences.append((prompt + answer, [-100] * len(prompt) + answer))
    return sequences


def torch_run(model_path, steps, threads, out):
    """Runs in a child process: PyTorch + PEFT on kiln's data, prints tokens/s as JSON."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from threadpoolctl import threadpool_info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    folder, name = str(model_path.parent), model_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    sequences = torch_sequences(out, tokenizer)
    random.Random(0).shuffle(sequences)
    # Length-grouped batches, as kiln's loader groups them.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    random.Random(1).shuffle(batches)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    timed_tokens, timed_seconds = 0, 0.0
    model.train()
    for step in range(steps):
        batch = [sequences[i] for i in batches[step % len(batches)]]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in batch])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch])
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if step > 0:
            timed_tokens += sum(len(s) for s, _ in batch)
            timed_seconds += seconds
    blas = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()]
    print(json.dumps({"tokens_per_s": timed_tokens / timed_seconds, "blas": blas, "torch": torch.__version__}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kiln-peer-finetune"))
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_run(args.model, args.steps, args.threads, args.out)
        return
    kiln = kiln_run(args.steps, args.threads, args.out)
    env = {k: v for k, v in os.environ.items() if k not in FORCING_VARIABLES}
    child = subprocess.run([sys.executable, __file__, "--torch-child", "--steps", str(args.steps), "--threads",
                            str(args.threads), "--out", str(args.out), "--model", str(args.model)],
                           env=env, check=True, capture_output=True, text=True)
    peer = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps({"kiln_tokens_per_s": kiln, "pytorch": peer}))
    print(f"training tokens/s, {args.steps} steps of {BATCH} sequences, {args.threads} threads")
    print(f"  kiln (Q4_1 base, f32 activations)  {kiln:8.1f}")
    print(f"  PyTorch + PEFT (f32)                {peer['tokens_per_s']:8.1f}   BLAS {peer['blas']}")
    print(f"  kiln / PyTorch                      {kiln / peer['tokens_per_s']:8.2f}")


if __name__ == "__main__":
    main()
