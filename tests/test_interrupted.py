"""Interrupted work: SIGTERM/SIGINT during extract and merge (and while the command is still importing), and
resuming a run whose last checkpoint was cut short by a kill. Real signals, real Trainer and HiggsAudioModel."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file

from higgs_trainer import HiggsLoraTrainer, HiggsTrainerError, find_lora_model
from higgs_trainer.files import atomic
from higgs_trainer.training.saving import clone_shared_tensors, write_lora_adapters
from tests.cli import run_cli
from tests.launch import ROOT
from tests.models import RandomTokens, make_model, tiny_base_model, trained_like, training_args

# 4. signals during extract and merge


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base, a trained-looking adapter, and a full checkpoint written without an adapter."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_base_model().save_pretrained(str(root / "base"))
    model = trained_like(make_model())
    write_lora_adapters(find_lora_model(model), root)
    (root / "checkpoint-2").mkdir()
    state = {k: v.contiguous() for k, v in clone_shared_tensors(model.state_dict()).items()}
    save_file(state, str(root / "checkpoint-2" / "model.safetensors"))
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


def test_an_interrupt_while_the_command_is_still_importing_is_one_line(tmp_path):
    script = "from higgs_trainer.cli import main; raise SystemExit(main())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", script, "verify", str(tmp_path)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # torch's library is mapped: the imports are under way, not finished
        try:
            with open(f"/proc/{process.pid}/maps") as maps:
                if "libtorch" in maps.read():
                    break
        except FileNotFoundError:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err == "higgs-trainer: interrupted\n", err


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
