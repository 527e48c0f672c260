"""HiggsLoraTrainer with the real Trainer and peft, on the real HiggsAudioModel (Higgs stack) or HiggsAudioV2 (newest)."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from higgs_trainer import HiggsLoraTrainer, HiggsTrainerError, LoraAdapterSavingMixin, find_lora_model, verify_adapter
from tests.testing_models import (
    HIGGS_STACK,
    EarliestIsBest,
    RandomTokens,
    assert_resumed_exactly,
    assert_same_tensors,
    causal_lm_loss,
    logits_loss,
    logits_of,
    make_model,
    probe_batch,
    tiny_base_model,
    tiny_llama,
    training_args,
)


class RecordLora(TrainerCallback):
    """Snapshot the in-memory adapter at the end of every step."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        peft_model = find_lora_model(model).model
        self.by_step[state.global_step] = {
            k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()
        }


def adapter_of(directory) -> dict:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


class LossFromLogitsTrainer(HiggsLoraTrainer):
    """For a bare PeftModel around a model that computes no loss (HiggsAudioModel; HiggsAudioV2 computes its own)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = causal_lm_loss(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss


def train(tmp_path, layout="model", trainer_cls=None, **arg_overrides):
    model = make_model(layout)
    trainer_cls = trainer_cls or (LossFromLogitsTrainer if layout == "top" and HIGGS_STACK else HiggsLoraTrainer)
    recorder = RecordLora()
    trainer = trainer_cls(
        model=model, args=training_args(tmp_path, **arg_overrides), train_dataset=RandomTokens(), callbacks=[recorder]
    )
    trainer.train()
    trainer.save_model()
    return trainer, model, recorder


@pytest.mark.parametrize("layout", ["model", "text_model", "top"])
def test_every_checkpoint_and_final_hold_the_adapter_of_their_step(tmp_path, layout):
    trainer, model, recorder = train(tmp_path, layout)
    for step in (2, 4):
        directory = tmp_path / f"checkpoint-{step}" / "lora_adapters"
        verify_adapter(directory)
        assert_same_tensors(adapter_of(directory), recorder.by_step[step])
    assert_same_tensors(adapter_of(tmp_path / "lora_adapters"), recorder.by_step[4])
    # the full checkpoint is still written as Trainer writes it
    full = "adapter_model.safetensors" if layout == "top" else "model.safetensors"
    assert (tmp_path / "checkpoint-2" / full).is_file() and (tmp_path / full).is_file()
    assert not list(tmp_path.glob(".lora_adapters*")), "temporary residue left behind"
    # keys are what PeftModel.from_pretrained and merger.py expect: no wrapper prefix, no '.default'
    keys = list(adapter_of(tmp_path / "lora_adapters"))
    assert keys and all(k.startswith("base_model.model.") and ".default." not in k for k in keys)


@pytest.mark.parametrize("layout", ["model", "text_model"])
def test_adapter_round_trips_trained_logits_on_a_bare_base(tmp_path, layout):
    trainer, model, _ = train(tmp_path, layout)
    batch = probe_batch()
    trained = logits_of(model, batch)
    base_logits = logits_of(tiny_base_model(), batch)
    assert not torch.allclose(trained, base_logits, atol=1e-4), "training did not change the model"

    loaded = PeftModel.from_pretrained(tiny_base_model(), str(tmp_path / "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, batch), trained, rtol=1e-5, atol=1e-5)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits_of(merged, batch), trained, rtol=1e-4, atol=1e-4)


def test_log_line_names_path_component_tensors_bytes_seconds(tmp_path, caplog):
    train(tmp_path, max_steps=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved LoRA adapter")]
    assert len(lines) == 2  # checkpoint-2 and the final save
    assert str(tmp_path / "checkpoint-2" / "lora_adapters") in lines[0]
    assert "component model" in lines[0] and "8 tensors" in lines[0] and " s)" in lines[0]


def test_mixin_on_a_custom_trainer_with_its_own_compute_loss(tmp_path):
    calls = []

    class HiggsAudioTrainer(LoraAdapterSavingMixin, Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            calls.append(1)
            labels, audio_labels = inputs.pop("labels"), inputs.pop("audio_labels", None)
            outputs = model(**inputs)
            loss = logits_loss(outputs["logits"], labels, dict(inputs, audio_labels=audio_labels))
            return (loss, outputs) if return_outputs else loss

    model = make_model(compute_loss=False)
    trainer = HiggsAudioTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=RandomTokens())
    trainer.train()
    assert len(calls) == 2
    verify_adapter(tmp_path / "checkpoint-2" / "lora_adapters")
    assert_same_tensors(
        adapter_of(tmp_path / "checkpoint-2" / "lora_adapters"),
        get_peft_model_state_dict(model.model, save_embedding_layers=False),
    )


def test_save_total_limit_keeps_each_checkpoints_adapter(tmp_path):
    _, _, recorder = train(tmp_path, max_steps=6, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for step in (4, 6):
        assert_same_tensors(adapter_of(tmp_path / f"checkpoint-{step}" / "lora_adapters"), recorder.by_step[step])


def test_load_best_model_at_end_saves_the_best_checkpoints_adapter(tmp_path):
    model = make_model()
    trainer = HiggsLoraTrainer(
        model=model,
        args=training_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="step_score",
            greater_is_better=True,
        ),  # fmt: skip
        train_dataset=RandomTokens(),
        eval_dataset=RandomTokens(n=4, seed=5),
        callbacks=[EarliestIsBest()],
    )
    trainer.train()
    trainer.save_model()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    final = adapter_of(tmp_path / "lora_adapters")
    assert_same_tensors(final, adapter_of(tmp_path / "checkpoint-2" / "lora_adapters"))
    last = adapter_of(tmp_path / "checkpoint-4" / "lora_adapters")
    assert any(not torch.equal(final[k], v) for k, v in last.items())


def test_resume_from_checkpoint_gives_the_uninterrupted_adapter(tmp_path):
    train(tmp_path, max_steps=4)
    uninterrupted = adapter_of(tmp_path / "lora_adapters")
    resumed_dir = tmp_path / "resumed"
    resumed = HiggsLoraTrainer(
        model=make_model(), args=training_args(resumed_dir, max_steps=4), train_dataset=RandomTokens()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed.save_model()
    assert resumed.state.global_step == 4
    assert_resumed_exactly(resumed_dir, uninterrupted)
    assert json.loads((resumed_dir / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_the_mixin_placed_after_the_trainer_is_refused_at_class_creation():
    with pytest.raises(TypeError, match="must come before the Trainer class"):

        class Wrong(Trainer, LoraAdapterSavingMixin):
            pass


def test_save_embedding_layers_needs_a_base_with_input_embeddings(tmp_path):
    args = dict(model=make_model(), args=training_args(tmp_path), train_dataset=RandomTokens())
    if HIGGS_STACK:  # HiggsAudioModel.get_input_embeddings raises NotImplementedError: refused before training
        with pytest.raises(HiggsTrainerError, match="save_embedding_layers=True needs a base model"):
            HiggsLoraTrainer(**args, save_embedding_layers=True)
    else:
        HiggsLoraTrainer(**args, save_embedding_layers=True).train()
        assert any(
            "embed_tokens" in k
            for k in load_file(str(tmp_path / "checkpoint-2" / "lora_adapters" / "adapter_model.safetensors"))
        )


def test_any_wrapped_peft_model_a_plain_llama(tmp_path):
    """Nothing here is Higgs-specific: a wrapped LlamaForCausalLM saves its adapters the same way."""
    model = make_model("model", base=tiny_llama())
    recorder = RecordLora()
    trainer = HiggsLoraTrainer(
        model=model, args=training_args(tmp_path), train_dataset=RandomTokens(audio=False), callbacks=[recorder]
    )
    trainer.train()
    for step in (2, 4):
        assert_same_tensors(adapter_of(tmp_path / f"checkpoint-{step}" / "lora_adapters"), recorder.by_step[step])
    probe = probe_batch(audio=False)
    trained = logits_of(model, probe)
    assert not torch.allclose(logits_of(tiny_llama(), probe), trained, atol=1e-4)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "checkpoint-4" / "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, probe), trained, rtol=1e-5, atol=1e-5)
