#!/usr/bin/env bash
# Data-parallel throughput: steps/s, tokens/s and all-reduce time per step of
# `train` on 1 and 2 MPI ranks, one thread per rank (RAYON_NUM_THREADS=1,
# which candle's CPU kernels follow too), plus 1 process on 2 threads.
#
# Usage: scripts/mpi_bench.sh [MODEL_DIR] [STEPS (16)]
#   MODEL_DIR: a model directory for `train --model`; without it the
#   ~100M-parameter model of `examples/make_model.rs` is written to a
#   temporary directory when that example exists, else the embedded model
#   trains.
# Needs Open MPI (README, "Several processes"). Figures: BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-}"
steps="${2:-16}"
seq=64
target="${CARGO_TARGET_DIR:-target}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export QLORA_SCALE_LOG=warn

cargo build --release --features mpi --bin train --example allreduce_time
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "$model" ] && [ -f examples/make_model.rs ]; then
  cargo build --release --example make_model
  model="$work/model"
  "$target/release/examples/make_model" --out "$model" >/dev/null
fi
model_args=()
if [ -n "$model" ]; then model_args=(--model "$model" --data-dir data/default); fi
bin="$target/release/train"
common=("${model_args[@]}" --profile-path "$work/none.json" --seq-len "$seq"
        --max-steps "$steps" --grad-accum-steps 1 --lora-rank 8 --lora-layers 8 --lora-dropout 0
        --eval-every 100000 --checkpoint-every 100000 --seed 1)

# Medians over the steps of metrics.jsonl, the first step left out
# (warm-up): step time (tokens / tokens_per_s) and tokens/s; the last step's
# validation and checkpoint are outside the step time.
# allreduce_ms includes the wait for the slowest rank; its minimum over the
# steps is close to the transfer alone.
summary() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(path)][1:]
med = lambda xs: sorted(xs)[len(xs) // 2]
# Medians: on a shared machine a few steps are slowed by other processes.
t = med([r["tokens"] / r["tokens_per_s"] for r in rows])
tok = med([r["tokens_per_s"] for r in rows])
ar = sorted(r["allreduce_ms"] for r in rows)
print(f"{name}\t{1 / t:.3f}\t{tok:.0f}\t{med(ar):.1f}\t{ar[0]:.1f}\t{max(r['peak_rss_mib'] for r in rows):.0f}")
EOF
}

run() { # NAME RANKS THREADS BATCH
  local out="$work/$1"
  rm -rf "$out"  # a new run each time (train refuses a used directory)
  if [ "$2" = 1 ]; then
    RAYON_NUM_THREADS="$3" "$bin" "${common[@]}" --batch-size "$4" --output-dir "$out"
  else
    RAYON_NUM_THREADS="$3" mpirun -np "$2" --bind-to none -x RAYON_NUM_THREADS \
      "$bin" "${common[@]}" --batch-size "$4" --output-dir "$out"
  fi
  summary "$1" "$out/metrics.jsonl"
}

echo "model: ${model:-embedded}; $steps steps of sequences up to $seq tokens; $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'run\tsteps_per_s\ttokens_per_s\tallreduce_ms_median\tallreduce_ms_min\tpeak_rss_MiB(rank 0)\n'
run "1 rank x 1 thread, batch 4" 1 1 4
run "1 rank x 2 threads, batch 4" 1 2 4
run "2 ranks x 1 thread, batch 2 each (global 4)" 2 1 2
run "2 ranks x 1 thread, batch 4 each (global 8)" 2 1 4
# The all-reduce alone, ranks arriving together (a barrier before each
# call), on a buffer the size of this model's: its adapters + 2.
floats=$(python3 - "$work/2 ranks x 1 thread, batch 2 each (global 4)/adapter_model.safetensors" <<'EOF'
import json, math, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
print(sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__") + 2)
EOF
)
mpirun -np 2 --bind-to none "$target/release/examples/allreduce_time" "$floats" 50
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
