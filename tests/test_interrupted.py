"""Interrupted work: SIGTERM/SIGINT during extract and merge (and while the command is still importing), and
resuming a run whose last checkpoint was cut short by a kill. Real signals, real Trainer and HiggsAudioModel."""

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from higgs_trainer import HiggsLoraTrainer, HiggsTrainerError
from higgs_trainer.cli import verify as cli_verify
from higgs_trainer.files import atomic
from tests.testing_cli import run_cli, write_cli_inputs
from tests.testing_environment import missing
from tests.testing_launch import ROOT
from tests.testing_models import RandomTokens, make_model, training_args

# 4. signals during extract and merge


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base, a trained-looking adapter, and a full checkpoint written without an adapter."""
    root = write_cli_inputs(tmp_path_factory.mktemp("inputs"))
    return root


def signal_while_writing(monkeypatch, signum):
    """Deliver ``signum`` to this process in the middle of writing the output (files staged, not yet renamed)."""
    real = atomic.fsync_tree

    def fsync_tree(directory):
        assert any(directory.iterdir()), "the signal should arrive with files written"
        os.kill(os.getpid(), signum)
        real(directory)

    monkeypatch.setattr(atomic, "fsync_tree", fsync_tree)


COMMANDS = {
    "merge": lambda root, out: ["merge", "--base", root / "base", "--adapter", root / "lora_adapters", "-o", out],
    "extract": lambda root, out: ["extract", root / "checkpoint-2", "-o", out, "--lora-alpha", "8"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_a_signal_while_writing_removes_the_partial_output(
    inputs, tmp_path, monkeypatch, capsys, command, signum, status
):
    signal_while_writing(monkeypatch, signum)
    handler_before = signal.getsignal(signal.SIGTERM)
    code, out, err = run_cli(capsys, *COMMANDS[command](inputs, tmp_path / "out"))
    assert code == status, err
    assert err.strip().endswith("(nothing written)") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [], "partial output or staging directory left behind"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # main() puts the handlers back


def signal_as_committed(monkeypatch, signum, moment):
    """Deliver ``signum`` to this process as the finished output goes into place: ``between renames`` (the previous
    output moved aside, the new one not yet renamed) or ``after rename`` (the new one in place)."""
    if moment == "after rename":
        real = atomic.replace_directory

        def replace_directory(source, target):
            real(source, target)
            os.kill(os.getpid(), signum)

        monkeypatch.setattr(atomic, "replace_directory", replace_directory)
        return
    rename = os.rename

    def rename_then_signal(source, target):
        rename(source, target)
        if ".old-" in os.fspath(target):  # the previous output moved aside
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(atomic.os, "rename", rename_then_signal)


COMMITTED = {  # what each command's report starts with, and a file its complete output holds
    "merge": ("Merged ", "model.safetensors"),
    "extract": ("Extracted ", "adapter_model.safetensors"),
}


@pytest.mark.parametrize("moment", ["between renames", "after rename"])
@pytest.mark.parametrize("command", sorted(COMMITTED))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_once_the_output_is_going_into_place_keeps_it_and_exits_0(
    inputs, tmp_path, monkeypatch, capsys, command, signum, moment
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier output, replaced with --overwrite")
    signal_as_committed(monkeypatch, signum, moment)
    code, stdout, err = run_cli(capsys, *COMMANDS[command](inputs, out), "--overwrite")
    assert code == 0, err
    report, weights = COMMITTED[command]
    assert stdout.startswith(report), stdout
    name = signal.Signals(signum).name
    assert err == f"higgs-trainer {command}: {name} arrived once {out} was complete: kept it and finished\n", err
    assert (out / weights).is_file() and not (out / "previous.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "staging or moved-aside directory left behind"


def signal_handled(pid):
    """Whether process ``pid`` has a handler for SIGTERM (Python installs none of its own; `main` does, first)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def torch_mapped(pid):
    """Whether torch's library is mapped into process ``pid``: the command's imports are under way, not finished."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


# When each signal is sent: once `main` has installed its handler (its first step), or once torch's library is mapped
# (imports under way), then after a delay.
EARLY = {"handler installed": (signal_handled, 0.0), "importing torch": (torch_mapped, 0.0)}
EARLY["importing, +0.3 s"] = (torch_mapped, 0.3)


@pytest.mark.parametrize("moment", list(EARLY))
@pytest.mark.parametrize(
    ("signum", "message", "status"),
    [(signal.SIGTERM, "terminated by SIGTERM", 143), (signal.SIGINT, "interrupted", 130)],
    ids=["TERM", "INT"],
)
def test_a_signal_in_the_first_moments_of_a_command_is_one_line(inputs, moment, signum, message, status):
    script = Path(sys.executable).parent / "higgs-trainer"
    if not script.is_file():
        missing(f"no console script {script}: install the package (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [str(script), "verify", str(inputs / "lora_adapters")], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    reached, delay = EARLY[moment]
    deadline = time.monotonic() + 60
    try:
        while not reached(process.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        pass  # it ended already: the assertions below say how
    time.sleep(delay)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    # the command may be running already (a slow import elsewhere): then it names itself and what it left
    assert err in (f"higgs-trainer: {message}\n", f"higgs-trainer verify: {message} (nothing written)\n"), err


def signal_inside(library, signum, call):
    """``call`` wrapped as a library that sends itself ``signum`` and swallows the exception it raised, or fails in
    its place (seen while numpy imported: a RecursionError from the half-imported module, or nothing and exit 0)."""

    def wrapped(*args, **kwargs):
        try:
            os.kill(os.getpid(), signum)
        except BaseException:
            if library == "fails in its place":
                raise RecursionError("maximum recursion depth exceeded") from None
        return call(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("phase", ["importing", "running"])
@pytest.mark.parametrize("library", ["swallows it", "fails in its place"])
@pytest.mark.parametrize(
    ("signum", "message", "status"),
    [(signal.SIGTERM, "terminated by SIGTERM", 143), (signal.SIGINT, "interrupted", 130)],
    ids=["TERM", "INT"],
)
def test_a_signal_counts_whatever_a_library_makes_of_its_exception(
    inputs, monkeypatch, capsys, phase, library, signum, message, status
):
    if phase == "importing":  # the command module, which `main` imports once the arguments parsed
        real = importlib.import_module
        inside = signal_inside(library, signum, real)
        monkeypatch.setattr(importlib, "import_module", lambda name: (inside if ".cli." in name else real)(name))
        expected = f"higgs-trainer: {message}\n"
    else:
        monkeypatch.setattr(cli_verify, "inspect_path", signal_inside(library, signum, cli_verify.inspect_path))
        expected = f"higgs-trainer verify: {message} (nothing written)\n"
    code, _, err = run_cli(capsys, "verify", inputs / "lora_adapters")
    assert (code, err) == (status, expected)


# 7. a kill while saving a checkpoint: resume from the newest complete one


@pytest.fixture
def killed_run(tmp_path):
    """A 4-step run (checkpoint-2, checkpoint-4), then checkpoint-6 as a kill during its save leaves it."""
    HiggsLoraTrainer(
        model=make_model(), args=training_args(tmp_path, max_steps=4), train_dataset=RandomTokens()
    ).train()
    partial = tmp_path / "checkpoint-6"
    partial.mkdir()
    weights = (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # killed mid-write, nothing after it
    return tmp_path


def test_resume_true_skips_an_interrupted_checkpoint(killed_run, caplog):
    trainer = HiggsLoraTrainer(
        model=make_model(), args=training_args(killed_run, max_steps=6), train_dataset=RandomTokens()
    )
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint-6" in w and "resuming from checkpoint-4" in w for w in warnings), warnings
    assert (killed_run / "checkpoint-6" / "trainer_state.json").is_file()  # the step-6 save completed it


def test_naming_an_interrupted_checkpoint_is_refused_with_the_one_to_use(killed_run):
    trainer = HiggsLoraTrainer(
        model=make_model(), args=training_args(killed_run, max_steps=6), train_dataset=RandomTokens()
    )
    with pytest.raises(HiggsTrainerError, match=r"checkpoint-6 was interrupted.*resume from .*checkpoint-4"):
        trainer.train(resume_from_checkpoint=str(killed_run / "checkpoint-6"))


def test_a_run_whose_every_checkpoint_was_interrupted_is_refused(killed_run):
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.rmtree(killed_run / name)
    trainer = HiggsLoraTrainer(
        model=make_model(), args=training_args(killed_run, max_steps=6), train_dataset=RandomTokens()
    )
    with pytest.raises(HiggsTrainerError, match="no complete checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)


def test_verify_calls_an_interrupted_checkpoint_interrupted(killed_run, capsys):
    code, out, _ = run_cli(capsys, "verify", killed_run)
    assert code == 1
    assert "checkpoint-6 was interrupted while saving" in out and "saved without an adapter" not in out, out
    assert "2 passed, 1 failed" in out, out
