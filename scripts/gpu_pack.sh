#!/usr/bin/env bash
# Builds, here (no GPU needed), what scripts/gpu_check.sh runs on a GPU
# machine that has CUDA 13 and PyTorch but no Rust and no package access,
# into one folder to carry there (about 20 MB):
#   train.xz       the `cuda` build of train, stripped, xz-compressed
#   gpu-tests.xz   the test binary of tests/gpu.rs (feature cuda), likewise
#   tok/           tokenizer.json and tokenizer_config.json of a small
#                  examples/make_model model, for the models gpu_bench.py makes
#
#   scripts/gpu_pack.sh [OUT]        (default target/gpu-carry)
#
# Uses scripts/cuda_env.sh (the pinned CUDA 13.0 wheels; CUDA_COMPUTE_CAP
# default 90) and the target directory target/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-carry}"
# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh
t=target/cuda
cargo build --release --features cuda --bin train --target-dir "$t" >&2
tests="$(cargo test --release --features cuda --no-run --test gpu --target-dir "$t" \
  --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')"
if [ -z "$tests" ]; then
  echo "gpu_pack: no test binary for tests/gpu.rs" >&2
  exit 1
fi
cargo build --release --example make_model >&2
rm -rf "$out"
mkdir -p "$out"
strip -o "$out/train" "$t/release/train"
strip -o "$out/gpu-tests" "$tests"
xz -T0 -6 "$out/train" "$out/gpu-tests"
target/release/examples/make_model --out "$out/tok" --layers 1 --hidden 64 \
  --intermediate 128 --heads 2 --kv-heads 1 --vocab 1024 >&2
rm -f "$out/tok/model.safetensors" "$out/tok/config.json"
du -sh "$out"/* >&2
echo "$out"
