"""The package a user installs: the sdist and wheel build, the wheel installs into a fresh venv and its command runs.

The fresh venv reuses the pinned stack's packages (torch, transformers, ...) through a ``.pth`` line, so nothing is
downloaded; the source tree is not on its path, so what runs is the installed wheel.
"""

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from higgs_trainer._version import __version__

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: setup.cfg's metadata files and the package (an sdist built from a copy of just these is
# then unpacked and the wheel built from it, as `python -m build` does, so a file missing from the sdist fails here).
BUILD_INPUTS = ["pyproject.toml", "setup.cfg", "README.md", "LICENSE", "higgs_trainer"]
# Imported by higgs_trainer but not a requirement: boson-multimodal only where a boson model is merged or loaded
# (the user's Higgs setup installs it), deepspeed only under DeepSpeed (the `deepspeed` extra).
OPTIONAL_IMPORTS = {"boson_multimodal": None, "deepspeed": "deepspeed"}


def run(cmd, cwd, env=None):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build(hook, source, dist):
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(dist)!r}))"
    return dist / run([sys.executable, "-c", code], cwd=source).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    dist = tmp / "dist"
    dist.mkdir()
    sdist = build("build_sdist", source, dist)
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = build("build_wheel", unpacked, dist)
    return sdist, wheel, tmp


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(name).decode())


def test_sdist_and_wheel_carry_the_version_license_and_metadata(dists):
    sdist, wheel, _ = dists
    assert sdist.name == f"higgs_trainer-{__version__}.tar.gz"
    assert wheel.name == f"higgs_trainer-{__version__}-py3-none-any.whl"
    with tarfile.open(sdist) as archive:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in archive.getnames() if len(Path(n).parts) > 1}
    assert {"LICENSE", "README.md", "setup.cfg", "pyproject.toml", "higgs_trainer/__init__.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        assert "higgs_trainer/_version.py" in files and "higgs_trainer/cli/main.py" in files
        assert "higgs_trainer/merge/streaming.py" in files, "every subpackage is in the wheel"
        assert not any(f.startswith("tests/") for f in files), "the wheel must hold only the package"
        license_text = next(archive.read(f).decode() for f in files if f.endswith("dist-info/licenses/LICENSE"))
        entry_points = next(archive.read(f).decode() for f in files if f.endswith("dist-info/entry_points.txt"))
    assert "Apache License" in license_text and "END OF TERMS AND CONDITIONS" in license_text
    assert "higgs-trainer = higgs_trainer.cli:main" in entry_points
    metadata = wheel_metadata(wheel)
    assert metadata["Version"] == __version__
    assert metadata["Requires-Python"] == ">=3.11"
    assert "Apache-2.0" in (metadata["License-Expression"], metadata["License"])
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"test", "docs", "deepspeed"} <= extras


def third_party_imports():
    """Top-level module names imported anywhere in higgs_trainer/ that are not the standard library or the package."""
    names = set()
    for path in (ROOT / "higgs_trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"higgs_trainer", "__future__"}


def test_every_third_party_import_is_a_declared_requirement(dists):
    _, wheel, _ = dists
    requirements = [Requirement(r) for r in wheel_metadata(wheel).get_all("Requires-Dist")]
    required = {r.name.lower().replace("_", "-") for r in requirements if r.marker is None}
    extras = {r.name.lower().replace("_", "-") for r in requirements if r.marker is not None}
    distributions = importlib.metadata.packages_distributions()
    imported = third_party_imports()
    assert {"torch", "transformers", "peft", "numpy", "packaging", "tqdm"} <= imported  # the scan sees the imports
    for module in sorted(imported):
        if module in OPTIONAL_IMPORTS:
            extra = OPTIONAL_IMPORTS[module]
            assert extra is None or extra in extras, f"{module} should be the optional extra {extra!r}"
            continue
        dists_of = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert dists_of & required, (
            f"higgs_trainer imports {module} ({sorted(dists_of)}) but setup.cfg does not require it"
        )


def test_wheel_installs_into_a_fresh_venv_and_its_command_runs(dists):
    _, wheel, tmp = dists
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    # The pinned stack's packages, without processing its .pth files (so its editable higgs_trainer stays out).
    (site / "pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip sees the stack's editable higgs-trainer through the .pth; never touch that one.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check"]
    run([*pip, "--no-deps", "--no-index", "--ignore-installed", str(wheel)], cwd=tmp)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out = run([str(venv / "bin" / "higgs-trainer"), "--version"], cwd=tmp, env=env)
    assert out.strip() == f"higgs-trainer {__version__}"
    code = (
        "import higgs_trainer; from higgs_trainer import HiggsLoraTrainer, merge_adapter; print(higgs_trainer.__file__)"
    )
    location = Path(run([str(python), "-c", code], cwd=tmp, env=env).strip())
    assert location.is_relative_to(site), f"imported {location}, not the installed wheel in {site}"
    assert not location.is_relative_to(ROOT)
