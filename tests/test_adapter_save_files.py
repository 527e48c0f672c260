"""The adapter files `write_lora_adapters` writes itself are the ones peft's `save_pretrained` writes, byte for byte.

Saving skips `PeftModel.save_pretrained` (its model card costs about half of a checkpoint's adapter
save) and writes peft's state dict and config itself; this checks nothing else changed.
"""

import json

import pytest

from higgs_trainer import find_lora_model
from higgs_trainer._compat import peft_save_is_mirrored
from higgs_trainer.training import saving
from higgs_trainer.training.saving import write_lora_adapters
from tests.testing_models import lora_config, make_model, trained_like


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


def test_the_copy_is_used_only_for_the_peft_releases_it_mirrors():
    import peft

    assert peft_save_is_mirrored()  # both pinned stacks (peft 0.16.0 and 0.21.x) are in the checked range
    assert peft_save_is_mirrored(peft.__version__)
    assert [peft_save_is_mirrored(v) for v in ("0.15.2", "0.16.0", "0.21.9", "0.22.0.dev0", "0.22.0", "1.0.0")] == [
        False, True, True, False, False, False,
    ]  # fmt: skip


@pytest.mark.parametrize("adapters", [1, 2])
def test_outside_that_range_peft_own_save_pretrained_writes_the_same_files(tmp_path, monkeypatch, adapters):
    """The fallback branch (a peft release the copy was not checked against) writes what the copy writes."""
    model = trained_like(make_model())
    component = find_lora_model(model)
    if adapters == 2:
        component.model.add_adapter("other", lora_config())
    write_lora_adapters(component, tmp_path / "copy")
    monkeypatch.setattr(saving, "peft_save_is_mirrored", lambda: False)
    write_lora_adapters(component, tmp_path / "peft")
    monkeypatch.undo()
    copy, peft = tmp_path / "copy" / "lora_adapters", tmp_path / "peft" / "lora_adapters"
    files = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    assert files == sorted(str(p.relative_to(peft)) for p in peft.rglob("*"))  # no README.md either
    assert ("other/adapter_model.safetensors" in files) == (adapters == 2)
    for name in files:
        if name.endswith(".safetensors"):
            assert (copy / name).read_bytes() == (peft / name).read_bytes(), name
        elif name.endswith(".json"):
            assert json.loads((copy / name).read_text()) == json.loads((peft / name).read_text()), name
