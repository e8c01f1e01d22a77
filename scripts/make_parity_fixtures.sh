#!/usr/bin/env bash
# Regenerates tests/fixtures/parity/ (run by hand, never in CI): installs
# torch, transformers, tokenizers and safetensors from the package registry
# into a virtual environment (target/parity-venv, or $VENV), then writes one
# tiny random-weight model per architecture with transformers' own logits and
# loss (scripts/make_parity_fixtures.py). Arguments: fixture names to write
# (default: all). The CPU-only build of torch is not on PyPI, so pip also
# pulls CUDA libraries (about 5 GiB); set VENV to reuse an environment.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-target/parity-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.15.0 transformers==5.25.0 tokenizers==0.23.3 \
        safetensors==0.8.0 numpy
fi
"$venv/bin/python" scripts/make_parity_fixtures.py tests/fixtures/parity "$@"
