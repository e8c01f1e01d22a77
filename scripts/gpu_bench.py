#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh, run on a GPU machine with torch,
transformers and peft installed (nothing is downloaded).

  gpu_bench.py peak
      torch's bf16 matmul 8192^3: TFLOP/s (the bf16 peak the frozen matmuls
      are compared with).
  gpu_bench.py model --out DIR --layers L --hidden H --intermediate I
                     --heads Q --kv-heads K --vocab V [--untied] --tokenizer-from DIR
      a Llama-shaped model directory: config.json, model.safetensors (seeded
      random bf16 weights, made on the GPU), the tokenizer files copied.
  gpu_bench.py data --model DIR --out DIR --records N --seq-len T
      DIR/train.jsonl: N records of at least T tokens each (corpus texts
      joined), so every batch is N x T tokens on both sides.
  gpu_bench.py ours --train BIN --model DIR --data DIR --out DIR --steps S
                    --batch B --seq-len T --rank R [--checkpoint]
      `train --device cuda` on it; prints JSON: tokens/s (median of steps 2..),
      peak GPU memory (nvidia-smi, polled), the losses.
  gpu_bench.py peft --model DIR --data DIR --steps S --batch B --seq-len T
                    --rank R [--checkpoint]
      PEFT LoRA on a bf16 base, same model, batch and rank; prints the same
      JSON (plus torch's own peak).
  gpu_bench.py calibrate --train BIN --work DIR --out FILE --tokenizer-from DIR
      the GPU memory model's grid: per line, train 2 steps on CUDA and record
      the memory pool's peak beside the configuration (JSON lines, the format
      of tests/data/memory_measurements.jsonl) for fitting GPU coefficients.
  gpu_bench.py losses A/metrics.jsonl B/metrics.jsonl
      the two runs' losses side by side; exit 1 when a step differs by 2% or
      more.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Where PEFT runs: the GPU; `cpu` only to try this script's plumbing on a
# machine without one (scripts/gpu_check.sh's `small` stage, GPU_BENCH_DEVICE=cpu).
DEVICE = os.environ.get("GPU_BENCH_DEVICE", "cuda")
sys.path.insert(0, HERE)
# The same data rule and LoRA targets as the CPU comparison.
from vs_pytorch import TARGETS, tokenize  # noqa: E402


def peak(_a):
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    print(json.dumps({"bf16_matmul_tflops": 2 * n**3 / dt / 1e12, "device": torch.cuda.get_device_name()}))


def model(a):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(7)
    os.makedirs(a.out, exist_ok=True)
    h, i, q, k, v, layers = a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab, a.layers
    d = h // q
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
        "num_attention_heads": q, "num_key_value_heads": k, "head_dim": d,
        "vocab_size": v, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": not a.untied,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)

    def w(*shape):
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        return (torch.randn(*shape, device=dev, dtype=torch.bfloat16) * 0.02).cpu()

    tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if a.untied:
        tensors["lm_head.weight"] = w(v, h)
    for l in range(layers):
        p = f"model.layers.{l}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(q * d, h), p + "self_attn.k_proj.weight": w(k * d, h),
            p + "self_attn.v_proj.weight": w(k * d, h), p + "self_attn.o_proj.weight": w(h, q * d),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    save_file(tensors, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer_from, name), os.path.join(a.out, name))
    n = sum(t.numel() for t in tensors.values())
    print(json.dumps({"model": a.out, "parameters": n}))


def data(a):
    from tokenizers import Tokenizer

    with open(os.path.join(HERE, "..", "data", "default", "train.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "train.jsonl")
    j = 0
    with open(path, "w") as f:
        for _ in range(a.records):
            parts, n = [], 0
            while n < a.seq_len + 16:
                t = texts[j % len(texts)]
                j += 1
                parts.append(t)
                n += len(tok.encode(t, add_special_tokens=False).ids) + 1
            f.write(json.dumps({"text": " ".join(parts)}) + "\n")
    tokenize(a.model, path, a.seq_len)
    print(json.dumps({"data": path, "records": a.records}))


class GpuMemory:
    """Peak memory used on GPU 0, polled from nvidia-smi every 100 ms (the
    whole device: a CUDA context's few hundred MiB included)."""

    def __init__(self):
        self.peak_mib = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)

    def done(self):
        self.stop.set()
        self.thread.join()
        return self.peak_mib / 1024


def ours(a):
    out = a.out
    cmd = [a.train, "--device", DEVICE, "--model", a.model, "--data-dir", a.data,
           "--output-dir", out, "--overwrite", "--max-steps", str(a.steps),
           "--batch-size", str(a.batch), "--seq-len", str(a.seq_len),
           "--lora-rank", str(a.rank), "--lora-alpha", str(2 * a.rank), "--lora-dropout", "0",
           "--grad-accum-steps", "1", "--learning-rate", "1e-4", "--warmup-steps", "0",
           "--eval-every", "100000", "--checkpoint-every", "100000",
           "--grad-checkpoint" if a.checkpoint else "--no-grad-checkpoint"]
    mem = GpuMemory()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_gib = mem.done()
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        sys.exit(f"train failed with status {p.returncode}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in rows]
    print(json.dumps({
        "side": "train", "tokens_per_s": statistics.median(rates[1:] or rates),
        "gpu_peak_gib_nvidia_smi": peak_gib, "wall_s": wall,
        "gpu_pool_peak_gib": max(r.get("peak_gpu_mib") or 0 for r in rows) / 1024,
        "losses": [r["loss"] for r in rows],
        "log_tail": p.stderr.strip().splitlines()[-3:],
    }))


def peft(a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    mem = GpuMemory()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map=DEVICE)
    m.config.use_cache = False
    if a.checkpoint:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    m = get_peft_model(m, lora)
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    m.train()
    load_s = time.perf_counter() - t0
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    rows = tokenize(a.model, os.path.join(a.data, "train.jsonl"), a.seq_len)
    ids = torch.tensor(rows[: a.batch], dtype=torch.long, device=DEVICE)
    cuda = DEVICE == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    losses, rates = [], []
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync()
        rates.append(tokens / (time.perf_counter() - t0))
    print(json.dumps({
        "side": "peft", "tokens_per_s": statistics.median(rates[1:] or rates),
        "gpu_peak_gib_nvidia_smi": mem.done(),
        "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "load_s": load_s, "losses": losses, "trainable": sum(p.numel() for p in params),
    }))


# The GPU memory model's calibration grid (memory_calibrate.sh's format):
# name layers hidden inter heads kv vocab tie | batch seq rank ckpt
GRID = [
    "g300m 16 1024 2816 16 8 32000 false | 2 512 16 ckpt",
    "g300m 16 1024 2816 16 8 32000 false | 4 1024 16 nockpt",
    "g300m 16 1024 2816 16 8 32000 false | 1 2048 8 ckpt",
    "g1b 16 2048 8192 32 8 128256 true | 1 2048 16 ckpt",
    "g1b 16 2048 8192 32 8 128256 true | 4 512 16 nockpt",
    "g1b 16 2048 8192 32 8 128256 true | 2 1024 64 ckpt",
    "g3b 28 3072 8192 24 8 128256 true | 1 2048 16 ckpt",
    "g3b 28 3072 8192 24 8 128256 true | 2 512 16 nockpt",
]


def calibrate(a):
    """Each grid line: a model (made once per name), `train --device cuda`
    for 2 steps, the pool's peak GPU memory; one JSON line each into
    a.out, as tests/data/memory_measurements.jsonl holds the CPU's."""
    made = {}
    with open(a.out, "w") as out:
        for line in GRID:
            shape, run = line.split("|")
            name, layers, hidden, inter, heads, kv, vocab, tie = shape.split()
            batch, seq, rank, ckpt = run.split()
            m = os.path.join(a.work, name)
            if name not in made:
                for old in made.values():
                    shutil.rmtree(old, ignore_errors=True)
                made = {name: m}
                margs = argparse.Namespace(out=m, layers=int(layers), hidden=int(hidden),
                                           intermediate=int(inter), heads=int(heads), kv_heads=int(kv),
                                           vocab=int(vocab), untied=tie != "true", tokenizer_from=a.tokenizer_from)
                model(margs)
            d = os.path.join(a.work, f"data-{name}-{seq}")
            data(argparse.Namespace(model=m, out=d, records=int(batch), seq_len=int(seq)))
            r = os.path.join(a.work, "run")
            cmd = [a.train, "--device", "cuda", "--model", m, "--data-dir", d, "--output-dir", r,
                   "--overwrite", "--max-steps", "2", "--batch-size", batch, "--seq-len", seq,
                   "--lora-rank", rank, "--eval-every", "100000", "--checkpoint-every", "100000",
                   "--grad-checkpoint" if ckpt == "ckpt" else "--no-grad-checkpoint"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.stderr.write(p.stderr[-3000:])
                print(json.dumps({"grid": line, "failed": p.returncode}))
                continue
            with open(os.path.join(r, "metrics.jsonl")) as f:
                peak = max(json.loads(x).get("peak_gpu_mib") or 0 for x in f)
            row = {"name": name, "num_hidden_layers": int(layers), "hidden_size": int(hidden),
                   "intermediate_size": int(inter), "num_attention_heads": int(heads),
                   "num_key_value_heads": int(kv), "vocab_size": int(vocab),
                   "tie_word_embeddings": tie == "true", "batch_size": int(batch), "seq_len": int(seq),
                   "lora_rank": int(rank), "lora_layers": int(layers), "grad_checkpoint": ckpt == "ckpt",
                   "quantize_embeddings": False, "device": "cuda", "measured_peak_mib": peak}
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row))


def losses(a):
    def read(path):
        with open(path) as f:
            return [json.loads(line)["loss"] for line in f]

    x, y = read(a.a), read(a.b)
    worst = 0.0
    for step, (u, v) in enumerate(zip(x, y), 1):
        rel = abs(u - v) / abs(v)
        worst = max(worst, rel)
        print(f"step {step:3}: {u:.5f} {v:.5f} ({100 * rel:.2f}%)")
    print(json.dumps({"steps": min(len(x), len(y)), "worst_relative": worst}))
    if len(x) != len(y) or worst >= 0.02:
        sys.exit(f"losses differ by {100 * worst:.2f}% (steps {len(x)} and {len(y)})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("peak")
    m = sub.add_parser("model")
    m.add_argument("--out", required=True)
    for name in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        m.add_argument(f"--{name}", type=int, required=True)
    m.add_argument("--untied", action="store_true")
    m.add_argument("--tokenizer-from", required=True)
    d = sub.add_parser("data")
    d.add_argument("--model", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--records", type=int, required=True)
    d.add_argument("--seq-len", type=int, required=True)
    for q in (sub.add_parser("ours"), sub.add_parser("peft")):
        q.add_argument("--model", required=True)
        q.add_argument("--data", required=True)
        q.add_argument("--steps", type=int, required=True)
        q.add_argument("--batch", type=int, required=True)
        q.add_argument("--seq-len", type=int, required=True)
        q.add_argument("--rank", type=int, required=True)
        q.add_argument("--checkpoint", action="store_true")
        if q.prog.endswith("ours"):
            q.add_argument("--train", required=True)
            q.add_argument("--out", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--train", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tokenizer-from", required=True)
    l = sub.add_parser("losses")
    l.add_argument("a")
    l.add_argument("b")
    a = p.parse_args()
    {"peak": peak, "model": model, "data": data, "ours": ours, "peft": peft, "calibrate": calibrate,
     "losses": losses}[a.cmd](a)


if __name__ == "__main__":
    main()
