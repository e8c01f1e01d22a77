#!/usr/bin/env bash
# The GPU check of issue #20, run ON a GPU machine (CUDA 13 driver, python3
# with torch, transformers and peft; no Rust, no package access) over what
# scripts/gpu_pack.sh built elsewhere:
#
#   bash scripts/gpu_check.sh [CARRY]      (default target/gpu-carry)
#
# Stages (STAGES="tests peak embedded small 1b 8b" by default; each has a time
# limit, and a failed stage does not stop the next):
#   tests     tests/gpu.rs: NF4 kernel = CPU codec bit for bit, frozen op,
#             loss kernels, LoRA gradients against the CPU, checkpoint
#             GPU -> CPU -> GPU; then the frozen matmul's TFLOP/s
#   peak      torch's bf16 matmul 8192^3, the peak the frozen matmuls are
#             compared with
#   embedded  the built-in model, 20 steps on CUDA and on the CPU, same seed:
#             losses within 2%
#   small     a 20M-parameter model, batch 4 x 2048, both sides: the plumbing
#             of the 1b and 8b stages, checked in seconds
#   1b        a Llama-3.2-1B-shaped model, batch 4 x 2048, rank 16: train
#             against PEFT LoRA on a bf16 base (tokens/s, peak GPU memory)
#   8b        a Llama-3-8B-shaped model, batch 1 x 2048, rank 16,
#             checkpointing: the same two sides
#   calibrate (only when named) the GPU memory model's measurements
# Results: the console and $OUT (or $WORK/out): one log per stage and
# results.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
carry="$(cd "${1:-target/gpu-carry}" && pwd)"
work="${WORK:-/tmp/gpu-check}"
res="${OUT:-$work/out}"
stages="${STAGES:-tests peak embedded small 1b 8b}"
mkdir -p "$work" "$res"
py="${PYTHON:-python3}"
# `timeout` runs programs, not shell functions: the Python half as a command.
bench=("$py" scripts/gpu_bench.py)
say() { printf '\n== %s\n' "$*"; }
failed=()

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | sed -n 's/^Model name: *//p'
"$py" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'

# The binaries, and the CUDA 13 libraries they link: the CUDA install's and
# those of the Python packages (nvidia-cublas, nvidia-curand, ...).
xz -dc "$carry/train.xz" >"$work/train" && chmod +x "$work/train"
xz -dc "$carry/gpu-tests.xz" >"$work/gpu-tests" && chmod +x "$work/gpu-tests"
libs="$("$py" - <<'PY'
import glob, os, site
want = ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10", "libnvrtc.so.13")
roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
for s in site.getsitepackages():
    roots += glob.glob(os.path.join(s, "nvidia", "*", "lib")) + glob.glob(os.path.join(s, "nvidia", "*", "*", "lib"))
dirs = []
for w in want:
    for r in roots:
        if os.path.exists(os.path.join(r, w)):
            if r not in dirs:
                dirs.append(r)
            break
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$work/train" | grep 'not found'; then
  echo "gpu_check: libraries missing (above)"
  exit 1
fi

stage() { # NAME SECONDS COMMAND...
  local name="$1" secs="$2"
  shift 2
  say "$name"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$res/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "-- $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" != 0 ]; then failed+=("$name"); fi
  grep -h '^{' "$res/$name.log" >>"$res/results.jsonl" || true
}

has() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if has tests; then
  stage gpu-tests 240 "$work/gpu-tests" --test-threads 1 --nocapture
  stage frozen-tflops 60 "$work/gpu-tests" --ignored --nocapture frozen_matmul_tflops
fi
has peak && stage peak 60 "${bench[@]}" peak

if has embedded; then
  common=(--max-steps 20 --seed 1 --batch-size 4 --lora-rank 8 --eval-every 1000
          --checkpoint-every 1000 --overwrite)
  stage embedded-cuda 120 "$work/train" --device cuda --output-dir "$work/emb-cuda" "${common[@]}"
  stage embedded-cpu 180 "$work/train" --device cpu --output-dir "$work/emb-cpu" "${common[@]}"
  stage embedded-losses 10 "${bench[@]}" losses "$work/emb-cuda/metrics.jsonl" "$work/emb-cpu/metrics.jsonl"
fi

side_by_side() { # NAME BATCH STEPS CKPT MODEL-ARGS...
  local name="$1" batch="$2" steps="$3" ckpt="$4"
  shift 4
  local m="$work/m$name"
  stage "$name-model" 180 "${bench[@]}" model --out "$m" --tokenizer-from "$carry/tok" "$@"
  stage "$name-data" 60 "${bench[@]}" data --model "$m" --out "$work/d$name" --records "$batch" --seq-len 2048
  local args=(--model "$m" --data "$work/d$name" --steps "$steps" --batch "$batch" --seq-len 2048 --rank 16)
  if [ "$ckpt" = yes ]; then args+=(--checkpoint); fi
  stage "$name-train" 240 "${bench[@]}" ours --train "$work/train" --out "$work/r$name" "${args[@]}"
  stage "$name-peft" 240 "${bench[@]}" peft "${args[@]}"
  rm -rf "$m"
}
has small && side_by_side small 4 4 no --layers 4 --hidden 512 --intermediate 1408 \
  --heads 8 --kv-heads 4 --vocab 16000
has 1b && side_by_side 1b 4 6 no --layers 16 --hidden 2048 --intermediate 8192 \
  --heads 32 --kv-heads 8 --vocab 128256
has 8b && side_by_side 8b 1 4 yes --layers 32 --hidden 4096 --intermediate 14336 \
  --heads 32 --kv-heads 8 --vocab 128256 --untied

# Not in the default stages (several minutes): the GPU memory model's
# measurements, into $OUT/gpu_memory_measurements.jsonl.
has calibrate && stage calibrate 480 "${bench[@]}" calibrate --train "$work/train" --work "$work/cal" \
  --out "$res/gpu_memory_measurements.jsonl" --tokenizer-from "$carry/tok"

say "summary"
cat "$res/results.jsonl" 2>/dev/null
if [ "${#failed[@]}" != 0 ]; then
  echo "failed stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed"
