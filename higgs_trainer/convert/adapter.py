"""Converting adapters: tensor keys and ``adapter_config.json`` renamed, checked to select the same modules, and loaded by peft onto a base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, HiggsTrainerError, UsageError, first_line, listed
from ..files.paths import read_adapter_config, read_adapter_tensors, read_json_object
from ..files.support_files import copy_support_files
from ..lora_keys import split_lora_key
from ..names import CONFIG_NAME, PEFT_KEY_PREFIX, SAFETENSORS_NAME
from ..verification.lora_config import configured_value, lora_config_from_dict
from .configs import convert_adapter_config, convert_model_config
from .keys import MODEL_TYPES, SPLIT_KEY, TRANSFORMERS, check_keys, convert_key, layout_of_keys, other
from .result import ConvertResult


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
        found = SPLIT_KEY.match(key)
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
    return PEFT_KEY_PREFIX + convert_key(module, to) + (f".{rest}" if rest else "")


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
    source_layout = layout_of_keys([m + "." for m, _ in split.values()])
    if source_layout is None:
        raise CheckpointError(
            f"{where}: cannot tell the layout of its keys ({listed(tensors)}); is it a Higgs adapter?"
        )
    if source_layout == to:
        raise UsageError(f"{where} is already in the {to} layout; nothing to convert")
    weights = []
    for module, rest in split.values():
        weight = f"{module}.weight" if rest else module
        if SPLIT_KEY.match(weight):
            raise CheckpointError(f"{where} has LoRA on a split weight ({module}), which has no equivalent")
        weights.append(weight)
    check_keys(weights, source_layout, where)
    converted = {_new_key(key, to): tensor for key, tensor in tensors.items()}
    if len(converted) != len(tensors):
        raise CheckpointError(f"{where}: two keys map to the same key in the {to} layout")
    return converted


def convert_adapter(
    source: Path, target: Path, to: str, result: ConvertResult, base_model: torch.nn.Module | None
) -> None:
    """Convert the adapter directory ``source`` into ``target`` (inside `convert_layout`'s staging directory).

    Checked before anything is written: the keys map back, the converted config selects the same
    modules, ranks and alphas, and with ``base_model`` peft finds exactly the converted keys on it.
    ``result`` counts what was written.
    """
    config = read_adapter_config(source)
    tensors = _concatenate_split(read_adapter_tensors(source), str(source), result)
    converted = convert_adapter_tensors(tensors, to, str(source))
    new_config = convert_adapter_config(config, to)
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
    back = {_new_key(_new_key(k, to), other(to)) for k in original}
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


def build_empty_model(base: Path, to: str) -> torch.nn.Module:
    """The base model in layout ``to``, built on the meta device from ``base``'s config (converted if need be)."""
    from accelerate import init_empty_weights

    config = read_json_object(base / "config.json", CheckpointError) if (base / "config.json").is_file() else None
    if config is None or config.get("model_type") not in MODEL_TYPES.values():
        raise UsageError(f"base {base} is not a Higgs Audio model directory (config.json with model_type higgs_audio*)")
    if config["model_type"] != MODEL_TYPES[to]:
        config = convert_model_config(config, to, str(base))
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


__all__ = ["build_empty_model", "check_adapter_on_model", "convert_adapter", "convert_adapter_tensors"]
