"""`higgs-trainer convert` / `convert_layout`: boson_multimodal <-> transformers Higgs Audio v2 layouts.

The cross-stack tests train a tiny model with LoRA on one stack, convert it and check on the other
stack that the converted base + adapter give the same text and audio logits. Each stack's run makes
the other stack's half with that stack's python (HIGGS_TRAINER_HIGGS_PYTHON /
HIGGS_TRAINER_NEWEST_PYTHON, set by scripts/test.sh), so either run proves both directions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_trainer import CheckpointError, UsageError, convert_layout
from higgs_trainer.convert import configs, keys
from tests import testing_higgs_layouts
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_environment import missing
from tests.testing_layout_files import TINY_BOSON_CONFIG, read_model, write_adapter, write_model
from tests.testing_models import HIGGS_STACK

ROOT = Path(__file__).resolve().parent.parent
THIS_STACK = "boson" if HIGGS_STACK else "transformers"
PYTHON_OF = {"boson": "HIGGS_TRAINER_HIGGS_PYTHON", "transformers": "HIGGS_TRAINER_NEWEST_PYTHON"}


def on_stack(layout: str, command: str, directory: Path) -> None:
    """Run ``python -m tests.testing_higgs_layouts COMMAND DIR`` on the stack of ``layout``: here, or with the other venv."""
    if layout == THIS_STACK:
        testing_higgs_layouts.main([command, str(directory)])
        return
    python = os.environ.get(PYTHON_OF[layout])
    if not python:
        missing(f"{PYTHON_OF[layout]} is unset: the {layout} half runs on the other stack (scripts/test.sh sets it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [python, "-m", "tests.testing_higgs_layouts", command, str(directory)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("source", ["boson", "transformers"])
def test_trained_adapter_reproduces_logits_in_the_other_layout(tmp_path, source):
    target = keys.other(source)
    on_stack(source, f"make-{source}", tmp_path)
    on_stack(target, f"check-{target}", tmp_path)  # asserts text and audio logits within 1e-4, and that LoRA matters
    assert (tmp_path / f"adapter-{target}" / "adapter_model.safetensors").is_file()


BOSON_MODULES = ["layers.0.self_attn.q_proj", "layers.1.self_attn.o_proj"]


def test_sharded_model_with_split_weights_converts_both_ways(tmp_path):
    split = {  # boson's PartiallyFrozenEmbedding / PartiallyFrozenLinear: the rows in two blocks
        "embed_tokens.embedding_frozen.weight": torch.randn(200, 16),
        "embed_tokens.embedding_trainable.weight": torch.randn(56, 16),
    }
    original = write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson", shards=3, extra=split)
    del original["embed_tokens.weight"]
    result = convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")
    assert result.kind == "model" and result.concatenated == ["embed_tokens.weight"]
    converted = read_model(tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(converted) and len(set(index["weight_map"].values())) == 3
    joined = torch.cat(
        [split["embed_tokens.embedding_frozen.weight"], split["embed_tokens.embedding_trainable.weight"]]
    )
    torch.testing.assert_close(converted.pop("model.embed_tokens.weight"), joined, rtol=0, atol=0)
    for key, tensor in original.items():
        if "embedding_" not in key:
            torch.testing.assert_close(converted[keys.convert_key(key, "transformers")], tensor, rtol=0, atol=0)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "higgs_audio_v2" and hf_config["codebook_size"] == 34
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()

    convert_layout(tmp_path / "hf", "boson", tmp_path / "back")
    back = read_model(tmp_path / "back")
    torch.testing.assert_close(back.pop("embed_tokens.weight"), joined, rtol=0, atol=0)
    assert sorted(back) == sorted(k for k in original if "embedding_" not in k)
    boson_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert boson_config["audio_codebook_size"] == 32 and boson_config["text_config"]["hidden_size"] == 16


def test_adapter_round_trip_is_exact(tmp_path):
    saved = {"base_model.model.audio_decoder_proj.audio_lm_head.weight": torch.randn(136, 16)}
    config = {"modules_to_save": ["audio_decoder_proj.audio_lm_head"], "rank_pattern": {"layers.1.self_attn.o_proj": 4}}
    tensors = write_adapter(tmp_path / "boson", BOSON_MODULES, config, saved)
    convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")
    hf = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    assert sorted(hf) == sorted(
        ["base_model.model.audio_lm_head.weight"]
        + [f"base_model.model.model.{m}.lora_{p}.weight" for m in BOSON_MODULES for p in "AB"]
    )
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert hf_config["modules_to_save"] == ["audio_lm_head"]
    assert hf_config["rank_pattern"] == {"model.layers.1.self_attn.o_proj": 4}
    assert hf_config["base_model_name_or_path"] == "my/boson-base"
    convert_layout(tmp_path / "hf", "boson", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for key in tensors:
        torch.testing.assert_close(back[key], tensors[key], rtol=0, atol=0)
    back_config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert back_config == {**json.loads((tmp_path / "boson" / "adapter_config.json").read_text()), **config}


def test_target_module_regex_is_rewritten_both_ways(tmp_path):
    regex = r"layers\.\d+\.self_attn\.(q_proj|o_proj)"
    write_adapter(tmp_path / "boson", BOSON_MODULES, {"target_modules": regex})
    convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")
    new = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["target_modules"]
    assert re.fullmatch(new, "model.layers.1.self_attn.o_proj") and not re.fullmatch(new, "layers.1.self_attn.o_proj")
    assert not re.fullmatch(new, "model.layers.1.self_attn.v_proj")
    convert_layout(tmp_path / "hf", "boson", tmp_path / "back")
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())["target_modules"]
    assert re.fullmatch(back, "layers.1.self_attn.o_proj") and not re.fullmatch(back, "layers.1.self_attn.v_proj")


def test_json_output(tmp_path, capsys):
    write_adapter(tmp_path / "boson", BOSON_MODULES)
    code, out, _err = run_cli(
        capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", tmp_path / "hf", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["kind"] == "adapter" and result["num_tensors"] == 4 and result["renamed"] == 4


def test_run_directory_converts_every_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    write_adapter(run / "lora_adapters", BOSON_MODULES)
    write_adapter(run / "checkpoint-2" / "lora_adapters", BOSON_MODULES)
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"not copied")
    code, out, err = run_cli(capsys, "convert", run, "--to", "transformers", "--output", tmp_path / "hf")
    assert code == 0, err
    assert "2 adapter(s)" in out
    for adapter in ("lora_adapters", "checkpoint-2/lora_adapters"):
        keys = load_file(str(tmp_path / "hf" / adapter / "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert not (tmp_path / "hf" / "checkpoint-2" / "optimizer.pt").exists()


def test_adapter_verified_against_converted_base(tmp_path):
    """On this stack's own layout: peft applies the converted config to the (empty) base and finds every key."""
    source = keys.other(THIS_STACK)
    modules = [f"layers.{i}.self_attn.{name}" for i in (0, 1) for name in ("q_proj", "o_proj")]
    modules = [keys.convert_key(m, source) for m in modules]
    write_model(tmp_path / "base", TINY_BOSON_CONFIG, "boson")
    write_adapter(tmp_path / "adapter", modules)
    result = convert_layout(tmp_path / "adapter", THIS_STACK, tmp_path / "out", base=tmp_path / "base")
    assert result.verified_on_base
    # target_modules that select more modules than the adapter holds: peft would find missing keys
    write_adapter(tmp_path / "partial", modules[:1], {"target_modules": ["q_proj"]})
    with pytest.raises(CheckpointError, match=r"2 missing .*layers\.1\.self_attn\.q_proj"):
        convert_layout(tmp_path / "partial", THIS_STACK, tmp_path / "out2", base=tmp_path / "base")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"audio_tower.layers.0.fc1.weight": torch.zeros(2, 2)}, "audio tower"),
        ({"layers.0.audio_attn.q_proj.weight": torch.zeros(2, 2)}, "audio self-attention"),
        ({"something.else.weight": torch.zeros(2, 2)}, "not part of a boson-layout Higgs Audio model"),
    ],
)
def test_weights_without_equivalent_are_refused(tmp_path, capsys, damage, message):
    write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson", extra=damage)
    code, _out, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", tmp_path / "hf")
    assert code == 1
    assert_one_line_error(err, message)
    assert not (tmp_path / "hf").exists()


def test_dual_ffn_on_some_layers_is_refused(tmp_path):
    write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson")
    config = dict(TINY_BOSON_CONFIG, audio_dual_ffn_layers=[1])
    (tmp_path / "boson" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="DualFFN on only some layers"):
        convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")
    keys = read_model(tmp_path / "boson")
    save_file(
        {k: v for k, v in keys.items() if not k.startswith("layers.0.audio_mlp")},
        str(tmp_path / "boson" / "model.safetensors"),
    )
    (tmp_path / "boson" / "config.json").write_text(json.dumps(TINY_BOSON_CONFIG))
    with pytest.raises(CheckpointError, match=r"DualFFN \(audio_mlp\) on only some layers"):
        convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")


def test_usage_errors(tmp_path, capsys):
    write_adapter(tmp_path / "boson", BOSON_MODULES)
    convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")
    code, _out, err = run_cli(capsys, "convert", tmp_path / "hf", "--to", "transformers", "-o", tmp_path / "again")
    assert code == 2
    assert_one_line_error(err, "already in the transformers layout")
    code, _out, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", tmp_path / "hf")
    assert code == 2
    assert_one_line_error(err, "exists and is not empty")
    code, _out, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "jax", "-o", tmp_path / "x")
    assert code == 2
    with pytest.raises(UsageError):
        convert_layout(tmp_path / "boson", "mlx", tmp_path / "x")
    write_adapter(tmp_path / "odd", ["vision.blocks.0.qkv"])
    with pytest.raises(CheckpointError, match="cannot tell the layout"):
        convert_layout(tmp_path / "odd", "transformers", tmp_path / "y")


def test_python_api_is_exported():
    import higgs_trainer

    assert higgs_trainer.convert_layout is convert_layout
    assert sys.modules["higgs_trainer.convert.conversion"].convert_layout is convert_layout


def test_adapter_on_modules_without_equivalent_is_refused(tmp_path, capsys):
    write_adapter(tmp_path / "boson", ["layers.0.self_attn.q_proj", "audio_tower.layers.0.fc1"])
    code, _out, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", tmp_path / "hf")
    assert code == 1
    assert_one_line_error(err, "audio tower")
    assert not (tmp_path / "hf").exists()


def test_the_higgs_v2_defaults_table_is_transformers_own():
    """configs' one table of HiggsAudioV2Config defaults (what a saved config.json omits) equals transformers'."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "HiggsAudioV2Config"):
        pytest.skip("transformers has no HiggsAudioV2Config on this stack (the newest stack runs this)")
    defaults = transformers.HiggsAudioV2Config().to_dict()
    table = configs._HIGGS_V2_DEFAULTS
    assert {name: defaults.get(name) for name in table} == table


@pytest.mark.parametrize("output", ["checkpoint-2/lora_adapters", "hf", ".", "lora_adapters"])
def test_output_inside_or_equal_to_the_source_is_refused(tmp_path, capsys, output):
    # `convert RUN --output RUN/checkpoint-2/lora_adapters --overwrite` once replaced that adapter with its conversion.
    run = tmp_path / "run"
    write_adapter(run / "lora_adapters", BOSON_MODULES)
    write_adapter(run / "checkpoint-2" / "lora_adapters", BOSON_MODULES)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _out, err = run_cli(capsys, "convert", run, "--to", "transformers", "-o", run / output, "--overwrite")
    assert code == 2
    assert_one_line_error(err, "lies inside the input" if output != "." else "would replace the input")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_support_files_are_copied_like_merge_copies_them(tmp_path):
    # convert once dropped generation_config.json (merge copied it): one list of support files now serves both.
    write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson")
    for name in ("generation_config.json", "special_tokens_map.json", "README.md"):
        (tmp_path / "boson" / name).write_text("{}")
    result = convert_layout(tmp_path / "boson", "transformers", tmp_path / "hf")
    assert result.copied == ["README.md", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json"]
    assert (tmp_path / "hf" / "generation_config.json").read_text() == "{}"
