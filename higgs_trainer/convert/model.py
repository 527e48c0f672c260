"""Converting a full model directory: planned from the safetensors headers, read and written one tensor at a time, checked against its config."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, UsageError, listed
from ..files.paths import read_json_object
from ..files.safetensors_files import (
    StoredTensor,
    header_bytes,
    read_safetensors_header,
    read_stored_tensors,
    read_tensor,
    safetensors_weight_files,
)
from ..files.support_files import copy_support_files
from ..names import SAFE_INDEX, SAFE_WEIGHTS
from .configs import convert_model_config, expected_shapes
from .keys import BOSON, IGNORED_KEY, MODEL_TYPES, SPLIT_KEY, check_dual_ffn_layers, check_keys, convert_key, other
from .result import ConvertResult

logger = logging.getLogger(__name__)


def _weight_files(directory: Path) -> list[Path]:
    files = safetensors_weight_files(directory)
    if files:
        return files
    if files is not None:
        raise CheckpointError(f"{directory / SAFE_INDEX} has no weight_map")
    if any(directory.glob("*.bin")):
        raise UsageError(
            f"{directory} holds pickled weights; save the model with safetensors first (convert reads only those)"
        )
    raise CheckpointError(f"{directory} has no {SAFE_WEIGHTS} or {SAFE_INDEX}")


@dataclass
class _Planned:
    """One output tensor: its new key, shape and dtype, and the stored tensors it is read from (two when joined)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    parts: list[StoredTensor]


def _plan(stored: dict[str, StoredTensor], to: str, where: str, result: ConvertResult) -> dict[Path, list[_Planned]]:
    """The output tensors of each input file, from the headers alone (no tensor is read)."""
    source_layout = other(to)
    planned: dict[str, _Planned] = {}
    splits: dict[str, dict[str, str]] = {}
    for key, tensor in stored.items():
        if IGNORED_KEY.search(key):
            result.skipped.append(key)
            continue
        found = SPLIT_KEY.match(key) if source_layout == BOSON else None
        if found:
            splits.setdefault(found.group("module") + ".weight", {})[found.group("part")] = key
            continue
        planned[key] = _Planned(key, tensor.shape, tensor.dtype, [tensor])
    for weight, pair in splits.items():
        if set(pair) != {"frozen", "trainable"}:
            raise CheckpointError(
                f"{where} holds only {listed(pair.values())} of a split weight; both halves are needed"
            )
        frozen, trainable = stored[pair["frozen"]], stored[pair["trainable"]]
        if not frozen.shape or frozen.shape[1:] != trainable.shape[1:] or frozen.dtype != trainable.dtype:
            raise CheckpointError(
                f"{where}: the two halves of {weight} do not fit together ({frozen.shape}, {trainable.shape})"
            )
        planned[weight] = _Planned(
            weight, (frozen.shape[0] + trainable.shape[0], *frozen.shape[1:]), frozen.dtype, [frozen, trainable]
        )
        result.concatenated.append(weight)
    keys = sorted(planned)
    check_keys(keys, source_layout, where)
    check_dual_ffn_layers(keys, source_layout, where)
    by_file: dict[Path, list[_Planned]] = {}
    for key in keys:
        item = planned[key]
        item.key = convert_key(key, to)
        result.renamed += item.key != key
        by_file.setdefault(item.parts[0].file, []).append(item)
    if result.skipped:
        logger.info("Skipped %d buffer(s) recomputed from the config: %s", len(result.skipped), listed(result.skipped))
    return by_file


def _check_against_config(planned: Iterable[_Planned], config: dict, to: str, where: str) -> None:
    """Zero missing and zero unexpected weights for the converted config, each of the shape it implies."""
    shapes = {p.key: p.shape for p in planned}
    text_head = any(k.endswith("text_lm_head.weight") for k in shapes)
    expected = expected_shapes(config, to, text_head=text_head)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misfit = [
        f"{k} {shapes[k]} vs {expected[k]}" for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]
    ]
    if missing or unexpected or misfit:
        raise CheckpointError(
            f"{where}: the converted weights do not match the converted config: {len(missing)} missing "
            f"({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)}), {len(misfit)} of another "
            f"shape ({listed(misfit)}) (nothing written)"
        )


def _write_safetensors(path: Path, items: list[_Planned]) -> int:
    """Write one safetensors file tensor by tensor; returns the bytes of tensor data.

    Our own writer because safetensors' ``save_file`` takes every tensor of the file at once. Here
    each input tensor is read on its own (`safetensors_files.read_tensor`, checked headers) and its
    bytes are written straight after; the two halves of a split weight are written one after the
    other, which is their row concatenation. Memory follows the largest tensor, not the shard. The
    header is `safetensors_files.header_bytes`'s.
    """
    entries = [(item.key, item.dtype, item.shape, sum(part.num_bytes for part in item.parts)) for item in items]
    with open(path, "wb") as handle:
        handle.write(header_bytes(entries))
        for item in items:
            for part in item.parts:
                tensor = read_tensor(part)
                handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
    return sum(entry[3] for entry in entries)


def convert_model(source: Path, target: Path, to: str, result: ConvertResult) -> None:
    config = read_json_object(source / "config.json", CheckpointError)
    if config.get("model_type") == MODEL_TYPES[to]:
        raise UsageError(f"{source} is already in the {to} layout ({config['model_type']}); nothing to convert")
    new_config = convert_model_config(config, to, str(source))
    files = _weight_files(source)
    by_file = _plan(read_stored_tensors(source, files, "the model"), to, str(source), result)
    _check_against_config([p for items in by_file.values() for p in items], new_config, to, str(source))
    weight_map, total = {}, 0
    for file in files:
        items = by_file.get(file, [])
        if not items:
            continue
        total += _write_safetensors(target / file.name, items)
        weight_map.update({item.key: file.name for item in items})
        result.num_tensors += len(items)
    if (source / SAFE_INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (target / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
    result.copied += copy_support_files(source, target)
    _check_written(target, new_config, to)
    if to == BOSON and not any(key.endswith("text_lm_head.weight") for key in weight_map):
        logger.warning(
            "%s has no text_lm_head (saved without use_text_head=True): HiggsAudioModel will start its text head "
            "from random weights (audio generation does not use it)",
            source,
        )


def _check_written(target: Path, config: dict, to: str) -> None:
    """Re-read the written headers: the output holds what the converted config implies."""
    items = []
    for file in _weight_files(target):
        items += [_Planned(t.name, t.shape, t.dtype, []) for t in read_safetensors_header(file, "the converted model")]
    _check_against_config(items, config, to, str(target))


__all__ = ["convert_model"]
