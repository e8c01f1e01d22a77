#!/usr/bin/env bash
# A CUDA 13.0 toolchain for `cargo build --release --features cuda` on a
# machine without a GPU, a driver or a CUDA install, from NVIDIA's wheels on
# PyPI (README, "Building with CUDA"; docs/reference.md, "CUDA build").
#
# Usage:
#   source scripts/cuda_env.sh     # sets up, then exports into this shell
#   scripts/cuda_env.sh            # sets up, prints the `export` lines
# Then: cargo build --release --features cuda --bin train
#
# What it does, each step skipped when already done:
#   1. a virtual environment in $CUDA_VENV (default target/cuda-venv) with
#      exactly the wheels pinned below (CUDA 13.0: the GPU machines run driver
#      580, which cannot load PTX from a newer compiler);
#   2. a link folder ($CUDA_VENV/cuda-link) with unversioned symlinks
#      (libcublas.so, ...) to the wheels' versioned libraries, which cudarc's
#      `-l` flags need, and a stub libcuda.so (soname libcuda.so.1): the
#      driver API library comes with the driver, in no wheel. The stub is C,
#      one empty function per `cu*` function cudarc declares (read from its
#      source in Cargo's registry), compiled with gcc. It only satisfies the
#      linker; at run time the real libcuda.so.1 of the GPU machine loads.
#   3. exports PATH (nvcc), CUDA_PATH, CUDA_COMPUTE_CAP (default 90, H100),
#      LIBRARY_PATH (the link folder, read by the linker only).
# The binary then needs, at run time, the real driver and the CUDA 13
# libraries: LD_LIBRARY_PATH=<wheels' nvidia/cu13/lib or a CUDA 13 install>.
# Never put the link folder on LD_LIBRARY_PATH: its stub would shadow the
# driver.

# Exactly the versions tried together (issue #20, item 5). nvidia-nvvm must be
# pinned: left alone pip takes 13.5, whose PTX the 13.0 ptxas rejects.
# nvidia-curand 10.4.0.35 is the cuRAND of CUDA 13.0.
QS_CUDA_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.0.2.14
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
)
# The libraries cudarc links (candle's features: driver, nvrtc, curand,
# cublas, cublaslt) plus the runtime.
QS_CUDA_LIBS=(cublas cublasLt cudart curand nvrtc)

_qs_cuda_msg() { printf 'cuda_env: %s\n' "$*" >&2; }

# The venv, with the pinned wheels; a stamp of the pin list makes a rerun
# skip pip.
_qs_cuda_venv() {
  local venv="$1" python="${PYTHON:-python3}"
  local stamp="$venv/.qlora-scale-wheels" want
  want="$(printf '%s\n' "${QS_CUDA_WHEELS[@]}")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    _qs_cuda_msg "wheels already installed in $venv"
    return 0
  fi
  if [ ! -x "$venv/bin/python" ]; then
    _qs_cuda_msg "creating the virtual environment $venv with $python"
    "$python" -m venv "$venv"
  fi
  _qs_cuda_msg "installing ${#QS_CUDA_WHEELS[@]} pinned wheels (about 1 GB)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-cache-dir "${QS_CUDA_WHEELS[@]}"
  printf '%s\n' "$want" >"$stamp"
}

# The wheels' nvidia/cu13 folder of the venv.
_qs_cuda_root() {
  local venv="$1" cu
  cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
  if [ ! -x "$cu/bin/nvcc" ]; then
    _qs_cuda_msg "no nvcc in $cu/bin: is nvidia-cuda-nvcc installed in $venv?"
    return 1
  fi
  printf '%s\n' "$cu"
}

# Unversioned symlinks to the wheels' versioned libraries.
_qs_cuda_symlinks() {
  local cu="$1" link="$2" lib target
  for lib in "${QS_CUDA_LIBS[@]}"; do
    target="$(find "$cu/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -n 1)"
    if [ -z "$target" ]; then
      _qs_cuda_msg "no lib$lib.so.* in $cu/lib: the wheels are incomplete"
      return 1
    fi
    ln -sfn "$target" "$link/lib$lib.so"
  done
}

# cudarc's source in Cargo's registry, at the version Cargo.lock names.
_qs_cudarc_src() {
  local repo="$1" version dir
  version="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$repo/Cargo.lock")"
  if [ -z "$version" ]; then
    _qs_cuda_msg "no cudarc in $repo/Cargo.lock"
    return 1
  fi
  dir="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "cudarc-$version" 2>/dev/null | head -n 1)"
  if [ -z "$dir" ]; then
    _qs_cuda_msg "fetching cudarc $version's source (cargo fetch)"
    (cd "$repo" && cargo fetch --quiet)
    dir="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "cudarc-$version" | head -n 1)"
  fi
  if [ ! -f "$dir/src/driver/sys/mod.rs" ]; then
    _qs_cuda_msg "no cudarc $version source under ${CARGO_HOME:-$HOME/.cargo}/registry/src"
    return 1
  fi
  printf '%s\n' "$dir/src/driver/sys/mod.rs"
}

# libcuda.so: one empty function per driver function cudarc declares (all
# CUDA versions' declarations: a superset of what the build references).
_qs_cuda_stub() {
  local repo="$1" link="$2" sys c
  sys="$(_qs_cudarc_src "$repo")"
  c="$(grep -oE '\bfn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^fn (.*)\($/void \1(void) {}/' | sort -u)"
  if [ "$(printf '%s\n' "$c" | wc -l)" -lt 100 ]; then
    _qs_cuda_msg "found too few cu* functions in $sys: has cudarc's layout changed?"
    return 1
  fi
  c="/* Link-time stub of the CUDA driver API, made by scripts/cuda_env.sh from
   $sys. Never load it: the real libcuda.so.1 comes with the driver. */
$c"
  if [ -f "$link/libcuda.so" ] && [ "$(cat "$link/libcuda_stub.c" 2>/dev/null)" = "$c" ]; then
    return 0
  fi
  printf '%s\n' "$c" >"$link/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so.tmp" "$link/libcuda_stub.c"
  mv -f "$link/libcuda.so.tmp" "$link/libcuda.so"
  _qs_cuda_msg "made the libcuda.so stub ($(printf '%s\n' "$c" | grep -c '^void') functions)"
}

# Everything, in a subshell with strict options; prints the CUDA root and the
# link folder on two lines.
_qs_cuda_setup() (
  set -euo pipefail
  # Strict inside command substitutions too.
  shopt -s inherit_errexit
  local repo venv cu link
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${CUDA_VENV:-$repo/target/cuda-venv}"
  mkdir -p "$(dirname "$venv")"
  venv="$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")"
  _qs_cuda_venv "$venv"
  cu="$(_qs_cuda_root "$venv")"
  link="$venv/cuda-link"
  mkdir -p "$link"
  _qs_cuda_symlinks "$cu" "$link"
  _qs_cuda_stub "$repo" "$link"
  printf '%s\n%s\n' "$cu" "$link"
)

_qs_cuda_main() {
  local out cu link path status
  # Not in a `||` or `if`: there bash would switch `set -e` off inside the
  # setup too.
  out="$(_qs_cuda_setup)"
  status=$?
  if [ "$status" != 0 ]; then
    _qs_cuda_msg "setup failed (see above)"
    return "$status"
  fi
  cu="$(printf '%s\n' "$out" | sed -n 1p)"
  link="$(printf '%s\n' "$out" | sed -n 2p)"
  case ":$PATH:" in *":$cu/bin:"*) path="$PATH" ;; *) path="$cu/bin:$PATH" ;; esac
  export PATH="$path" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  case ":${LIBRARY_PATH:-}:" in
    *":$link:"*) ;;
    *) export LIBRARY_PATH="$link${LIBRARY_PATH:+:$LIBRARY_PATH}" ;;
  esac
  _qs_cuda_msg "nvcc: $(nvcc --version | sed -n 's/^Cuda compilation tools, //p')"
  _qs_cuda_msg "ready: cargo build --release --features cuda --bin train"
  _qs_cuda_msg "to run the binary (GPU machine): LD_LIBRARY_PATH=$cu/lib"
  printf 'export PATH=%q\nexport CUDA_PATH=%q\nexport CUDA_COMPUTE_CAP=%q\nexport LIBRARY_PATH=%q\n' \
    "$PATH" "$CUDA_PATH" "$CUDA_COMPUTE_CAP" "$LIBRARY_PATH"
}

# Both calls plain, never under `if`, `||` or `&&`: there bash would ignore
# the setup's `set -e` (so source this script as a plain command too).
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: export here, without leaving strict options in the caller's shell.
  _qs_cuda_main >/dev/null
else
  set -uo pipefail
  _qs_cuda_main
fi
