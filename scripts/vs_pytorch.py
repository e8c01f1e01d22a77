#!/usr/bin/env python3
"""Side by side: `train` against PyTorch + PEFT on a bitsandbytes NF4 base.

Run through scripts/vs_pytorch.sh, which builds `train`, writes the model and
makes the virtual environment. Two roles:

  vs_pytorch.py compare --train BIN --model DIR --work DIR [--rounds N] ...
      writes the data, runs both sides interleaved (ours, PEFT, ours, PEFT,
      ...) with and without gradient checkpointing, checks that they train
      the same thing and prints tokens/s and peak RSS medians and ratios.
  vs_pytorch.py peft --model DIR --data FILE ...
      one PEFT run (a child of `compare`): prints one JSON line.

Both sides train the same records (4 records, each longer than the sequence,
so that every batch is full and the step-1 batch is the same whatever the
shuffle), LoRA rank 8, alpha 16, no dropout, on all seven linears of every
block, AdamW, gradient clipping at 1.0. Tokens/s counts target tokens (127
per 128-token record) over one optimizer step, as `train`'s metrics do; a
run's figure is the median of its steps after the first. Peak RSS is the
child process's own (wait4's ru_maxrss).

`--dtype bf16` multiplies the frozen weights in bf16 on both sides: `train
--cpu-matmul bf16` (every frozen product, the blocks' and the head's, with
bf16 operands and f32 sums) against bitsandbytes' `bnb_4bit_compute_dtype =
bfloat16` (the blocks' NF4 products in bf16; the tied head, not a 4-bit
layer, stays f32). Activations, adapters and the loss stay f32 on both.
`--peft-dtype` gives PEFT's side another one (`train`'s bf16 products
against PEFT's default f32 compute, say).

Same thing: the trainable parameter counts must be equal and the step-1
losses (before any update, so the base model's loss: LoRA's B starts at
zero) within 1e-3. The model is stored in bf16, so both sides start from
the same values: each quantizes the seven linears of every block to NF4 and
keeps the tied embedding / head 16-bit, as QLoRA does (`train`'s default;
bitsandbytes leaves non-Linear modules alone).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECORDS = 4


def tokenize(model_dir, data_file, seq_len):
    """Our data rule for `{"text": ...}` records: BOS, the text's tokens
    (tokenizer.json, no special tokens added), EOS; cut to seq_len."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        bos = tok.token_to_id(json.load(f)["bos_token"])
    rows = []
    with open(data_file) as f:
        for line in f:
            ids = [bos] + tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
            if len(ids) < seq_len:
                sys.exit(f"{data_file}: a record of {len(ids)} tokens, shorter than {seq_len}")
            rows.append(ids[:seq_len])
    return rows


def peft_run(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32,
        bnb_4bit_use_double_quant=False,
    )
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=q, dtype=torch.float32)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=a.checkpoint,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    rows = tokenize(a.model, a.data, a.seq_len)
    ids = torch.tensor(rows[: a.batch], dtype=torch.long)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    losses, rates = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(tokens / (time.perf_counter() - t0))
        losses.append(loss.item())
    print(json.dumps({
        "trainable": sum(p.numel() for p in params),
        "loss1": losses[0],
        "tokens_per_s": statistics.median(rates[1:] or rates),
        "losses": losses,
    }))


def adapter_params(path):
    """Elements in a safetensors file, from its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            count = 1
            for d in v["shape"]:
                count *= d
            total += count
    return total


def layers(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def run_child(cmd, env, log):
    """Runs cmd, its output into log; returns its peak RSS in MiB."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        with open(log) as f:
            sys.stderr.write(f.read()[-4000:])
        sys.exit(f"{cmd[0]} failed with status {p.returncode} (log {log})")
    return usage.ru_maxrss / 1024


def ours(a, ckpt, env, n):
    out = os.path.join(a.work, f"run-{n}")
    cmd = [a.train, "--model", a.model, "--data-dir", os.path.join(a.work, "data"),
           "--output-dir", out, "--overwrite", "--max-steps", str(a.steps),
           "--batch-size", str(RECORDS), "--seq-len", str(a.seq_len),
           "--lora-rank", str(a.rank), "--lora-alpha", str(2 * a.rank), "--lora-dropout", "0",
           "--lora-layers", str(layers(a.model)), "--grad-accum-steps", "1",
           "--learning-rate", str(a.lr), "--weight-decay", "0", "--grad-clip", "1.0",
           "--eval-every", "100000", "--checkpoint-every", "100000",
           "--grad-checkpoint" if ckpt else "--no-grad-checkpoint", "--cpu-matmul", a.dtype]
    rss = run_child(cmd, env, os.path.join(a.work, f"ours-{n}.log"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in rows]
    return {
        "trainable": adapter_params(os.path.join(out, "adapter_model.safetensors")),
        "loss1": rows[0]["loss"],
        "tokens_per_s": statistics.median(rates[1:] or rates),
        "rss": rss,
    }


def peft(a, ckpt, env, n):
    cmd = [sys.executable, os.path.abspath(__file__), "peft", "--model", a.model,
           "--data", os.path.join(a.work, "data", "train.jsonl"), "--steps", str(a.steps),
           "--batch", str(RECORDS), "--seq-len", str(a.seq_len), "--rank", str(a.rank),
           "--lr", str(a.lr), "--threads", str(a.threads), "--dtype", a.peft_dtype or a.dtype] + (["--checkpoint"] if ckpt else [])
    log = os.path.join(a.work, f"peft-{n}.log")
    rss = run_child(cmd, env, log)
    with open(log) as f:
        result = json.loads([line for line in f if line.startswith("{")][-1])
    result["rss"] = rss
    return result


def write_data(a):
    """RECORDS records of 8 corpus texts each, so each is longer than seq_len."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "default", "train.jsonl")
    with open(src) as f:
        texts = [json.loads(line)["text"] for line in f]
    os.makedirs(os.path.join(a.work, "data"), exist_ok=True)
    with open(os.path.join(a.work, "data", "train.jsonl"), "w") as f:
        for i in range(RECORDS):
            f.write(json.dumps({"text": " ".join(texts[8 * i: 8 * i + 8])}) + "\n")
    tokenize(a.model, os.path.join(a.work, "data", "train.jsonl"), a.seq_len)


def med(xs):
    return statistics.median(xs)


def report(results):
    print("| checkpointing | side | tokens/s median (min-max) | peak RSS MiB median | step-1 loss | trainable |")
    print("|---|---|---|---|---|---|")
    ok, worst = True, 0.0
    for ckpt in (False, True):
        for side in ("ours", "peft"):
            rs = results[(ckpt, side)]
            tps = [r["tokens_per_s"] for r in rs]
            print(f"| {'yes' if ckpt else 'no'} | {'train' if side == 'ours' else 'PyTorch + PEFT'} "
                  f"| {med(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) | {med([r['rss'] for r in rs]):.0f} "
                  f"| {rs[0]['loss1']:.5f} | {rs[0]['trainable']:,} |")
    print()
    for ckpt in (False, True):
        o, p = results[(ckpt, "ours")], results[(ckpt, "peft")]
        speed = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(o, p)]
        rss = [x["rss"] / y["rss"] for x, y in zip(o, p)]
        print(f"checkpointing {'on ' if ckpt else 'off'}: train / PEFT tokens/s {med(speed):.2f}x "
              f"(pairs {', '.join(f'{s:.2f}' for s in speed)}), peak RSS {med(rss):.2f}x")
        for x, y in zip(o, p):
            worst = max(worst, abs(x["loss1"] - y["loss1"]))
            if x["trainable"] != y["trainable"]:
                print(f"MISMATCH: trainable parameters {x['trainable']} (train) vs {y['trainable']} (PEFT)")
                ok = False
            if abs(x["loss1"] - y["loss1"]) > 1e-3:
                print(f"MISMATCH: step-1 loss {x['loss1']:.6f} (train) vs {y['loss1']:.6f} (PEFT)")
                ok = False
    print(f"same thing trained: trainable counts equal, step-1 losses within 1e-3 (largest difference {worst:.2e})" if ok else
          "the two sides do NOT train the same thing (see MISMATCH above)")
    return ok


def compare(a):
    write_data(a)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    results = {(c, s): [] for c in (False, True) for s in ("ours", "peft")}
    n = 0
    for r in range(a.rounds):
        for ckpt in (False, True):
            for side, fn in (("ours", ours), ("peft", peft)):
                n += 1
                res = fn(a, ckpt, env, n)
                results[(ckpt, side)].append(res)
                print(f"round {r + 1} checkpointing={ckpt} {side}: {res['tokens_per_s']:.1f} tokens/s, "
                      f"{res['rss']:.0f} MiB, step-1 loss {res['loss1']:.5f}", file=sys.stderr, flush=True)
    sys.exit(0 if report(results) else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--train", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--steps", type=int, default=6)
    for q in (c, sub.add_parser("peft")):
        q.add_argument("--seq-len", type=int, default=128)
        q.add_argument("--rank", type=int, default=8)
        q.add_argument("--lr", type=float, default=2e-4)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                       help="the frozen products' operands (see the module doc)")
    c.add_argument("--peft-dtype", choices=["f32", "bf16"], default=None,
                   help="PEFT's side only, when it differs from --dtype")
    pp = sub.choices["peft"]
    pp.add_argument("--model", required=True)
    pp.add_argument("--data", required=True)
    pp.add_argument("--steps", type=int, default=6)
    pp.add_argument("--batch", type=int, default=RECORDS)
    pp.add_argument("--checkpoint", action="store_true")
    pp.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    compare(a) if a.cmd == "compare" else peft_run(a)


if __name__ == "__main__":
    main()
