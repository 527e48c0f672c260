"""Input that must be refused, not trusted: a model directory that ships its own Python, adapter configs and
tensors that peft cannot load as written, a base missing weights. Real peft, transformers and HiggsAudioModel."""

import builtins
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from higgs_trainer import find_lora_model
from higgs_trainer.training.saving import write_lora_adapters
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_models import make_model, tiny_base_model, trained_like

# 1. a model directory's own code never runs, whatever the user answers


@pytest.fixture
def base_with_its_own_code(tmp_path):
    """A model directory whose config.json points (auto_map) at Python files beside it that leave a marker when run."""
    base = tmp_path / "evil-base"
    base.mkdir()
    marker = tmp_path / "code-ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (base / "configuration_evil.py").write_text(payload + "from transformers import PretrainedConfig\n"
                                               "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")  # fmt: skip
    (base / "modeling_evil.py").write_text(payload)
    config = {
        "model_type": "evil",
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }
    (base / "config.json").write_text(json.dumps(config))
    return base, marker


@pytest.fixture
def adapter(tmp_path):
    model = trained_like(make_model())
    write_lora_adapters(find_lora_model(model), tmp_path)
    return tmp_path / "lora_adapters"


@pytest.mark.parametrize("command", ["verify", "merge"])
def test_code_in_a_model_directory_never_runs(base_with_its_own_code, adapter, tmp_path, capsys, monkeypatch, command):
    base, marker = base_with_its_own_code
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")  # the careless "y"
    argv = (
        ["verify", adapter, "--base", base] if command == "verify" else ["merge", "--base", base, "--adapter", adapter]
    )
    code, _, err = run_cli(capsys, *argv, *(["-o", tmp_path / "merged"] if command == "merge" else []))
    assert not marker.exists(), "the model directory's own Python ran"
    assert asked == [], "the user was asked whether to run the model directory's code"
    assert code == 1
    assert_one_line_error(err, "never runs code from a model directory")


# 8. verify fails what PeftModel.from_pretrained cannot load as written: tests/test_damaged_adapters.py


# 9. a base missing weights is refused, naming them


def test_a_base_missing_weights_names_them(adapter, tmp_path, capsys):
    base = tmp_path / "base"
    tiny_base_model().save_pretrained(str(base))
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(k for k in tensors if ".1.self_attn.k_proj." in k)
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(weights), metadata={"format": "pt"})
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert code == 1
    assert_one_line_error(err, f"lack {len(dropped)} weight(s)")
    assert all(name.split(".", 1)[-1] in err for name in dropped), err  # named (without a model prefix, maybe)
    assert "meta" not in err and "safe_serialization" not in err
    assert not (tmp_path / "merged").exists()
    shutil.rmtree(base)
