"""FSDP2 sharding on 2 CPU processes: the adapter built from a gathered full state dict and from sharded parameters."""

import torch
from peft import PeftModel
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from tests.launch import torchrun
from tests.models import logits_of, probe_batch, tiny_base_model


def test_fsdp_full_and_sharded_state_dicts_give_the_same_complete_adapter(tmp_path):
    torchrun("fsdp_save.py", tmp_path)
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
