#!/usr/bin/env bash
# Measures the trainer's peak memory on a grid of configurations, for the
# memory model (src/memory.rs, tables/memory.toml).
#
#   scripts/memory_calibrate.sh [OUT.jsonl]   (default tests/data/memory_measurements.jsonl)
#
# For each line of the grid below it writes a seeded model with
# `examples/make_model.rs` (bf16 safetensors, as published), runs the real
# `train` binary for a few optimizer steps on records long enough to fill
# --seq-len, and records the process's peak RSS (`/usr/bin/time -f %M`, which
# covers loading, training, the checkpoint and the adapter export; three runs,
# and their median) beside the configuration, one JSON object per line. `cargo run --release --example
# memory_fit -- OUT.jsonl` then fits the coefficients of tables/memory.toml, and
# tests/memory_model.rs checks every recorded configuration against the model.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-tests/data/memory_measurements.jsonl}"
steps="${STEPS:-2}"
work="$(mktemp -d "${TMPDIR:-/tmp}/qlora-mem.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cargo build --release --bin train --example make_model >&2
bin="${CARGO_TARGET_DIR:-target}/release"

# Records of ~4000 characters: every batch row is cut at --seq-len.
mkdir -p "$work/data"
python3 - "$work/data/train.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l)["text"] for l in open("data/default/train.jsonl")]
with open(sys.argv[1], "w") as f:
    for i in range(64):
        text = " ".join(lines[(i * 7 + j) % len(lines)] for j in range(16))
        f.write(json.dumps({"text": text}) + "\n")
EOF

# name layers hidden inter heads kv vocab tie | batch seq rank lora_layers ckpt
# ("embedded" is train's built-in model: no --model, its own shape.)
grid=(
  "embedded 4 256  768  4 2   320 false | 4 128  8 4 ckpt"
  "embedded 4 256  768  4 2   320 false | 8 256 16 4 nockpt"
  "embedded 4 256  768  4 2   320 false | 8 512  8 4 ckpt"
  "s20m   4  512 1408  8 4 16000 true  | 4 128  8 4 ckpt"
  "s20m   4  512 1408  8 4 16000 true  | 4 128  8 4 nockpt"
  "s20m   4  512 1408  8 4 16000 true  | 8 256 16 4 nockpt"
  "s20m   4  512 1408  8 4 16000 true  | 16 128 8 4 ckpt"
  "w40m   6  512 3072  4 4 16000 true  | 4 256 16 6 nockpt"
  "w40m   6  512 3072  4 4 16000 true  | 8 256  8 6 ckpt"
  "w40m   6  512 3072  4 4 16000 true  | 2 512 16 6 ckpt"
  "v128k  2  256  768  4 2 128000 false | 4 128  8 2 nockpt"
  "v128k  2  256  768  4 2 128000 false | 8 256  8 2 ckpt"
  "v128k  2  256  768  4 2 128000 false | 2 128  8 2 ckpt"
  "s100m 12  768 2048 12 4 32000 true  | 4  64  8 12 ckpt"
  "s100m 12  768 2048 12 4 32000 true  | 4  64  8 12 nockpt"
  "s100m 12  768 2048 12 4 32000 true  | 2 256 32 8 ckpt"
  "s100m 12  768 2048 12 4 32000 true  | 2 256 32 8 nockpt"
  "s100m 12  768 2048 12 4 32000 true  | 8 128 64 4 nockpt"
  "s100m 12  768 2048 12 4 32000 true  | 8 128  8 12 ckpt"
  "s300m 16 1024 2816 16 8 32000 false | 2 128 16 16 ckpt"
  "s300m 16 1024 2816 16 8 32000 false | 4 128 16 8 nockpt"
  "s300m 16 1024 2816 16 8 32000 false | 1 512  8 16 ckpt"
  "s300m 16 1024 2816 16 8 32000 false | 1 512  8 4 nockpt"
  "s300m 16 1024 2816 16 8 32000 false | 4 256 16 8 ckpt"
)

: > "$out.tmp"
for row in "${grid[@]}"; do
  read -r name layers hidden inter heads kv vocab tie _ batch seq rank ll ck <<<"$row"
  model=()
  if [[ "$name" != embedded ]]; then
    model=(--model "$work/$name")
    if [[ ! -d "$work/$name" ]]; then
      "$bin/examples/make_model" --out "$work/$name" --layers "$layers" --hidden "$hidden" \
        --intermediate "$inter" --heads "$heads" --kv-heads "$kv" --vocab "$vocab" \
        --tie "$tie" >&2
    fi
  fi
  ckflag=--no-grad-checkpoint
  [[ "$ck" == ckpt ]] && ckflag=--grad-checkpoint
  # Three runs: the allocator's cached memory varies from run to run (about
  # +-10% on small runs), so the record keeps all three and the median is
  # the figure the model is held to.
  loads=()
  peaks=()
  for _ in 1 2 3; do
    rm -rf "$work/run"
    /usr/bin/time -f '%M' -o "$work/rss" "$bin/train" "${model[@]}" \
      --data-dir "$work/data" --output-dir "$work/run" --max-steps "$steps" \
      --batch-size "$batch" --seq-len "$seq" --lora-rank "$rank" --lora-layers "$ll" \
      "$ckflag" --grad-accum-steps 1 --eval-every 1000 --lora-dropout 0.05 \
      >/dev/null 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
    # "model ready: ... peak RSS N MiB so far": the peak while loading.
    loads+=("$(sed -n 's/.*model ready:.*peak RSS \([0-9.]*\) MiB.*/\1/p' "$work/log")")
    peaks+=("$(tail -1 "$work/rss")")
  done
  loads_csv="$(IFS=,; echo "${loads[*]}")"
  peaks_csv="$(IFS=,; echo "${peaks[*]}")"
  python3 - "$out.tmp" <<EOF
import json
row = {
  "name": "$name", "num_hidden_layers": $layers, "hidden_size": $hidden,
  "intermediate_size": $inter, "num_attention_heads": $heads,
  "num_key_value_heads": $kv, "vocab_size": $vocab,
  "tie_word_embeddings": "$tie" == "true",
  "batch_size": $batch, "seq_len": $seq, "lora_rank": $rank,
  "lora_layers": $ll, "grad_checkpoint": "$ck" == "ckpt",
  "quantize_embeddings": False,
  "measured_load_mib": sorted([$loads_csv])[1],
  "measured_peaks_mib": [round(k / 1024, 1) for k in [$peaks_csv]],
  "measured_peak_mib": round(sorted([$peaks_csv])[1] / 1024, 1),
}
open("$out.tmp", "a").write(json.dumps(row) + "\n")
print(json.dumps(row))
EOF
done
mv "$out.tmp" "$out"
echo "wrote $out" >&2
