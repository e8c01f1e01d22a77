#!/usr/bin/env python3
"""Checks a `train` run against the Python tools its files are meant for.

Run by hand, never in CI (it installs torch). Given a run directory that
`train --model LOCAL_DIR` wrote and `train merge` merged, it checks:

1. PEFT loads the run's adapter (adapter_model.safetensors +
   adapter_config.json) onto the base with no missing or unexpected key;
2. transformers' AutoModelForCausalLM.from_pretrained loads the merged
   directory with no missing, unexpected or mismatched key;
3. the merged model's logits equal those of PEFT's merge_and_unload() on the
   same base, for fixed token ids (within bf16 rounding for a 16-bit base).

It prints one PASS or FAIL line per check and exits 1 when any fails.

On first use it creates a virtual environment, target/interop-venv, and
installs torch (the CPU wheel when download.pytorch.org is reachable, else
PyPI's), transformers, peft and safetensors into it, then runs itself there.

    python3 scripts/interop_check.py --run-dir RUN [--merged DIR] [--base DIR]

scripts/interop_check.sh makes a small bf16 model, trains, merges and runs
this on it.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "target" / "interop-venv"
PACKAGES = ["transformers", "peft", "safetensors"]
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def venv_python() -> Path:
    return VENV / "bin" / "python"


def has_packages(python: Path) -> bool:
    probe = "import torch, transformers, peft, safetensors"
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def bootstrap() -> None:
    """Creates the venv and installs the packages, unless already there."""
    python = venv_python()
    if not python.exists():
        print(f"creating {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if has_packages(python):
        return
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    print("installing torch (CPU wheel first)", file=sys.stderr)
    cpu = subprocess.run(
        pip + ["--retries", "0", "--timeout", "20", "--index-url", CPU_TORCH_INDEX, "torch"]
    )
    if cpu.returncode != 0:
        print(f"{CPU_TORCH_INDEX} unreachable: torch from PyPI", file=sys.stderr)
        subprocess.run(pip + ["torch"], check=True)
    subprocess.run(pip + PACKAGES, check=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path, help="the run's output directory")
    p.add_argument("--merged", type=Path, help="the merged model [default: RUN_DIR/merged]")
    p.add_argument(
        "--base",
        type=Path,
        help="the base model directory [default: the adapter's base_model_name_or_path]",
    )
    p.add_argument("--tokens", type=int, default=16, help="token ids to run (1..N)")
    return p.parse_args()


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}: {name}: {detail}", flush=True)
        self.failed += not ok


def load_base(path: Path):
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model.eval()


def check_adapter(report: Report, base_dir: Path, run: Path):
    """Check 1. Returns the PEFT model (adapter loaded), or None."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    name = "PEFT loads the adapter"
    try:
        config = LoraConfig.from_pretrained(run)
        model = get_peft_model(load_base(base_dir), config)
        state = load_file(run / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, state)
    except Exception as e:  # the check fails, with the reason
        report.check(name, False, f"{type(e).__name__}: {e}")
        return None
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    ok = not missing and not unexpected and len(state) > 0
    detail = f"{len(state)} tensors; missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
    report.check(name, ok, detail)
    return model.eval() if ok else None


def check_merged_loads(report: Report, merged: Path):
    """Check 2. Returns the merged model, or None."""
    from transformers import AutoModelForCausalLM

    name = "transformers loads the merged model"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            merged, dtype="auto", output_loading_info=True
        )
    except Exception as e:
        report.check(name, False, f"{type(e).__name__}: {e}")
        return None
    problems = {k: v for k, v in info.items() if v}
    dtype = next(model.parameters()).dtype
    report.check(
        name,
        not problems,
        f"{type(model).__name__}, {dtype}" + (f"; {problems}" if problems else ""),
    )
    return model.eval()


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def check_logits(report: Report, peft_model, merged, base_dir: Path, n: int) -> None:
    """Check 3: merged vs merge_and_unload, both run in f32."""
    import torch

    vocab = merged.config.vocab_size
    ids = torch.tensor([[1 + i % (vocab - 1) for i in range(n)]])
    base = logits(load_base(base_dir).float(), ids)
    dtype = next(peft_model.parameters()).dtype
    peft_merged = peft_model.merge_and_unload().float().eval()
    want = logits(peft_merged, ids)
    got = logits(merged.float(), ids)
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    # One bf16/f16 rounding of each weight, one way or the other.
    tol = (2**-6 if dtype in (torch.bfloat16, torch.float16) else 1e-4) * scale
    effect = (want - base).abs().max().item()
    detail = (
        f"max |merged - merge_and_unload| = {diff:.3g} (tolerance {tol:.3g}, base {dtype}); "
        f"the adapter moves the logits by up to {effect:.3g}"
    )
    report.check("merged logits equal PEFT merge_and_unload", diff <= tol, detail)
    if effect <= diff:
        print("note: the adapter's effect is within the difference: train longer to make check 3 telling")


def main() -> int:
    args = parse_args()
    if not in_venv():
        bootstrap()
        os.execv(str(venv_python()), [str(venv_python()), __file__, *sys.argv[1:]])
    run = args.run_dir
    merged = args.merged or run / "merged"
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    base_dir = args.base or Path(adapter_config["base_model_name_or_path"])
    if not (base_dir / "config.json").is_file():
        print(
            f"FAIL: base {base_dir} is not a local model directory (pass --base)",
            file=sys.stderr,
        )
        return 1
    import transformers
    import peft
    import torch

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"run {run}, base {base_dir}, merged {merged}")
    report = Report()
    peft_model = check_adapter(report, base_dir, run)
    merged_model = check_merged_loads(report, merged)
    if peft_model is None or merged_model is None:
        report.check("merged logits equal PEFT merge_and_unload", False, "skipped: a model did not load")
    else:
        check_logits(report, peft_model, merged_model, base_dir, args.tokens)
    print("interop check:", "PASS" if report.failed == 0 else f"FAIL ({report.failed} failed)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
