"""Saving with the real Trainer and peft: fail-fast discovery, atomic writes under failure, refused bad state dicts."""

import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from higgs_trainer import (
    AdapterSaveError,
    AdapterVerificationError,
    AmbiguousLoraModelError,
    HiggsLoraTrainer,
    LoraModelNotFoundError,
    SavedAdapter,
    find_lora_model,
    save_lora_adapters,
    verify_adapter,
)
from higgs_trainer.training import saving
from higgs_trainer.training.saving import clone_shared_tensors, write_lora_adapters
from tests.testing_models import (
    RandomTokens,
    TwoComponents,
    Wrapper,
    assert_same_tensors,
    logits_of,
    make_model,
    probe_batch,
    tiny_base_model,
    training_args,
)


def files_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative name, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in files_under(directory) if p.is_file()}


def residue(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith((".lora_adapters.tmp-", ".lora_adapters.old-"))
    )


# a. discovery at construction


def test_trainer_without_a_peft_model_fails_at_construction_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoraModelNotFoundError, match="get_peft_model"):
        HiggsLoraTrainer(
            model=Wrapper(tiny_base_model()), args=training_args(out, max_steps=2), train_dataset=RandomTokens()
        )
    assert files_under(out) == []


def test_trainer_with_two_peft_components_is_ambiguous(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AmbiguousLoraModelError, match=r"'a'.*'b'"):
        HiggsLoraTrainer(model=TwoComponents(), args=training_args(out, max_steps=2), train_dataset=RandomTokens())
    assert files_under(out) == []


def test_lora_model_path_trains_and_saves_only_that_component(tmp_path):
    model = TwoComponents()
    trainer = HiggsLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=RandomTokens(), lora_model_path="b"
    )
    trainer.train()
    trainer.save_model()
    assert trainer.last_saved_adapter.component_path == "b"
    expected_b = get_peft_model_state_dict(model.b, save_embedding_layers=False)
    for directory in (tmp_path / "checkpoint-2" / "lora_adapters", tmp_path / "lora_adapters"):
        verify_adapter(directory)
        saved = load_file(str(directory / "adapter_model.safetensors"))
        assert_same_tensors(saved, expected_b)
    # and it is not a's adapter (a was trained from other initial weights)
    expected_a = get_peft_model_state_dict(model.a, save_embedding_layers=False)
    assert any(not torch.equal(saved[k], expected_a[k]) for k in expected_a)


# b. a save that fails midway leaves the previous adapter intact


@pytest.fixture
def saved_once(tmp_path):
    model = make_model()
    component = find_lora_model(model)
    out = tmp_path / "out"
    write_lora_adapters(component, out)
    before = snapshot(out / "lora_adapters")
    with torch.no_grad():
        for name, param in component.model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    return component, out, before


def break_adapter_write(monkeypatch, damage):
    """Damage the adapter's weights file as it is written (saving writes it with safetensors' save_file)."""
    real = saving.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        damage(Path(filename))

    monkeypatch.setattr(saving, "save_file", save_file)


def disk_full(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    raise OSError(28, "No space left on device")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(b"\x13\x37" * (size // 2))


@pytest.mark.parametrize(
    ("damage", "error", "text"),
    [
        (disk_full, AdapterSaveError, "No space left on device"),
        (truncate, AdapterVerificationError, "truncated or corrupt"),
        (garbage, AdapterVerificationError, "truncated or corrupt"),
    ],
    ids=["enospc", "truncated", "garbage"],
)
def test_a_failed_save_leaves_the_previous_adapter_byte_identical(monkeypatch, saved_once, damage, error, text):
    component, out, before = saved_once
    break_adapter_write(monkeypatch, damage)
    with pytest.raises(error, match=text) as info:
        write_lora_adapters(component, out)
    assert "intact" in str(info.value)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(before)
    assert snapshot(out / "lora_adapters") == before  # same files, same bytes
    assert residue(out) == []

    monkeypatch.undo()  # the next save works and replaces the adapter with the changed weights
    write_lora_adapters(component, out)
    assert snapshot(out / "lora_adapters")["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert residue(out) == []


def test_a_failed_final_rename_moves_the_previous_adapter_back(monkeypatch, saved_once):
    component, out, before = saved_once
    real_rename = os.rename

    def rename(source, target):  # the move of the new adapter into place fails; moving the old one aside works
        if ".tmp-" in str(source):
            raise OSError(5, "Input/output error")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(AdapterSaveError, match="Input/output error"):
        write_lora_adapters(component, out)
    monkeypatch.undo()
    assert snapshot(out / "lora_adapters") == before
    assert residue(out) == []


def test_a_previous_adapter_left_moved_aside_by_a_crash_is_restored(saved_once):
    component, out, before = saved_once
    # a process killed between the two renames leaves the previous adapter only as .lora_adapters.old-*
    os.rename(out / "lora_adapters", out / ".lora_adapters.old-deadbeef")
    from higgs_trainer.files.atomic import remove_residue

    remove_residue(out / "lora_adapters")
    assert snapshot(out / "lora_adapters") == before
    assert residue(out) == []


# c. state dicts that must not be written


def test_a_state_dict_without_the_components_keys_is_refused(tmp_path):
    component = find_lora_model(make_model())
    out = tmp_path / "out"
    for state_dict in ({}, {"other.weight": torch.ones(2, 2), "head.bias": torch.ones(2)}):
        with pytest.raises(AdapterSaveError, match=r"no tensors under 'model'") as info:
            write_lora_adapters(component, out, state_dict=state_dict)
        assert "empty adapter" in str(info.value)
    assert files_under(out) == []


def test_an_adapter_of_empty_partitioned_tensors_is_refused(tmp_path):
    model = make_model()
    component = find_lora_model(model)
    # what a ZeRO-3 model without gathering hands over: the keys are there, the local LoRA shards are empty
    state_dict = {key: (torch.empty(0) if "lora_" in key else value) for key, value in model.state_dict().items()}
    out = tmp_path / "out"
    with pytest.raises(AdapterVerificationError, match="empty") as info:
        write_lora_adapters(component, out, state_dict=state_dict)
    assert "ZeRO-3" in str(info.value) and "wrong shape" in str(info.value)
    assert not (out / "lora_adapters").exists()
    assert residue(out) == []


def test_a_live_state_dict_writes_the_files_the_live_model_would(tmp_path):
    """state_dict_is_live (Trainer._save's own model.state_dict()) takes the expected shapes from it: same files."""
    model = make_model()
    component = find_lora_model(model)
    live = write_lora_adapters(component, tmp_path / "live")
    sliced = write_lora_adapters(component, tmp_path / "sliced", state_dict=model.state_dict(), state_dict_is_live=True)
    assert sliced.num_tensors == live.num_tensors > 0
    assert snapshot(tmp_path / "sliced" / "lora_adapters") == snapshot(tmp_path / "live" / "lora_adapters")


# d. save_lora_adapters for scripts that keep a plain Trainer


def test_save_lora_adapters_with_use_lora_false_writes_nothing(tmp_path):
    trainer = Trainer(
        model=make_model(), args=training_args(tmp_path / "run", max_steps=2), train_dataset=RandomTokens()
    )
    assert save_lora_adapters(trainer, tmp_path / "final", use_lora=False) is None
    assert not (tmp_path / "final").exists()


def test_save_lora_adapters_on_a_plain_trainer_round_trips_logits(tmp_path):
    model = make_model()
    # no checkpoints: only the final save is under test
    args = training_args(tmp_path / "run", max_steps=2, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
    trainer.train()
    saved = save_lora_adapters(trainer, tmp_path / "final", use_lora=True)
    assert isinstance(saved, SavedAdapter)
    assert saved.path == str(tmp_path / "final" / "lora_adapters")
    assert saved.component_path == "model" and saved.num_tensors == 8 and saved.num_bytes > 0

    batch = probe_batch()
    trained = logits_of(model, batch)
    assert not torch.allclose(trained, logits_of(tiny_base_model(), batch), atol=1e-4)
    loaded = PeftModel.from_pretrained(tiny_base_model(), saved.path)
    torch.testing.assert_close(logits_of(loaded, batch), trained, rtol=1e-5, atol=1e-5)


# e. tied tensors


def test_clone_shared_tensors_gives_aliases_their_own_storage():
    shared = torch.arange(6.0)
    empty = torch.empty(0)
    state = {"a": shared, "b": shared, "c": shared.view(2, 3), "d": torch.ones(2), "e": empty, "f": empty}
    result = clone_shared_tensors(state)
    assert list(result) == list(state)
    assert result["a"] is shared  # the first alias is kept as is
    ptrs = [result[k].untyped_storage().data_ptr() for k in "abcd"]
    assert len(set(ptrs)) == 4
    for key in state:
        assert torch.equal(result[key], state[key])
    assert result["e"] is empty and result["f"] is empty  # empty tensors are left alone


def test_trainer_saves_a_wrapper_with_tied_tensors(tmp_path):
    model = make_model()
    embedding = next(m for m in model.model.modules() if isinstance(m, nn.Embedding))
    model.extra = embedding  # a second path to the same weight: two state-dict keys, one storage
    keys = [k for k, v in model.state_dict().items() if v.data_ptr() == embedding.weight.data_ptr()]
    assert len(keys) >= 2 and "extra.weight" in keys

    trainer = HiggsLoraTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=RandomTokens())
    trainer.train()
    trainer.save_model()
    for directory in (tmp_path / "checkpoint-2", tmp_path):
        full = load_file(str(directory / "model.safetensors"))
        assert set(keys) <= set(full)
        torch.testing.assert_close(full["extra.weight"], embedding.weight.detach(), rtol=0, atol=0)
        verify_adapter(directory / "lora_adapters")
    assert_same_tensors(
        load_file(str(tmp_path / "lora_adapters" / "adapter_model.safetensors")),
        get_peft_model_state_dict(model.model, save_embedding_layers=False),
    )
