"""The `higgs-trainer` console script, in a process of its own, never imports DeepSpeed (installed on both stacks).

boson_multimodal's model code and accelerate's ``extract_model_from_parallel`` (every
``save_pretrained``) import it because it is installed; it then logs "Setting accelerator to CPU" on
stderr (`higgs_trainer._compat.deepspeed_unseen`). Real console script, real models.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_trainer import convert_layout
from higgs_trainer.convert import keys
from tests.testing_cli import write_cli_inputs
from tests.testing_environment import missing
from tests.testing_launch import ROOT
from tests.testing_models import HIGGS_STACK

THIS_LAYOUT = keys.BOSON if HIGGS_STACK else keys.TRANSFORMERS


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A Higgs base of this stack, a trained-looking adapter for it (also in the other layout), a full checkpoint."""
    root = write_cli_inputs(tmp_path_factory.mktemp("inputs"))
    convert_layout(root / "lora_adapters", keys.other(THIS_LAYOUT), root / "other_layout")
    return root


COMMANDS = {
    "verify": lambda root, out: ["verify", root / "lora_adapters"],
    "verify --base": lambda root, out: ["verify", root / "lora_adapters", "--base", root / "base"],
    "extract": lambda root, out: ["extract", root / "checkpoint-2", "-o", out, "--lora-alpha", "8"],
    "merge": lambda root, out: ["merge", "--base", root / "base", "--adapter", root / "lora_adapters", "-o", out],
    "merge --in-memory": lambda root, out: [*COMMANDS["merge"](root, out), "--in-memory"],
    "convert --base": lambda root, out: (
        ["convert", root / "other_layout", "--to", THIS_LAYOUT, "-o", out, "--base", root / "base"]
    ),
}


def imported_modules(importtime: str) -> set[str]:
    """The modules ``python -X importtime`` lists on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_neither_imports_deepspeed_nor_prints_its_accelerator_line(inputs, tmp_path, command):
    script = Path(sys.executable).parent / "higgs-trainer"
    if not script.is_file():
        missing(f"no console script {script}: install the package (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [str(a) for a in COMMANDS[command](inputs, tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    imported = imported_modules(done.stderr)
    assert "torch" in imported, "importtime listed no modules: the check below would prove nothing"
    deepspeed = sorted(m for m in imported if m == "deepspeed" or m.startswith("deepspeed."))
    assert not deepspeed, f"`higgs-trainer {command}` imported {deepspeed[:5]}"
    messages = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert not any("Setting accelerator" in line for line in messages), messages
