"""Adapter verification on a real saved adapter and on crafted bad variants of it."""

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_trainer import AdapterVerificationError, find_lora_model, inspect_adapter, verify_adapter
from higgs_trainer.saving import expected_adapter_shapes, write_lora_adapters
from higgs_trainer.verification import check_adapter_tensors
from tests.models import TARGET_MODULES, make_model
from tests.payloads import MaliciousPickle

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real adapter directory written from make_model(), and the shapes its model expects."""
    component = find_lora_model(make_model())
    out = tmp_path_factory.mktemp("saved")
    write_lora_adapters(component, out)
    return out / "lora_adapters", expected_adapter_shapes(component.model)


@pytest.fixture
def good(saved):
    directory, _ = saved
    return json.loads((directory / CONFIG).read_text()), load_file(str(directory / WEIGHTS))


def write_adapter(directory: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / CONFIG).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS))
    return directory


def copy_of(saved, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(saved[0], tmp_path / "adapter"))


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


# crafted bad variants


def test_non_lora_peft_type(good, tmp_path):
    config, tensors = good
    directory = write_adapter(tmp_path / "a", dict(config, peft_type="IA3"), tensors)
    assert_problem(directory, "not 'LORA'")


def test_missing_lora_b(saved, good, tmp_path):
    config, tensors = good
    only_a = {k: v for k, v in tensors.items() if "lora_B" not in k}
    directory = write_adapter(tmp_path / "a", config, only_a)
    assert_problem(directory, "lack their partner")
    assert_problem(directory, "missing from the file", saved[1])


def test_wrapper_prefixed_keys(good, tmp_path):
    config, tensors = good
    prefixed = {"model." + k: v for k, v in tensors.items()}
    assert all(k.startswith("model.base_model.model.") for k in prefixed)
    directory = write_adapter(tmp_path / "a", config, prefixed)
    assert_problem(directory, "lack the 'base_model.model.' prefix")


def test_adapter_name_segment_in_keys(good, tmp_path):
    config, tensors = good
    named = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in tensors.items()
    }
    assert all(".default." in k for k in named)
    directory = write_adapter(tmp_path / "a", config, named)
    assert_problem(directory, "adapter-name segment")


def test_rank_that_disagrees_with_r(good, tmp_path):
    config, tensors = good
    directory = write_adapter(tmp_path / "a", dict(config, r=8), tensors)
    assert_problem(directory, "ranks that disagree")


def test_empty_tensor(good, tmp_path):
    config, tensors = good
    key = next(k for k in tensors if "lora_A" in k)
    directory = write_adapter(tmp_path / "a", config, dict(tensors, **{key: torch.empty(0)}))
    assert_problem(directory, "empty")


def test_nan(good, tmp_path):
    config, tensors = good
    key = next(k for k in tensors if "lora_B" in k)
    directory = write_adapter(
        tmp_path / "a", config, dict(tensors, **{key: torch.full_like(tensors[key], float("nan"))})
    )
    assert_problem(directory, "NaN or inf")


def test_truncated_safetensors(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert_problem(directory, "truncated or corrupt")


def test_missing_adapter_config(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    (directory / CONFIG).unlink()
    assert_problem(directory, "adapter_config.json is missing")


def test_invalid_json(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    (directory / CONFIG).write_text('{"peft_type": "LORA", "r": ')
    assert_problem(directory, "not valid JSON")


def test_missing_weights(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    (directory / WEIGHTS).unlink()
    assert_problem(directory, "has no adapter_model.safetensors")


def test_a_malicious_pickle_is_refused_without_running_it(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    (directory / WEIGHTS).unlink()
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.x.lora_A.weight": MaliciousPickle(marker)}, directory / "adapter_model.bin")

    assert_problem(directory, "weights_only=True refused it")
    assert not marker.exists()

    # control: the payload is live, an unsafe load runs it
    control = tmp_path / "control"
    torch.save({"x": MaliciousPickle(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()
