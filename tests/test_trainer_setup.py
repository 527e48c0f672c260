"""Setups refused (or supported) when the trainer is created, before any training: non-LoRA adapters, the mixin
without a Trainer, a torch.compile'd submodule; and the DeepSpeed shims on a real engine."""

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

from higgs_trainer import HiggsLoraTrainer, HiggsTrainerError, LoraAdapterSavingMixin, verify_adapter
from tests.testing_environment import need_module
from tests.testing_launch import torchrun
from tests.testing_models import (
    HIGGS_STACK,
    RandomTokens,
    Wrapper,
    logits_of,
    make_model,
    probe_batch,
    tiny_base_model,
    training_args,
)


def test_a_non_lora_peft_model_is_refused_before_training(tmp_path):
    ia3 = get_peft_model(tiny_base_model(), IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]))
    with pytest.raises(HiggsTrainerError, match="'default' is IA3.*LoRA adapters only"):
        HiggsLoraTrainer(model=Wrapper(ia3), args=training_args(tmp_path, max_steps=2), train_dataset=RandomTokens())
    assert list(tmp_path.iterdir()) == []


def test_the_mixin_without_a_trainer_says_so(tmp_path):
    class NotATrainer(LoraAdapterSavingMixin):
        pass

    with pytest.raises(TypeError, match=r"without a transformers.Trainer.*\(LoraAdapterSavingMixin, Trainer\)"):
        NotATrainer(model=make_model(), args=training_args(tmp_path))


def assert_adapters_round_trip(trainer, model, out):
    trainer.train()
    trainer.save_model()
    for directory in (out / "checkpoint-2" / "lora_adapters", out / "lora_adapters"):
        verify_adapter(directory)
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(out / "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, probe_batch()), logits_of(model, probe_batch()), rtol=0, atol=0)


def test_a_compiled_submodule(tmp_path):
    """``wrapper.model = torch.compile(wrapper.model)``: saved and round-tripped where accelerate can unwrap it; on
    accelerate 1.9 (Higgs stack), where transformers.Trainer itself fails on it, a clear error instead of KeyError."""
    model = make_model()
    model.model = torch.compile(model.model, backend="eager")  # eager: no C++ compiler needed
    args = training_args(tmp_path, max_steps=2)
    if HIGGS_STACK:
        with pytest.raises(HiggsTrainerError, match=r"torch.compile'd submodule.*torch_compile=True"):
            HiggsLoraTrainer(model=model, args=args, train_dataset=RandomTokens())
        return
    assert_adapters_round_trip(HiggsLoraTrainer(model=model, args=args, train_dataset=RandomTokens()), model, tmp_path)


def test_a_model_compiled_by_the_trainer(tmp_path):
    model = make_model()
    args = training_args(tmp_path, max_steps=2, torch_compile=True, torch_compile_backend="eager")
    trainer = HiggsLoraTrainer(model=model, args=args, train_dataset=RandomTokens())
    assert_adapters_round_trip(trainer, model, tmp_path)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"


def test_deepspeed_shims_are_idempotent_and_restore_what_they_replace(tmp_path):
    need_module("deepspeed")
    output = torchrun("deepspeed_shims.py", tmp_path, nproc=1, env={"DS_ACCELERATOR": "cpu"})
    assert "shims ok" in output
