"""Tensors nobody checked never become a model: safetensors headers read as strictly as safetensors' own loader,
a tensor stored twice, and a LoRA delta on an integer weight, through merge (both paths), convert and extract."""

import json
import pathlib
import struct

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from higgs_trainer.files.safetensors_files import read_safetensors_header
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_layout_files import TINY_BOSON_CONFIG, write_model

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)  # fmt: skip
Q_PROJ, O_PROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"


def save_pair(tmp_path, targets=("q_proj",)):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model.save_pretrained(str(tmp_path / "base"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "base", tmp_path / "adapter"


def rewrite_header(file: pathlib.Path, change) -> None:
    """Replace the JSON header of a safetensors file by ``change(header)``, keeping the data bytes as they are."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = change(json.loads(data[8 : 8 + length]))
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def give_q_the_bytes_of_o(header):
    header[Q_PROJ]["data_offsets"] = list(header[O_PROJ]["data_offsets"])
    return header


def assert_safetensors_refuses(file):
    with pytest.raises(SafetensorError):
        with safe_open(str(file), framework="pt") as reader:
            reader.get_tensor(reader.keys()[0])


def merge(capsys, base, adapter, out, *extra):
    return run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", out, *extra)


@pytest.mark.parametrize("in_memory", [False, True], ids=["streaming", "in-memory"])
def test_a_tensor_given_another_tensors_bytes_is_refused(tmp_path, capsys, in_memory):
    # The streaming merge once wrote q_proj = o_proj + delta from this file, a clean-looking model.
    base, adapter = save_pair(tmp_path)
    rewrite_header(base / "model.safetensors", give_q_the_bytes_of_o)
    assert_safetensors_refuses(base / "model.safetensors")
    code, _, err = merge(capsys, base, adapter, tmp_path / "m", *(["--in-memory"] if in_memory else []))
    assert code == 1
    assert_one_line_error(err, "overlap another tensor's")
    assert not (tmp_path / "m").exists()


def _shape_off(header):
    header[Q_PROJ]["shape"] = [header[Q_PROJ]["shape"][0] - 1, header[Q_PROJ]["shape"][1]]
    return header


def _beyond_the_end(header):
    last = max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
    last["data_offsets"][1] += 4
    last["shape"][-1] += 1 if len(last["shape"]) == 1 else 0
    return header


def _gap(header):
    del header[O_PROJ]
    return header


def _name_twice(header):
    text = json.dumps(header)
    entry = json.dumps({Q_PROJ: header[Q_PROJ]})[1:-1]
    return text[:-1] + ", " + entry + "}"


@pytest.mark.parametrize(
    "damage, message",
    [
        (_shape_off, "needs"),
        (_beyond_the_end, "does not fit a file of"),
        (_gap, "leave a gap"),
        (_name_twice, "names tensor"),
    ],
)
def test_headers_safetensors_refuses_are_refused(tmp_path, capsys, damage, message):
    base, adapter = save_pair(tmp_path)
    file = base / "model.safetensors"
    rewrite_header(file, damage)
    if damage is not _name_twice:  # safetensors takes the last of two entries of one name if their bytes agree
        assert_safetensors_refuses(file)
    with pytest.raises(Exception, match="truncated or corrupt") as refused:
        read_safetensors_header(file)
    assert message in str(refused.value) or damage is _beyond_the_end
    code, _, err = merge(capsys, base, adapter, tmp_path / "m")
    assert code == 1
    assert_one_line_error(err, "is truncated or corrupt")


def test_a_tensor_stored_in_two_shards_is_refused_by_convert(tmp_path, capsys):
    tensors = write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson", shards=2)
    first, second = sorted((tmp_path / "boson").glob("model-*.safetensors"))
    key = sorted(load_file(str(first)))[0]
    save_file({**load_file(str(second)), key: tensors[key] + 1}, str(second))  # another value under the same name
    code, _, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", tmp_path / "hf")
    assert code == 1
    assert_one_line_error(err, f"tensor {key!r} is stored twice")
    assert not (tmp_path / "hf").exists()


def test_convert_refuses_a_dtype_it_cannot_read_in_one_line(tmp_path, capsys):
    write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson")
    file = tmp_path / "boson" / "model.safetensors"
    key = sorted(load_file(str(file)))[0]

    def unknown_dtype(header):
        header[key]["dtype"] = "F8_E8M0"  # a real safetensors dtype no torch here reads
        return header

    rewrite_header(file, unknown_dtype)
    code, _, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", tmp_path / "hf")
    assert code == 1
    assert_one_line_error(err, "has dtype 'F8_E8M0', which higgs-trainer does not read")
    assert "unexpected" not in err


@pytest.mark.parametrize("in_memory", [False, True], ids=["streaming", "in-memory"])
def test_a_lora_on_an_integer_weight_is_refused(tmp_path, capsys, in_memory):
    # Merged in int16, the delta was rounded to whole numbers: a different model, silently.
    base, adapter = save_pair(tmp_path)
    state = load_file(str(base / "model.safetensors"))
    state[Q_PROJ] = (state[Q_PROJ] * 100).to(torch.int16)
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = merge(capsys, base, adapter, tmp_path / "m", *(["--in-memory"] if in_memory else []))
    assert code == 1
    assert_one_line_error(err, f"{Q_PROJ} is torch.int16")
    assert "rounded" in err and not (tmp_path / "m").exists()
