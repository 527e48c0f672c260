"""DeepSpeed ZeRO-3 on 2 CPU processes through the real Trainer: complete adapters with either gather setting.

The two gather runs also train the heads through modules_to_save (on the Higgs stack HiggsAudioModel's
audio head, text head and codebook embeddings, with its text + audio loss): peft 2450 saved them as
torch.Size([0]) under ZeRO-3.
"""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from tests.testing_environment import need_module
from tests.testing_launch import torchrun
from tests.testing_models import (
    assert_resumed_exactly,
    final_adapter,
    heads_to_save,
    speech_logits_of,
    speech_probe,
    tiny_base_model,
)

HEADS = heads_to_save(tiny_base_model())

need_module("deepspeed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for gather in (1, 0):
        directory = tmp_path_factory.mktemp(f"zero3-gather{gather}")
        args = ["--heads", *([] if gather else ["--no-gather"])]
        torchrun("zero3_train.py", directory, *args, env={"DS_ACCELERATOR": "cpu"})
        out[gather] = directory
    return out


@pytest.mark.parametrize("gather", [1, 0], ids=["gather16bit", "no-gather"])
def test_zero3_adapters_are_complete_in_every_checkpoint_and_round_trip(runs, gather):
    directory = runs[gather]
    expected = [str(directory / sub / "lora_adapters") for sub in ("checkpoint-2", "checkpoint-4")]
    expected.append(str(directory / "lora_adapters"))
    base = dict(tiny_base_model().named_parameters())
    for adapter in expected:
        summary = verify_adapter(adapter)
        assert summary.num_tensors == 8 + len(HEADS) and summary.modules_to_save == sorted(HEADS)
        tensors = load_file(str(f"{adapter}/adapter_model.safetensors"))
        head_weights = [name for name in base if any(name.startswith(head + ".") for head in HEADS)]
        assert len(head_weights) >= len(HEADS)  # a head's weight may sit in a submodule (HiggsAudioV2's embeddings)
        for name in head_weights:  # full shape, not the torch.Size([0]) of a partitioned save; trained after warmup
            weight = tensors[f"base_model.model.{name}"]
            assert weight.shape == base[name].shape
            assert "checkpoint-2" in adapter or not torch.equal(weight, base[name]), (adapter, name)
    assert json.loads((directory / "rank-0.json").read_text())["saved"] == expected
    assert json.loads((directory / "rank-1.json").read_text())["saved"] == []  # only rank 0 wrote
    trained = torch.load(directory / "trained_speech_logits.pt")
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(directory / "lora_adapters"))
    untrained = speech_logits_of(tiny_base_model(), speech_probe())
    for name, logits in speech_logits_of(loaded, speech_probe()).items():  # text and (Higgs stack) audio logits
        torch.testing.assert_close(logits, trained[name], rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(untrained[name], trained[name], atol=1e-4), name


def test_both_gather_settings_save_the_same_adapters(runs):
    # The gathered-state-dict path (slice of what Trainer hands _save) and the gather-it-ourselves path agree.
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        a = load_file(str(runs[1] / sub / "lora_adapters" / "adapter_model.safetensors"))
        b = load_file(str(runs[0] / sub / "lora_adapters" / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_zero3_adapter_only_checkpoints_exclude_frozen_weights_and_resume_exactly(runs, tmp_path):
    env = {"DS_ACCELERATOR": "cpu"}
    torchrun("zero3_train.py", tmp_path / "a", "--adapter-only", "--heads", env=env)  # modules_to_save carried too
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    assert verify_adapter(checkpoint / "lora_adapters").modules_to_save == sorted(HEADS)
    # DeepSpeed's own checkpoint leaves the frozen base out: far smaller than the full run's
    module_states = sorted((checkpoint / "global_step2").glob("*model_states.pt"))
    full_states = sorted((runs[1] / "checkpoint-2" / "global_step2").glob("*model_states.pt"))
    assert module_states and sum(f.stat().st_size for f in module_states) * 10 < sum(
        f.stat().st_size for f in full_states
    )

    # Resumed by a trainer without Trainer's "backward compatibility" `self.deepspeed = self.model_wrapped`: the
    # engine that loads the checkpoint is taken from model_wrapped, which Trainer itself loads it through.
    resume = ["--adapter-only", "--heads", "--resume", checkpoint, "--no-deepspeed-attribute"]
    torchrun("zero3_train.py", tmp_path / "b", *resume, env=env)
    uninterrupted = final_adapter(tmp_path / "a")
    assert sorted(final_adapter(tmp_path / "b")) == sorted(uninterrupted)
    assert_resumed_exactly(tmp_path / "b", uninterrupted)


def test_zero3_adapter_only_load_best_model_at_end_ends_with_the_best_checkpoints_adapter(tmp_path):
    # the partitioned parameters take the best checkpoint through DeepSpeed's own loader, not a live in-place load
    torchrun("zero3_train.py", tmp_path, "--adapter-only", "--best-is-earliest", env={"DS_ACCELERATOR": "cpu"})
    final = load_file(str(tmp_path / "lora_adapters" / "adapter_model.safetensors"))
    best = load_file(str(tmp_path / "checkpoint-2" / "lora_adapters" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-4" / "lora_adapters" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(best) and all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)
