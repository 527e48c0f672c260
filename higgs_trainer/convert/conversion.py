"""Convert adapters and models between boson_multimodal's and transformers' Higgs Audio v2 layouts.

``convert_layout(SRC, to, OUTPUT)`` takes an adapter directory, a run or checkpoint directory (each
``lora_adapters`` in it), or a full model directory (safetensors, sharded or not) and writes the
same thing in the other layout (`layouts` holds the key table and the config mapping). It refuses
what has no equivalent, never drops a tensor silently, reads one tensor at a time, writes the
whole output atomically, and checks the result before it is put in place: a converted model has
exactly the weights its converted config implies; a converted adapter's modules are the ones its
converted ``adapter_config.json`` selects, and with ``base`` peft itself finds zero missing and
zero unexpected adapter keys on that base.

Examples:
    ```python
    convert_layout("run/lora_adapters", "transformers", "adapter-hf")  # ConvertResult(kind='adapter', ...)
    PeftModel.from_pretrained(HiggsAudioV2ForConditionalGeneration.from_pretrained("base-hf"), "adapter-hf")
    ```
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AdapterVerificationError, CheckpointError, HiggsTrainerError, UsageError, first_line, listed
from ..files.atomic import staged_directory
from ..files.paths import (
    existing_directory,
    output_directory,
    read_adapter_config,
    read_adapter_tensors,
    read_json_object,
)
from ..files.runs import adapter_dirs_of, holds_adapter_files
from ..files.safetensors_files import (
    StoredTensor,
    header_bytes,
    read_safetensors_header,
    read_stored_tensors,
    read_tensor,
    safetensors_weight_files,
)
from ..files.support_files import copy_support_files
from ..lora_keys import split_lora_key
from ..names import CONFIG_NAME, FULL_WEIGHT_FILES, PEFT_KEY_PREFIX, SAFE_INDEX, SAFE_WEIGHTS, SAFETENSORS_NAME
from ..verification.lora_config import configured_value, lora_config_from_dict
from . import layouts
from .layouts import BOSON, LAYOUTS, TRANSFORMERS

logger = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    """What `convert_layout` wrote: ``kind`` is ``adapter``, ``adapters`` (a run or checkpoint) or ``model``.

    ``renamed`` counts the tensors whose key changed, ``concatenated`` the weights joined from
    boson's split halves, ``skipped`` the buffers left out (recomputed from the config), ``copied``
    the tokenizer/processor files; ``verified_on_base`` is True when peft loaded the adapters onto ``base``.

    Examples:
        ```python
        result = convert_layout("run", "transformers", "run-hf")
        result.kind, result.outputs  # ('adapters', ['run-hf/lora_adapters', 'run-hf/checkpoint-2/lora_adapters'])
        ```
    """

    source: str
    path: str
    to: str
    kind: str
    outputs: list[str]
    num_tensors: int
    renamed: int
    concatenated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    verified_on_base: bool = False
    seconds: float = 0.0


def convert_layout(
    source: str | os.PathLike,
    to: str,
    output: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert ``source`` (adapter, run/checkpoint, or full model directory) to layout ``to`` into ``output``.

    ``to`` is ``"transformers"`` (``HiggsAudioV2ForConditionalGeneration``) or ``"boson"``
    (``HiggsAudioModel``). With ``base`` (a model directory of either layout), converted adapters
    are also loaded by peft onto that model, built empty from its config, and must show zero
    missing and zero unexpected adapter keys.

    Args:
        source: an adapter directory, a run or checkpoint directory (each ``lora_adapters`` in it),
            or a full Higgs model directory (safetensors, sharded or not).
        to: the layout to write, ``"transformers"`` or ``"boson"``.
        output: the directory to write (absent or empty, unless ``overwrite``).
        base: a model directory of either layout to load the converted adapters onto, as a check.
        overwrite: replace ``output`` if it exists and is not empty.

    Examples:
        ```python
        convert_layout("out", "transformers", "out-hf").outputs
        # ['out-hf/lora_adapters', 'out-hf/checkpoint-2/lora_adapters']
        ```
    """
    started = time.perf_counter()
    if to not in LAYOUTS:
        raise UsageError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    source = existing_directory(source, "source")
    base = existing_directory(base, "base model") if base is not None else None
    output = output_directory(output, overwrite, inputs=[source] + ([base] if base else []))
    is_model = _is_model_dir(source)
    if is_model and base is not None:
        raise UsageError("--base checks converted adapters; converting a model needs none (leave it out)")
    base_model = _empty_model(base, to) if base is not None else None
    result = ConvertResult(source=str(source), path=str(output), to=to, kind="", outputs=[], num_tensors=0, renamed=0)
    try:
        with staged_directory(output) as staging:
            if is_model:
                result.kind = "model"
                _convert_model(source, staging, to, result)
                result.outputs = [str(output)]
            else:
                adapters = _adapter_dirs(source)
                result.kind = "adapter" if adapters == [source] else "adapters"
                for directory in adapters:
                    relative = directory.relative_to(source)
                    _convert_adapter(directory, staging / relative, to, result, base_model)
                    result.outputs.append(str(output / relative))
    except OSError as exc:  # a full disk: say where (the OSError of a write names no file)
        raise HiggsTrainerError(f"writing {output} failed: {first_line(exc)} (nothing written)") from exc
    result.verified_on_base = base_model is not None
    result.seconds = time.perf_counter() - started
    logger.info("Converted %s to the %s layout in %s", source, to, output)
    return result


# what the source is


def _is_model_dir(directory: Path) -> bool:
    """A full model: config.json and model weights (a run or checkpoint directory has neither at its root)."""
    if holds_adapter_files(directory) or not (directory / "config.json").is_file():
        return False
    if not any((directory / name).is_file() for name in FULL_WEIGHT_FILES):
        return False
    config = read_json_object(directory / "config.json", CheckpointError)
    if config.get("model_type") not in layouts.MODEL_TYPES.values():
        raise CheckpointError(
            f"{directory} holds a {config.get('model_type')!r} model, not a Higgs Audio one "
            f"({' or '.join(layouts.MODEL_TYPES.values())}); only those convert"
        )
    return True


def _adapter_dirs(source: Path) -> list[Path]:
    try:
        directories = adapter_dirs_of(source)
    except AdapterVerificationError as exc:
        raise CheckpointError(f"{exc}; convert takes an adapter, checkpoint, run or model directory") from exc
    missing = [d for d in directories if not holds_adapter_files(d)]
    if missing:
        raise CheckpointError(
            f"{missing[0]} holds no adapter ({len(missing)} of {len(directories)} in {source}); rescue a checkpoint "
            f"saved without one with `higgs-trainer extract {missing[0].parent} --output DIR` first (nothing written)"
        )
    return directories


# adapters


def _module_and_rest(key: str) -> tuple[str, str]:
    """(module path from the model's root, the rest) of an adapter key; the rest is '' for modules_to_save weights."""
    if not key.startswith(PEFT_KEY_PREFIX):
        raise CheckpointError(f"adapter key {key!r} does not start with {PEFT_KEY_PREFIX!r}; not a peft adapter")
    key = key[len(PEFT_KEY_PREFIX) :]
    lora = split_lora_key(key)
    return (lora.module, ".".join((lora.part, *lora.rest))) if lora is not None and lora.module else (key, "")


def _concatenate_split(tensors: dict[str, torch.Tensor], where: str, result: ConvertResult) -> dict[str, torch.Tensor]:
    """boson's split embedding_frozen/embedding_trainable (linear_frozen/linear_trainable) weights joined into one."""
    joined, parts = {}, {}
    for key, tensor in tensors.items():
        found = layouts.SPLIT_KEY.match(key)
        if found:
            parts.setdefault((found.group("module"), found.group("kind")), {})[found.group("part")] = key
        else:
            joined[key] = tensor
    for (module, _kind), pair in parts.items():
        if set(pair) != {"frozen", "trainable"}:
            raise CheckpointError(
                f"{where} holds only {listed(pair.values())} of a split weight; both halves are needed"
            )
        joined[f"{module}.weight"] = torch.cat([tensors[pair["frozen"]], tensors[pair["trainable"]]], dim=0)
        result.concatenated.append(f"{module}.weight")
    return joined


def _new_key(key: str, to: str) -> str:
    module, rest = _module_and_rest(key)
    return PEFT_KEY_PREFIX + layouts.convert_key(module, to) + (f".{rest}" if rest else "")


def convert_adapter_tensors(
    tensors: dict[str, torch.Tensor], to: str, where: str = "the adapter"
) -> dict[str, torch.Tensor]:
    """An adapter's tensors (peft keys ``base_model.model.<module>.…``) renamed for layout ``to``.

    `CheckpointError` for keys of neither layout or LoRA on boson's split weights; `UsageError`
    for an adapter already in layout ``to``.

    Examples:
        >>> convert_adapter_tensors({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)},
        ...                         "transformers").keys()
        dict_keys(['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'])
    """
    split = {key: _module_and_rest(key) for key in tensors}
    source_layout = layouts.layout_of_keys([m + "." for m, _ in split.values()])
    if source_layout is None:
        raise CheckpointError(
            f"{where}: cannot tell the layout of its keys ({listed(tensors)}); is it a Higgs adapter?"
        )
    if source_layout == to:
        raise UsageError(f"{where} is already in the {to} layout; nothing to convert")
    weights = []
    for module, rest in split.values():
        weight = f"{module}.weight" if rest else module
        if layouts.SPLIT_KEY.match(weight):
            raise CheckpointError(f"{where} has LoRA on a split weight ({module}), which has no equivalent")
        weights.append(weight)
    layouts.check_keys(weights, source_layout, where)
    converted = {_new_key(key, to): tensor for key, tensor in tensors.items()}
    if len(converted) != len(tensors):
        raise CheckpointError(f"{where}: two keys map to the same key in the {to} layout")
    return converted


def _convert_adapter(
    source: Path, target: Path, to: str, result: ConvertResult, base_model: torch.nn.Module | None
) -> None:
    config = read_adapter_config(source)
    tensors = _concatenate_split(read_adapter_tensors(source), str(source), result)
    converted = convert_adapter_tensors(tensors, to, str(source))
    new_config = layouts.convert_adapter_config(config, to)
    _check_converted_adapter(tensors, config, new_config, to, str(source))
    if base_model is not None:
        check_adapter_on_model(converted, new_config, base_model, str(source))
    target.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(target / SAFETENSORS_NAME), metadata={"format": "pt"})
    (target / CONFIG_NAME).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
    result.copied += copy_support_files(source, target)
    result.num_tensors += len(converted)
    result.renamed += sum(_new_key(k, to) != k for k in tensors)


def _targets_module(config: dict, module: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(lora_config_from_dict(config), module))


def _check_converted_adapter(original: dict, config: dict, new_config: dict, to: str, where: str) -> None:
    """The converted config selects the same modules, ranks, alphas and saved modules as the original, key for key."""
    back = {_new_key(_new_key(k, to), layouts.other(to)) for k in original}
    if back != set(original):
        raise CheckpointError(f"{where}: the converted keys do not map back to the original ones (nothing written)")
    try:
        lora_config_from_dict(new_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: peft rejects the converted adapter_config.json: {first_line(exc)}") from exc
    saved = new_config.get("modules_to_save") or []
    for old_key in original:
        old_module, rest = _module_and_rest(old_key)
        new_module, _ = _module_and_rest(_new_key(old_key, to))
        if not rest:
            if not any(new_module.rsplit(".", 1)[0].endswith(m) for m in saved):
                raise CheckpointError(
                    f"{where}: the converted modules_to_save {saved} do not select {new_module} (nothing written)"
                )
            continue
        if not _targets_module(new_config, new_module):
            raise CheckpointError(
                f"{where}: the converted target_modules {new_config.get('target_modules')!r} do not select "
                f"{new_module}; write them by hand as a list of module names (nothing written)"
            )
        for field_name, name in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
            old_value = configured_value(config, name, old_module)
            new_value = configured_value(new_config, name, new_module)
            if old_value != new_value:
                raise CheckpointError(
                    f"{where}: the converted {field_name} gives {new_module} {new_value}, not {old_value} (nothing written)"
                )


def check_adapter_on_model(
    tensors: dict[str, torch.Tensor], adapter_config: dict, model: torch.nn.Module, where: str = "the adapter"
) -> None:
    """peft's own check: the adapter's keys are exactly those peft saves for ``model`` (built on the meta device).

    Examples:
        ```python
        check_adapter_on_model(converted, new_config, empty_v2_model)  # raises when a key is missing or unexpected
        ```
    """
    import copy

    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    try:
        peft_model = get_peft_model(copy.deepcopy(model), lora_config_from_dict(adapter_config))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{where}: peft cannot apply the converted adapter config to the base: {first_line(exc)}"
        ) from exc
    expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misfit = [k for k in sorted(set(expected) & set(tensors)) if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or misfit:
        raise CheckpointError(
            f"{where}: the converted adapter does not fit the base: {len(missing)} missing ({listed(missing)}), "
            f"{len(unexpected)} unexpected ({listed(unexpected)}), {len(misfit)} of another shape ({listed(misfit)}) "
            "(nothing written)"
        )


def _empty_model(base: Path, to: str) -> torch.nn.Module:
    """The base model in layout ``to``, built on the meta device from ``base``'s config (converted if need be)."""
    from accelerate import init_empty_weights

    config = read_json_object(base / "config.json", CheckpointError) if (base / "config.json").is_file() else None
    if config is None or config.get("model_type") not in layouts.MODEL_TYPES.values():
        raise UsageError(f"base {base} is not a Higgs Audio model directory (config.json with model_type higgs_audio*)")
    if config["model_type"] != layouts.MODEL_TYPES[to]:
        config = layouts.convert_model_config(config, to, str(base))
    with init_empty_weights():
        if to == TRANSFORMERS:
            import transformers

            if not hasattr(transformers, "HiggsAudioV2ForConditionalGeneration"):
                raise HiggsTrainerError(
                    f"transformers {transformers.__version__} has no HiggsAudioV2ForConditionalGeneration to check the "
                    "adapter on; convert without --base, or on transformers 5.x"
                )
            hf_config = transformers.HiggsAudioV2Config.from_dict(config)
            return transformers.HiggsAudioV2ForConditionalGeneration(hf_config, use_text_head=True)
        from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel  # a boson model is built

        return HiggsAudioModel(HiggsAudioConfig.from_dict(config))


# full models


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
    source_layout = layouts.other(to)
    planned: dict[str, _Planned] = {}
    splits: dict[str, dict[str, str]] = {}
    for key, tensor in stored.items():
        if layouts.IGNORED_KEY.search(key):
            result.skipped.append(key)
            continue
        found = layouts.SPLIT_KEY.match(key) if source_layout == BOSON else None
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
    layouts.check_keys(keys, source_layout, where)
    layouts.check_dual_ffn_layers(keys, source_layout, where)
    by_file: dict[Path, list[_Planned]] = {}
    for key in keys:
        item = planned[key]
        item.key = layouts.convert_key(key, to)
        result.renamed += item.key != key
        by_file.setdefault(item.parts[0].file, []).append(item)
    if result.skipped:
        logger.info("Skipped %d buffer(s) recomputed from the config: %s", len(result.skipped), listed(result.skipped))
    return by_file


def _check_against_config(planned: Iterable[_Planned], config: dict, to: str, where: str) -> None:
    """Zero missing and zero unexpected weights for the converted config, each of the shape it implies."""
    shapes = {p.key: p.shape for p in planned}
    text_head = any(k.endswith("text_lm_head.weight") for k in shapes)
    expected = layouts.expected_shapes(config, to, text_head=text_head)
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


def _convert_model(source: Path, target: Path, to: str, result: ConvertResult) -> None:
    config = read_json_object(source / "config.json", CheckpointError)
    if config.get("model_type") == layouts.MODEL_TYPES[to]:
        raise UsageError(f"{source} is already in the {to} layout ({config['model_type']}); nothing to convert")
    new_config = layouts.convert_model_config(config, to, str(source))
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


__all__ = ["ConvertResult", "check_adapter_on_model", "convert_layout", "convert_adapter_tensors"]
