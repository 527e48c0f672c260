"""The adapter files `write_lora_adapters` writes itself are the ones peft's `save_pretrained` writes, byte for byte.

Saving skips `PeftModel.save_pretrained` (its model card costs about half of a checkpoint's adapter
save) and writes peft's state dict and config itself; this checks nothing else changed.
"""

import json

import pytest

from higgs_trainer import find_lora_model
from higgs_trainer.training.saving import write_lora_adapters
from tests.models import make_model


@pytest.mark.parametrize("layout", ["model", "top"])
def test_adapter_files_are_peft_save_pretrained_ones_less_the_model_card(tmp_path, layout):
    component = find_lora_model(make_model(layout))
    write_lora_adapters(component, tmp_path / "ours")
    component.model.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=False)
    ours, peft = tmp_path / "ours" / "lora_adapters", tmp_path / "peft"
    assert sorted(p.name for p in ours.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {p.name for p in peft.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert (ours / "adapter_model.safetensors").read_bytes() == (peft / "adapter_model.safetensors").read_bytes()
    assert json.loads((ours / "adapter_config.json").read_text()) == json.loads(
        (peft / "adapter_config.json").read_text()
    )
    assert component.model.peft_config["default"].inference_mode is False  # restored after the save
