"""scripts/gpu_check.sh --dry-run: the GPU check's set-up on CPU (the Python, its imports, DeepSpeed, the planned runs).

The run itself needs CUDA GPUs (docs/distributed.md); what can go wrong before it is checked here, with this stack's
Python standing in for the GPU machine's own.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
MODES = ["zero3-gather", "zero3-nogather", "fsdp-full", "fsdp-sharded"]


def gpu_check(*args, cwd=None, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("STACK", "MODES", "NPROC", "WHEELS")}
    environment["PYTHON"] = sys.executable
    environment.update(env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd or "/", env=environment, capture_output=True, text=True, timeout=300
    )


def hide_deepspeed(tmp_path):
    """A PYTHONPATH entry under which `import deepspeed` fails, as on a machine that does not have it."""
    (tmp_path / "hidden" / "deepspeed").mkdir(parents=True)
    (tmp_path / "hidden" / "deepspeed" / "__init__.py").write_text('raise ImportError("not installed here")\n')
    return str(tmp_path / "hidden")


def test_dry_run_checks_the_imports_and_prints_the_four_planned_runs():
    result = gpu_check("--dry-run", NPROC="2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"python: {sys.executable}" in out
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "deepspeed"):
        module = __import__(name)
        assert f"{name}: {module.__version__} ({Path(module.__file__).parent})" in out
    assert "higgs_trainer: " in out and f"({ROOT / 'higgs_trainer'})" in out  # the repository, not an installed copy
    planned = [line.strip() for line in out.splitlines() if "torch.distributed.run" in line]
    assert [line.split()[-1] for line in planned] == MODES
    for line in planned:
        assert line.startswith(f"timeout 300 {sys.executable} -m torch.distributed.run --nproc_per_node=2 ")
        assert " tests/distributed/gpu_train.py " in line
    assert "DRY RUN OK" in out


def test_without_deepspeed_or_wheels_it_says_how_to_carry_them_and_fsdp_alone_needs_none(tmp_path):
    hidden = hide_deepspeed(tmp_path)
    result = gpu_check("--dry-run", PYTHONPATH=hidden, WHEELS=str(tmp_path / "no-wheels"))
    assert result.returncode == 1
    assert "DeepSpeed is not importable" in result.stderr and "--prepare-wheels" in result.stderr
    fsdp = gpu_check("--dry-run", PYTHONPATH=hidden, WHEELS=str(tmp_path / "no-wheels"), MODES="fsdp-full fsdp-sharded")
    assert fsdp.returncode == 0, fsdp.stdout + fsdp.stderr
    assert "deepspeed:" not in fsdp.stdout
    assert [line.split()[-1] for line in fsdp.stdout.splitlines() if "gpu_train.py" in line] == MODES[2:]


def test_bad_arguments_are_usage_errors():
    mode = gpu_check("--dry-run", MODES="fsdp-full zero2")
    assert mode.returncode == 2 and "unknown mode 'zero2'" in mode.stderr
    assert gpu_check("--bogus").returncode == 2
    missing = gpu_check("--dry-run", PYTHON="/nonexistent/python3")
    assert missing.returncode == 2 and "no Python at '/nonexistent/python3'" in missing.stderr
