"""DDP with real torchrun on 2 CPU processes (gloo): only rank 0 writes, every adapter is complete and round-trips."""

import json

import torch
from peft import PeftModel

from higgs_trainer import verify_adapter
from tests.launch import torchrun
from tests.models import logits_of, probe_batch, tiny_base_model


def test_ddp_writes_adapters_from_rank_0_only_and_they_round_trip(tmp_path):
    torchrun("ddp_run.py", tmp_path)
    expected = [str(tmp_path / sub / "lora_adapters") for sub in ("checkpoint-2", "checkpoint-4")]
    expected.append(str(tmp_path / "lora_adapters"))
    for directory in expected:
        assert verify_adapter(directory).num_tensors == 8
    assert json.loads((tmp_path / "rank-0.json").read_text())["saved"] == expected
    assert json.loads((tmp_path / "rank-1.json").read_text())["saved"] == []

    trained = torch.load(tmp_path / "trained_logits.pt")
    assert not torch.allclose(logits_of(tiny_base_model(), probe_batch()), trained, atol=1e-4)
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(tmp_path / "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, probe_batch()), trained, rtol=1e-5, atol=1e-5)
