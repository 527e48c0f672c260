"""DeepSpeed ZeRO-3 on 2 CPU processes through the real Trainer: complete adapters with either gather setting."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from tests.launch import torchrun
from tests.models import logits_of, probe_batch, tiny_base_model

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for gather in (1, 0):
        directory = tmp_path_factory.mktemp(f"zero3-gather{gather}")
        torchrun("zero3_train.py", directory, *([] if gather else ["--no-gather"]), env={"DS_ACCELERATOR": "cpu"})
        out[gather] = directory
    return out


@pytest.mark.parametrize("gather", [1, 0], ids=["gather16bit", "no-gather"])
def test_zero3_adapters_are_complete_in_every_checkpoint_and_round_trip(runs, gather):
    directory = runs[gather]
    expected = [str(directory / sub / "lora_adapters") for sub in ("checkpoint-2", "checkpoint-4")]
    expected.append(str(directory / "lora_adapters"))
    for adapter in expected:
        summary = verify_adapter(adapter)
        assert summary.num_tensors == 8 and summary.num_bytes > 0
    assert json.loads((directory / "rank-0.json").read_text())["saved"] == expected
    assert json.loads((directory / "rank-1.json").read_text())["saved"] == []  # only rank 0 wrote
    trained = torch.load(directory / "trained_logits.pt")
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(directory / "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, probe_batch()), trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(tiny_base_model(), probe_batch()), trained, atol=1e-4)


def test_both_gather_settings_save_the_same_adapters(runs):
    # The gathered-state-dict path (slice of what Trainer hands _save) and the gather-it-ourselves path agree.
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        a = load_file(str(runs[1] / sub / "lora_adapters" / "adapter_model.safetensors"))
        b = load_file(str(runs[0] / sub / "lora_adapters" / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_zero3_adapter_only_checkpoints_exclude_frozen_weights_and_resume_exactly(runs, tmp_path):
    env = {"DS_ACCELERATOR": "cpu"}
    torchrun("zero3_train.py", tmp_path / "a", "--adapter-only", env=env)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    verify_adapter(checkpoint / "lora_adapters")
    # DeepSpeed's own checkpoint leaves the frozen base out: far smaller than the full run's
    module_states = sorted((checkpoint / "global_step2").glob("*model_states.pt"))
    full_states = sorted((runs[1] / "checkpoint-2" / "global_step2").glob("*model_states.pt"))
    assert module_states and sum(f.stat().st_size for f in module_states) * 10 < sum(
        f.stat().st_size for f in full_states
    )

    torchrun("zero3_train.py", tmp_path / "b", "--adapter-only", "--resume", checkpoint, env=env)
    uninterrupted = load_file(str(tmp_path / "a" / "lora_adapters" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "lora_adapters" / "adapter_model.safetensors"))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_zero3_adapter_only_load_best_model_at_end_ends_with_the_best_checkpoints_adapter(tmp_path):
    # the partitioned parameters take the best checkpoint through DeepSpeed's own loader, not a live in-place load
    torchrun("zero3_train.py", tmp_path, "--adapter-only", "--best-is-earliest", env={"DS_ACCELERATOR": "cpu"})
    final = load_file(str(tmp_path / "lora_adapters" / "adapter_model.safetensors"))
    best = load_file(str(tmp_path / "checkpoint-2" / "lora_adapters" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-4" / "lora_adapters" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(best) and all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)
