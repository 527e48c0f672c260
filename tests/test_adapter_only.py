"""Opt-in adapter-only checkpoints: no frozen base weights in checkpoint-N, and an exact resume from them."""

import pytest
import torch
from transformers import Trainer

from higgs_trainer import HiggsLoraTrainer, HiggsTrainerError, verify_adapter
from tests.testing_models import (
    EarliestIsBest,
    RandomTokens,
    assert_resumed_exactly,
    final_adapter,
    make_model,
    training_args,
)


def run(output_dir, resume=None, **overrides):
    trainer = HiggsLoraTrainer(
        model=make_model(), args=training_args(output_dir, **overrides), train_dataset=RandomTokens(),
        adapter_only_checkpoints=True,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


def test_checkpoints_hold_the_adapter_and_training_state_but_no_base_weights(tmp_path):
    run(tmp_path)
    for step in (2, 4):
        checkpoint = tmp_path / f"checkpoint-{step}"
        names = {p.name for p in checkpoint.iterdir()}
        assert not names & {"model.safetensors", "pytorch_model.bin"}
        assert {"lora_adapters", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
        verify_adapter(checkpoint / "lora_adapters")
        size = sum(f.stat().st_size for f in (checkpoint / "lora_adapters").rglob("*"))
        assert size < (tmp_path / "model.safetensors").stat().st_size / 10
    assert (tmp_path / "model.safetensors").is_file()  # the final save_model() stays a full save


def test_resume_from_an_adapter_only_checkpoint_is_exact(tmp_path):
    run(tmp_path / "a")
    run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert_resumed_exactly(tmp_path / "b", final_adapter(tmp_path / "a"))
    # (had the adapter not been loaded, steps 3-4 would start from lora_B == 0 and end elsewhere)


def test_plain_trainer_cannot_resume_a_wrapper_from_an_adapter_only_checkpoint(tmp_path):
    run(tmp_path / "a")
    trainer = Trainer(model=make_model(), args=training_args(tmp_path / "b"), train_dataset=RandomTokens())
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_load_best_model_at_end_from_adapter_only_checkpoints(tmp_path):
    trainer = HiggsLoraTrainer(
        model=make_model(),
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
        adapter_only_checkpoints=True,
    )
    trainer.train()
    trainer.save_model()
    best = final_adapter(tmp_path / "checkpoint-2")
    final = final_adapter(tmp_path)
    assert all(torch.equal(final[k], v) for k, v in best.items())
    assert any(not torch.equal(final[k], v) for k, v in final_adapter(tmp_path / "checkpoint-4").items())


def test_only_checkpoints_are_adapter_only_not_other_internal_saves(tmp_path):
    # push_to_hub calls save_model(_internal_call=True) for the final model: that save stays a full one
    trainer = run(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    trainer.save_model(_internal_call=True)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_only_checkpoint.json").exists()
    assert (tmp_path / "checkpoint-2" / "adapter_only_checkpoint.json").is_file()


def test_a_checkpoint_without_the_marker_is_not_taken_for_adapter_only(tmp_path):
    from higgs_trainer.training.resuming import is_adapter_only_checkpoint

    run(tmp_path)
    assert is_adapter_only_checkpoint(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "adapter_only_checkpoint.json").unlink()  # e.g. FSDP's sharded checkpoint layout
    assert not is_adapter_only_checkpoint(tmp_path / "checkpoint-2")


def test_trainable_parameters_outside_the_peft_model_are_refused(tmp_path):
    model = make_model()
    model.head_scale = torch.nn.Parameter(torch.ones(1))  # trainable, outside the PeftModel: not in the adapter
    with pytest.raises(HiggsTrainerError, match=r"1 trainable parameter\(s\) lie outside it \('head_scale'\)"):
        HiggsLoraTrainer(
            model=model, args=training_args(tmp_path), train_dataset=RandomTokens(), adapter_only_checkpoints=True
        )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
