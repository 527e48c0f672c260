"""find_lora_model on real peft models: every layout, behind DataParallel / DDP / torch.compile, and its errors."""

import socket

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch import nn

from higgs_trainer import AmbiguousLoraModelError, LoraModelNotFoundError, find_lora_model
from tests.testing_models import TwoComponents, Wrapper, lora_config, make_model, tiny_base_model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("layout", "path", "display"),
    [("model", "model", "model"), ("text_model", "model.text_model", "model.text_model"), ("top", "", "<model>")],
)
def test_finds_the_peft_model_in_each_layout(layout, path, display):
    model = make_model(layout)
    component = find_lora_model(model)
    assert component.path == path
    assert component.display_path == display
    assert isinstance(component.model, PeftModel)
    assert component.model is (model if layout == "top" else model.get_submodule(path))


def test_finds_it_in_a_wrapper_around_a_wrapper():
    inner = make_model("text_model")
    outer = Wrapper(inner)
    component = find_lora_model(outer)
    assert component.path == "model.model.text_model"
    assert component.model is inner.model.text_model


def test_finds_it_behind_data_parallel():
    model = make_model("model")
    component = find_lora_model(nn.DataParallel(model))  # on CPU: no devices, just the wrapper
    assert component.path == "model" and component.model is model.model


def test_finds_it_behind_distributed_data_parallel(gloo_group):
    model = make_model("text_model")
    ddp = nn.parallel.DistributedDataParallel(model)
    component = find_lora_model(ddp)
    assert component.path == "model.text_model" and component.model is model.model.text_model


@pytest.mark.parametrize(("layout", "path"), [("model", "model"), ("top", "")])
def test_finds_it_behind_torch_compile_without_orig_mod_in_the_path(layout, path):
    model = make_model(layout)
    compiled = torch.compile(model)  # constructed only, never run
    component = find_lora_model(compiled)
    assert component.path == path and "_orig_mod" not in component.path
    assert component.model is (model if layout == "top" else model.model)


def test_a_compiled_submodule_is_found_at_its_own_path_and_its_state_dict_slices():
    wrapper = make_model("model")
    peft_model = wrapper.model
    wrapper.model = torch.compile(wrapper.model)
    component = find_lora_model(wrapper)
    assert component.path == "model"
    assert component.model is peft_model
    assert any("_orig_mod" in key for key in wrapper.state_dict())  # the wrapper's keys carry the segment...
    sliced = component.slice_state_dict(wrapper.state_dict())
    assert sorted(sliced) == sorted(peft_model.state_dict())  # ...the component's slice does not
    assert sorted(sliced) == sorted(wrapper.model._orig_mod.state_dict())
    # a path naming the wrapper segment means the same component
    assert find_lora_model(wrapper, path="model._orig_mod").model is peft_model


def test_no_peft_model_says_what_was_searched_and_how_to_fix_it():
    with pytest.raises(LoraModelNotFoundError) as info:
        find_lora_model(Wrapper(tiny_base_model()))
    message = str(info.value)
    assert "Wrapper" in message and "searched every submodule" in message
    assert "get_peft_model" in message
    assert isinstance(info.value, ValueError)


def test_two_distinct_peft_models_are_ambiguous_and_both_are_named():
    with pytest.raises(AmbiguousLoraModelError) as info:
        find_lora_model(TwoComponents())
    message = str(info.value)
    assert "'a'" in message and "'b'" in message
    assert "lora_model_path" in message
    assert isinstance(info.value, ValueError)


def test_path_selects_one_of_several():
    pair = TwoComponents()
    component = find_lora_model(pair, path="b")
    assert component.path == "b" and component.model is pair.b
    assert find_lora_model(pair, path="a").model is pair.a


def test_a_wrong_path_lists_the_paths_found():
    with pytest.raises(LoraModelNotFoundError) as info:
        find_lora_model(TwoComponents(), path="c")
    message = str(info.value)
    assert "'c'" in message and "'a'" in message and "'b'" in message
    assert isinstance(info.value, ValueError)

    with pytest.raises(LoraModelNotFoundError, match=r"found: 'model'"):
        find_lora_model(make_model("model"), path="model.text_model")


def test_the_same_peft_model_at_two_attributes_counts_once():
    peft_model = get_peft_model(tiny_base_model(), lora_config())
    pair = TwoComponents(peft_model, peft_model)
    component = find_lora_model(pair)
    assert component.path == "a" and component.model is peft_model
