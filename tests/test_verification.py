"""Adapter verification on a real saved adapter and on crafted bad variants of it."""

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_trainer import AdapterVerificationError, find_lora_model, inspect_adapter, verify_adapter
from higgs_trainer.training.saving import write_lora_adapters
from higgs_trainer.verification.tensors import check_adapter_tensors
from tests.testing_models import TARGET_MODULES, adapter_shapes, make_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real adapter directory written from make_model(), and the shapes its model expects."""
    component = find_lora_model(make_model())
    out = tmp_path_factory.mktemp("saved")
    write_lora_adapters(component, out)
    return out / "lora_adapters", adapter_shapes(component.model)


@pytest.fixture
def good(saved):
    directory, _ = saved
    return json.loads((directory / CONFIG).read_text()), load_file(str(directory / WEIGHTS))


def write_adapter(directory: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / CONFIG).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS))
    return directory


def assert_problem(directory, text, expected_shapes=None):
    summary = inspect_adapter(directory, expected_shapes)
    assert not summary.ok
    assert any(text in problem for problem in summary.problems), summary.problems
    with pytest.raises(AdapterVerificationError, match="failed verification") as info:
        verify_adapter(directory, expected_shapes)
    assert text in str(info.value)
    assert isinstance(info.value, ValueError)
    return summary


# the real adapter


def test_a_real_saved_adapter_passes_and_is_summarised(saved):
    directory, shapes = saved
    summary = verify_adapter(directory, shapes)
    assert summary.ok and summary.problems == []
    assert summary.peft_type == "LORA" and summary.r == 4 and summary.lora_alpha == 8
    assert summary.target_modules == sorted(TARGET_MODULES)
    assert summary.num_tensors == len(shapes) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    assert summary.num_parameters == sum(torch.Size(s).numel() for s in shapes.values())
    assert summary.num_bytes == 4 * summary.num_parameters  # float32


def test_check_adapter_tensors_of_the_real_adapter_finds_nothing(saved, good):
    _, shapes = saved
    config, tensors = good
    assert check_adapter_tensors(config, tensors) == []
    assert check_adapter_tensors(config, tensors, shapes) == []
    assert check_adapter_tensors(config, {}) == ["the adapter holds no tensors"]


def test_a_safe_pickle_adapter_is_read_and_passes(saved, good, tmp_path):
    config, tensors = good
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / CONFIG).write_text(json.dumps(config))
    torch.save(tensors, directory / "adapter_model.bin")
    assert verify_adapter(directory, saved[1]).num_tensors == 8


def test_expected_shapes_that_differ_are_reported(saved):
    directory, shapes = saved
    key = sorted(shapes)[0]
    wrong = dict(shapes, **{key: (99, 99)})
    assert_problem(directory, "wrong shape", wrong)
    extra = dict(shapes, **{"base_model.model.extra.lora_A.weight": (4, 64)})
    assert_problem(directory, "missing from the file", extra)
    fewer = {k: v for k, v in shapes.items() if k != key}
    assert_problem(directory, "not in the model", fewer)


# crafted bad variants: tests/test_damaged_adapters.py runs each through the API and the CLI; here, one
# that also needs the model's expected shapes


def test_missing_lora_b(saved, good, tmp_path):
    config, tensors = good
    only_a = {k: v for k, v in tensors.items() if "lora_B" not in k}
    directory = write_adapter(tmp_path / "a", config, only_a)
    assert_problem(directory, "lack their partner")
    assert_problem(directory, "missing from the file", saved[1])
