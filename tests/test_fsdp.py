"""FSDP2 and FSDP1 sharding on 2 CPU processes: the adapter built from a gathered full state dict and from sharded parameters."""

import pytest
import torch
from peft import PeftModel
from peft.tuners import tuners_utils
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from tests.launch import torchrun
from tests.models import logits_of, probe_batch, tiny_base_model

# Newer peft (0.21 here, not 0.16) selects adapter keys by the names of the tuner modules.
PEFT_SELECTS_BY_MODULE_NAMES = hasattr(tuners_utils, "_get_tuner_state_dict_key_prefixes")


@pytest.mark.parametrize("version", ["fsdp2", "fsdp1"])
def test_fsdp_full_and_sharded_state_dicts_give_the_same_complete_adapter(tmp_path, version):
    torchrun("fsdp_save.py", tmp_path, version)
    if version == "fsdp1" and PEFT_SELECTS_BY_MODULE_NAMES:
        # such peft picks adapter keys by module names, which FSDP1 prefixes with `_fsdp_wrapped_module.` while
        # FSDP's state dicts drop it: peft selects nothing, and the save is refused loudly instead of writing it.
        for how in ("full", "sharded"):
            assert "the adapter holds no tensors" in (tmp_path / f"{how}.refused").read_text()
            assert not (tmp_path / how / "lora_adapters").exists()
        return
    assert not list(tmp_path.glob("*.refused"))
    trained = torch.load(tmp_path / "trained_logits.pt")
    assert not torch.allclose(logits_of(tiny_base_model(), probe_batch()), trained, atol=1e-4)
    adapters = {}
    for how in ("full", "sharded"):
        directory = tmp_path / how / "lora_adapters"
        assert verify_adapter(directory).num_tensors == 8
        adapters[how] = load_file(str(directory / "adapter_model.safetensors"))
        loaded = PeftModel.from_pretrained(tiny_base_model(), str(directory))
        torch.testing.assert_close(logits_of(loaded, probe_batch()), trained, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(adapters["full"][k], adapters["sharded"][k]) for k in adapters["full"])
