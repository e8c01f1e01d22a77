#!/usr/bin/env bash
# Interoperability with transformers and PEFT, by hand (not in CI): a small
# bf16 Llama-shaped model (examples/make_model.rs), a few training steps on
# the shipped corpus, `train merge`, then scripts/interop_check.py on the
# run (it installs torch, transformers, peft and safetensors into
# target/interop-venv on first use).
#
#   scripts/interop_check.sh [WORK_DIR]      (default target/interop)
#   scripts/interop_check.sh --parity [WORK_DIR]
#
# With --parity, every model of tests/fixtures/parity/ (one per architecture
# train builds) is trained 3 steps, merged and checked the same way.
#
# Exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
parity=0
if [ "${1:-}" = "--parity" ]; then
  parity=1
  shift
fi
work="${1:-target/interop}"
steps="${STEPS:-6}"
cargo build --bin train --example make_model >&2
bin="${CARGO_TARGET_DIR:-target}/debug"
if [ "$parity" = 1 ]; then
  failed=0
  for fixture in tests/fixtures/parity/*/; do
    name="$(basename "$fixture")"
    w="$work/$name"
    rm -rf "$w"
    mkdir -p "$w"
    QLORA_SCALE_DETECT=off "$bin/train" --profile-path "$w/no-profile.json" \
      --model "$fixture" --max-steps 3 --learning-rate 0.05 --output-dir "$w/run" >&2
    "$bin/train" merge --run-dir "$w/run" --out "$w/run/merged" >&2
    echo "== $name"
    python3 scripts/interop_check.py --run-dir "$w/run" --merged "$w/run/merged" || failed=1
  done
  exit "$failed"
fi
rm -rf "$work"
mkdir -p "$work"
"$bin/examples/make_model" --out "$work/model" --layers 2 --hidden 128 \
  --intermediate 256 --heads 4 --kv-heads 2 --vocab 512 --dtype bf16 >&2
# No hardware detection and no saved profile: the defaults of
# tables/defaults.toml, whatever the machine.
QLORA_SCALE_DETECT=off "$bin/train" --profile-path "$work/no-profile.json" \
  --model "$work/model" --max-steps "$steps" --seq-len 64 --batch-size 2 \
  --lora-rank 8 --learning-rate 1e-2 --warmup-steps 1 --output-dir "$work/run"
"$bin/train" merge --run-dir "$work/run" --out "$work/run/merged"
python3 scripts/interop_check.py --run-dir "$work/run" --merged "$work/run/merged"
