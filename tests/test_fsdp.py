"""FSDP2 and FSDP1 sharding on 2 CPU processes: the adapter built from a gathered full state dict and from sharded parameters.

The model also trains its heads through modules_to_save (HiggsAudioModel's on the Higgs stack): they are
gathered and saved at full shape like the LoRA tensors.
"""

import json

import pytest
import torch
from accelerate import FullyShardedDataParallelPlugin
from peft import PeftModel
from peft.tuners import tuners_utils
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from higgs_trainer.training.trainer import fsdp_saves_full_state_dict
from tests.testing_launch import torchrun
from tests.testing_models import (
    HIGGS_STACK,
    heads_to_save,
    logits_of,
    probe_batch,
    speech_logits_of,
    speech_probe,
    tiny_base_model,
)

HEADS = heads_to_save(tiny_base_model())

# Newer peft (0.21 here, not 0.16) selects adapter keys by the names of the tuner modules.
PEFT_SELECTS_BY_MODULE_NAMES = hasattr(tuners_utils, "_get_tuner_state_dict_key_prefixes")


@pytest.mark.parametrize("version", ["fsdp2", "fsdp1", "fsdp1-flat"])
def test_fsdp_full_and_sharded_state_dicts_give_the_same_complete_adapter(tmp_path, version):
    """fsdp1-flat: use_orig_params=False with PEFT's fsdp_auto_wrap_policy (each trainable layer its own unit)."""
    torchrun("fsdp_save.py", tmp_path, version)
    for rank in (0, 1) if version != "fsdp2" else ():  # FSDP1's sharded save moves the adapter's parameters only
        gather = json.loads((tmp_path / f"gather-rank{rank}.json").read_text())
        if version == "fsdp1":  # each adapter parameter from the ranks' pieces: no unit unsharded
            assert gather["unsharded"] == [], gather
            assert 0 < gather["moved"] <= gather["adapter"] < gather["frozen"], gather
        else:  # only the units of trainable layers unsharded, each alone: no frozen weight
            assert 0 < sum(gather["unsharded"]) == gather["adapter"] < gather["frozen"], gather
    if version.startswith("fsdp1") and PEFT_SELECTS_BY_MODULE_NAMES:
        # such peft picks adapter keys by module names, which FSDP1 prefixes with `_fsdp_wrapped_module.` while
        # FSDP's state dicts drop it: peft selects no LoRA tensor (only the modules_to_save ones), and the save is
        # refused loudly instead of writing an adapter without LoRA.
        for how in ("full", "sharded"):
            assert "selected the LoRA tensors of 0 of the 4 LoRA layers" in (tmp_path / f"{how}.refused").read_text()
            assert not (tmp_path / how / "lora_adapters").exists()
        return
    assert not list(tmp_path.glob("*.refused"))
    logged = torch.load(tmp_path / "trained_logits.pt")
    trained, text_only = logged["speech"], logged["text_only"]
    untrained = speech_logits_of(tiny_base_model(), speech_probe())
    assert all(not torch.allclose(untrained[name], trained[name], atol=1e-4) for name in trained)
    # FSDP1 units hide HiggsAudioModel's DualFFN layers from its isinstance check: its own forward of audio tokens
    # differs from the model's, so there only the text-only probe is compared (docs/distributed.md).
    compare_speech = version == "fsdp2" or not HIGGS_STACK
    base = dict(tiny_base_model().named_parameters())
    adapters = {}
    heads = HEADS if version != "fsdp1-flat" else []  # fsdp_save.py: fsdp1-flat trains LoRA only
    for how in ("full", "sharded"):
        directory = tmp_path / how / "lora_adapters"
        summary = verify_adapter(directory)
        assert summary.num_tensors == 8 + len(heads) and summary.modules_to_save == sorted(heads)
        adapters[how] = load_file(str(directory / "adapter_model.safetensors"))
        head_weights = [name for name in base if any(name.startswith(head + ".") for head in heads)]
        assert len(head_weights) >= len(heads)  # a head's weight may sit in a submodule (HiggsAudioV2's embeddings)
        for name in head_weights:
            weight = adapters[how][f"base_model.model.{name}"]
            assert weight.shape == base[name].shape and not torch.equal(weight, base[name]), name
        loaded = PeftModel.from_pretrained(tiny_base_model(), str(directory))
        torch.testing.assert_close(logits_of(loaded, probe_batch()), text_only, rtol=1e-5, atol=1e-5)
        for name, logits in speech_logits_of(loaded, speech_probe()).items() if compare_speech else ():
            torch.testing.assert_close(logits, trained[name], rtol=1e-5, atol=1e-5, msg=name)  # text and audio
    assert all(torch.equal(adapters["full"][k], adapters["sharded"][k]) for k in adapters["full"])


def test_one_process_fsdp1_state_dict_holds_the_frozen_root_parameters_after_training(tmp_path):
    # FSDP1 NO_SHARD leaves the frozen root's parameters as plain tensors after a backward pass; Trainer.save_model
    # then fails inside FSDP (seen on an H200 with the Higgs stack). The shim registers them again, every step.
    torchrun("fsdp_one_process.py", tmp_path, nproc=1)
    result = json.loads((tmp_path / "result.json").read_text())
    for step in (0, 1):
        assert "embed_tokens.weight is in the state_dict" in result[f"unfixed_{step}"], result
        assert result[f"fixed_units_{step}"] == 1, result
        assert result[f"keys_{step}"] and result[f"frozen_still_frozen_{step}"], result


@pytest.mark.parametrize(
    ("configured", "full"),
    [("FULL_STATE_DICT", True), ("full_state_dict", True), ("1", True), (None, True)]
    + [("SHARDED_STATE_DICT", False), ("3", False), ("LOCAL_STATE_DICT", False)],
)
def test_the_state_dict_type_is_read_as_the_enum_accelerate_makes_of_it(configured, full):
    """Trainer hands _save a state dict only under FULL_STATE_DICT; otherwise the mixin gathers the adapter itself."""
    assert fsdp_saves_full_state_dict(FullyShardedDataParallelPlugin(state_dict_type=configured)) is full
