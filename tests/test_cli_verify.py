"""`higgs-trainer verify` on real saved adapters, checkpoints and runs, and on crafted bad variants of them."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from higgs_trainer import HiggsLoraTrainer
from tests.testing_cli import rename_lora_modules, run_cli
from tests.testing_environment import missing
from tests.testing_models import RandomTokens, make_model, tiny_base_model, training_args

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def assert_fails_with(capsys, path, text, *extra):
    code, out, err = run_cli(capsys, "verify", path, *extra)
    assert code == 1, out + err
    assert text in out, out
    assert err.strip().splitlines() == ["higgs-trainer verify: 1 of 1 adapter(s) failed verification"], err
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained with HiggsLoraTrainer: lora_adapters in checkpoint-2, checkpoint-4 and at the top."""
    out = tmp_path_factory.mktemp("run")
    trainer = HiggsLoraTrainer(model=make_model(), args=training_args(out), train_dataset=RandomTokens())
    trainer.train()
    trainer.save_model()
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    tiny_base_model().save_pretrained(str(out))
    return out


@pytest.fixture
def adapter(run, tmp_path):
    """A private copy of the final adapter, to damage."""
    return pathlib.Path(shutil.copytree(run / "lora_adapters", tmp_path / "adapter"))


# good input


def test_adapter_checkpoint_and_run_directories_pass(run, capsys):
    code, out, err = run_cli(capsys, "verify", run / "lora_adapters", run / "checkpoint-2", run)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[-1] == "5 passed, 0 failed"
    passed = [line for line in lines if line.startswith("PASS ")]
    assert [line.split(":")[0][5:] for line in passed[2:]] == [
        str(run / "lora_adapters"),
        str(run / "checkpoint-2" / "lora_adapters"),
        str(run / "checkpoint-4" / "lora_adapters"),
    ]
    assert "8 tensors" in passed[0] and "r=4, lora_alpha=8; targets q_proj, v_proj" in passed[0]


def test_json_report_parses(run, capsys):
    code, out, _ = run_cli(capsys, "verify", run, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and len(report["results"]) == 3
    first = report["results"][0]
    assert first["ok"] and first["problems"] == [] and first["num_tensors"] == 8 and first["r"] == 4
    assert first["lora_alpha"] == 8 and first["target_modules"] == ["q_proj", "v_proj"]
    assert first["num_bytes"] == 4 * first["num_parameters"]


def test_base_model_check_passes_for_the_matching_base(run, base_dir, capsys):
    code, out, _ = run_cli(capsys, "verify", run, "--base", base_dir)
    assert code == 0, out


# bad input (damaged adapters: tests/test_damaged_adapters.py, through this command and the API)


def test_missing_path_is_a_usage_error(tmp_path, capsys):
    code, out, err = run_cli(capsys, "verify", tmp_path / "nope")
    assert code == 2 and out == ""
    assert err.strip() == f"higgs-trainer verify: error: {tmp_path / 'nope'} does not exist"


def test_no_path_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "verify")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "required: PATH" in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert_fails_with(capsys, tmp_path, "is not an adapter, checkpoint or run directory")


def test_checkpoint_written_without_an_adapter_points_to_extract(run, tmp_path, capsys):
    checkpoint = pathlib.Path(shutil.copytree(run / "checkpoint-2", tmp_path / "checkpoint-2"))
    shutil.rmtree(checkpoint / "lora_adapters")  # what plain Trainer leaves: model.safetensors only
    assert_fails_with(capsys, checkpoint, "rescue it with `higgs-trainer extract")


def test_one_bad_among_good_fails_the_whole_run(run, adapter, capsys):
    (adapter / WEIGHTS).write_bytes(b"")
    code, out, err = run_cli(capsys, "verify", run, adapter)
    assert code == 1 and out.splitlines()[-1] == "3 passed, 1 failed"
    assert "1 of 4 adapter(s) failed" in err


def test_json_report_of_a_failure(adapter, capsys):
    (adapter / CONFIG).unlink()
    code, out, _ = run_cli(capsys, "verify", adapter, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["results"][0]["ok"] is False and "is missing" in report["results"][0]["problems"][0]


def test_base_model_catches_modules_it_does_not_have(adapter, base_dir, capsys):
    rename_lora_modules(adapter, "q_proj", "x_proj")
    assert run_cli(capsys, "verify", adapter)[0] == 0, "the adapter itself is sound"
    out = assert_fails_with(capsys, adapter, "LoRA module(s) are not in the base model", "--base", base_dir)
    assert "self_attn.x_proj" in out


def test_base_model_catches_layers_of_another_size(adapter, base_dir, capsys):
    tensors = load_file(str(adapter / WEIGHTS))
    tensors = {k: (v[:, :32] if ".lora_A." in k else v[:32]).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(adapter / WEIGHTS))
    assert run_cli(capsys, "verify", adapter)[0] == 0
    out = assert_fails_with(capsys, adapter, "do not fit the base model's layers", "--base", base_dir)
    assert "vs input size 64" in out


def test_base_that_does_not_exist_is_a_usage_error(run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "verify", run, "--base", tmp_path / "nope")
    assert code == 2 and "base model" in err and "does not exist" in err


def test_named_adapters_in_subdirectories_are_checked(adapter, capsys):
    shutil.copytree(adapter, adapter / "second")
    (adapter / "second" / WEIGHTS).write_bytes(b"")
    code, out, _ = run_cli(capsys, "verify", adapter)
    assert code == 1 and out.splitlines()[-1] == "1 passed, 1 failed"
    assert f"FAIL {adapter / 'second'}" in out


def test_the_console_script_is_installed():
    script = pathlib.Path(sys.executable).parent / "higgs-trainer"
    if not script.exists():
        missing("higgs-trainer is not installed in this environment (pip install -e .)")
    result = subprocess.run([str(script), "verify", "/nonexistent/path"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "higgs-trainer verify: error: /nonexistent/path does not exist"


# where the adapter sits


def test_a_checkpoint_with_the_adapter_at_its_root_passes(adapter, tmp_path, capsys):
    # peft's own saving (Trainer on a top-level PeftModel) writes the adapter files into checkpoint-N itself
    shutil.copytree(adapter, tmp_path / "native" / "checkpoint-2")
    code, out, err = run_cli(capsys, "verify", tmp_path / "native")
    assert code == 0, out + err
    assert f"PASS {tmp_path / 'native' / 'checkpoint-2'}:" in out


def test_a_checkpoint_without_adapter_or_weights_says_so(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    out = assert_fails_with(capsys, tmp_path / "run", "holds no adapter")
    assert "full weights" not in out
