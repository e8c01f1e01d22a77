#!/usr/bin/env bash
# Peak RSS (VmHWM) and step time of every QLoRA benchmark configuration, each
# in a process of its own. Usage: scripts/qlora_peak.sh [STEPS]
set -euo pipefail
steps="${1:-3}"
cargo build --release --example qlora_peak
bin="${CARGO_TARGET_DIR:-target}/release/examples/qlora_peak"
printf 'config\tfrozen_MiB\trss_after_build_MiB\tpeak_rss_MiB\tstep_s\n'
for c in f32-plain-matmul f32-plain-matmul+ckpt f32-custom-op f32-custom-op+ckpt \
         nf4 nf4+ckpt nf4-dq nf4-dq+ckpt q4k q4k+ckpt; do
  "$bin" "$c" "$steps"
done
