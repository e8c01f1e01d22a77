#!/usr/bin/env bash
# `train` against PyTorch + PEFT on a bitsandbytes NF4 base (true QLoRA on
# the CPU), on the same machine, interleaved: the ~95M Llama-shaped model of
# examples/make_model.rs, batch 4 x 128 tokens, LoRA rank 8 on all seven
# linears of all 12 blocks, AdamW, 2 threads each, with and without gradient
# checkpointing. Run by hand, not in CI (it downloads PyTorch).
#
#   scripts/vs_pytorch.sh [ROUNDS] [STEPS]     (defaults 3 and 6)
#
# Environment: VENV, the virtual environment (default target/vs-venv; made
# and filled from PyPI when it has no python), THREADS (default 2), PYTHON
# (the interpreter that makes the venv, default python3), DTYPE (f32, the
# default, or bf16: the frozen products in bf16 on both sides, `train
# --cpu-matmul bf16` against bitsandbytes' bf16 compute dtype), PEFT_DTYPE
# (PEFT's side only, default DTYPE), ISA (native, the default, or avx2: what
# an AVX2-only CPU runs, on this one: `train` built without its `avx512`
# feature, into target/avx2, and PyTorch, its oneDNN and MKL, and so
# bitsandbytes, limited to AVX2 by ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA
# and MKL_ENABLE_INSTRUCTIONS).
#
# Prints a Markdown table (tokens/s and peak RSS medians of each side, the
# step-1 loss and the trainable parameter count) and the ratios, pair by
# pair. Exit status 1 when the two sides do not train the same thing (see
# scripts/vs_pytorch.py). Speed figures mean something only as ratios of
# runs taken in the same window; say what else the machine was doing
# (`uptime`).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
steps="${2:-6}"
venv="${VENV:-target/vs-venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install 'torch==2.15.*' 'transformers==5.25.*' 'peft==0.21.*' 'bitsandbytes==0.50.*'
fi
target="${CARGO_TARGET_DIR:-target}"
case "${ISA:-native}" in
  native) features=() ;;
  avx2)
    features=(--no-default-features)
    target="$target/avx2"
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    ;;
  *) echo "ISA must be native or avx2, not ${ISA}" >&2; exit 2 ;;
esac
cargo build --release "${features[@]}" --target-dir "$target" --bin train --example make_model >&2
bin="$target/release"
work="$(mktemp -d "${TMPDIR:-/tmp}/vs-pytorch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$bin/examples/make_model" --out "$work/m100" --dtype bf16 >&2

echo "machine: $(lscpu | sed -n 's/^Model name: *//p')"
echo "CPU features: $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "kernels: ${ISA:-native}$([ "${ISA:-native}" = avx2 ] && echo " (train without its avx512 feature; PyTorch capped at AVX2: $("$venv/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>/dev/null))")"
echo "frozen products: train ${DTYPE:-f32}, PEFT ${PEFT_DTYPE:-${DTYPE:-f32}}; train's engine: $("$bin/train" --dry-run --cpu-matmul "${DTYPE:-f32}" --json 2>/dev/null | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["frozen_products"])' || echo "?")"
echo "load before: $(uptime)"
"$venv/bin/python" -c 'import torch, transformers, peft, bitsandbytes as b; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {b.__version__}")' 2>/dev/null
status=0
"$venv/bin/python" scripts/vs_pytorch.py compare --train "$bin/train" --model "$work/m100" \
  --work "$work" --rounds "$rounds" --steps "$steps" --threads "${THREADS:-2}" \
  --dtype "${DTYPE:-f32}" --peft-dtype "${PEFT_DTYPE:-${DTYPE:-f32}}" || status=$?
echo "load after: $(uptime)"
exit "$status"
