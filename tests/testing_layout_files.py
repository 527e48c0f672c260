"""Synthetic Higgs model and adapter directories of either layout, made from the layout tables (no model class needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from higgs_trainer.convert import configs

TINY_BOSON_CONFIG = {
    "model_type": "higgs_audio", "audio_adapter_type": "dual_ffn", "audio_dual_ffn_layers": [0, 1],
    "skip_audio_tower": True, "audio_num_codebooks": 4, "audio_codebook_size": 32, "audio_stream_bos_id": 32,
    "audio_stream_eos_id": 33, "audio_out_token_idx": 251, "audio_out_bos_token_id": 252, "pad_token_id": 0,
    "text_config": {"model_type": "llama", "vocab_size": 256, "hidden_size": 16, "intermediate_size": 32,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
}  # fmt: skip


def write_model(directory: Path, config: dict, layout: str, shards: int = 1, extra: dict | None = None) -> dict:
    """A model directory of random weights with exactly the keys ``config`` implies (plus ``extra``)."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shapes = configs.expected_shapes(config, layout)
    tensors = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    tensors.update(extra or {})
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, str(directory / name))
            weight_map.update(dict.fromkeys(part, name))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text("{}")
    return tensors


def read_model(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors files."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def write_adapter(directory: Path, modules: list[str], config: dict | None = None, saved: dict | None = None) -> dict:
    """An adapter directory of random rank-4 LoRA pairs on ``modules`` (plus ``saved`` full weights)."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for module in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(4, 16, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(16, 4, generator=gen)
    tensors.update(saved or {})
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    values = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"],
              "base_model_name_or_path": "my/boson-base", "task_type": None, **(config or {})}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(values))
    return tensors
