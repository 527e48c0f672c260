"""DDP with real torchrun on 2 CPU processes (gloo): only rank 0 writes, every adapter is complete and round-trips,
and a resume from checkpoint-2 ends with the adapter of the uninterrupted run."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from tests.testing_launch import torchrun
from tests.testing_models import assert_same_tensors, logits_of, probe_batch, tiny_base_model


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One uninterrupted 4-step DDP run (checkpoint-2, checkpoint-4, final)."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_run.py", out)
    return out


def test_ddp_writes_adapters_from_rank_0_only_and_they_round_trip(ddp_run):
    expected = [str(ddp_run / sub / "lora_adapters") for sub in ("checkpoint-2", "checkpoint-4")]
    expected.append(str(ddp_run / "lora_adapters"))
    for directory in expected:
        assert verify_adapter(directory).num_tensors == 8
    assert json.loads((ddp_run / "rank-0.json").read_text())["saved"] == expected
    assert json.loads((ddp_run / "rank-1.json").read_text())["saved"] == []

    trained = torch.load(ddp_run / "trained_logits.pt")
    assert not torch.allclose(logits_of(tiny_base_model(), probe_batch()), trained, atol=1e-4)
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(ddp_run / "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, probe_batch()), trained, rtol=1e-5, atol=1e-5)


def test_ddp_resume_from_checkpoint_2_ends_with_the_uninterrupted_runs_adapter(ddp_run, tmp_path):
    """On the Higgs stack (transformers 4.46.3) this needs the _compat map_location shim: without it both ranks fail."""
    torchrun("ddp_run.py", tmp_path, ddp_run / "checkpoint-2")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text())["global_step"] == 4
    saved = [str(tmp_path / "checkpoint-4" / "lora_adapters"), str(tmp_path / "lora_adapters")]
    assert json.loads((tmp_path / "rank-0.json").read_text())["saved"] == saved
    assert not (tmp_path / "checkpoint-2").exists(), "the resumed run starts after step 2"

    def adapter(run):
        return load_file(str(run / "lora_adapters" / "adapter_model.safetensors"))

    assert_same_tensors(adapter(tmp_path), adapter(ddp_run))
    assert_same_tensors(
        load_file(str(tmp_path / "checkpoint-4" / "lora_adapters" / "adapter_model.safetensors")),
        load_file(str(ddp_run / "checkpoint-4" / "lora_adapters" / "adapter_model.safetensors")),
    )
