#!/usr/bin/env bash
# Tokens per second and peak memory of `train`: the embedded default run and
# a ~100M-parameter Llama-shaped model (examples/make_model.rs, bf16
# safetensors) on the shipped corpus.
#
#   scripts/train_bench.sh [STEPS_100M]     (default 12)
#
# Prints one Markdown row per run: model, settings, steps, mean target
# tokens/s over the steps after the first, peak RSS (MiB, the whole process).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-12}"
work="$(mktemp -d "${TMPDIR:-/tmp}/qlora-bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cargo build --release --bin train --example make_model >&2
bin="${CARGO_TARGET_DIR:-target}/release"

row() {
  local label="$1" settings="$2"
  shift 2
  rm -rf "$work/run"  # each row is a new run (train refuses a used directory)
  /usr/bin/time -f '%M' -o "$work/rss" "$bin/train" --output-dir "$work/run" "$@" \
    >/dev/null 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
  python3 - "$label" "$settings" "$work/run/metrics.jsonl" "$(tail -1 "$work/rss")" <<'EOF'
import json, sys
label, settings, metrics, rss_kib = sys.argv[1:]
rows = [json.loads(l) for l in open(metrics)]
rest = rows[1:] or rows
tps = sum(r["tokens_per_s"] for r in rest) / len(rest)
print(f"| {label} | {settings} | {len(rows)} | {tps:,.0f} | {int(rss_kib) / 1024:,.0f} |")
EOF
  rm -rf "$work/run"
}

echo "| model | settings | steps | tokens/s | peak RSS MiB |"
echo "|---|---|---|---|---|"
row "embedded (4 x 256)" "no flags (README's first command)"
"$bin/examples/make_model" --out "$work/m100" >&2
row "~100M (12 x 768, vocab 32000)" "batch 4 x 128 tokens, rank 8, 12 blocks, checkpointing" \
  --model "$work/m100" --max-steps "$steps" --batch-size 4 --seq-len 128 --lora-rank 8 \
  --lora-layers 12 --grad-checkpoint --grad-accum-steps 1 --eval-every 1000
row "~100M (12 x 768, vocab 32000)" "batch 4 x 128 tokens, rank 8, 12 blocks, no checkpointing" \
  --model "$work/m100" --max-steps "$steps" --batch-size 4 --seq-len 128 --lora-rank 8 \
  --lora-layers 12 --no-grad-checkpoint --grad-accum-steps 1 --eval-every 1000
