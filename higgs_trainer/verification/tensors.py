"""An adapter's tensors checked against its config: key layout, content, LoRA pairs and ranks, targets, shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from ..errors import listed
from ..lora_keys import PARAM_SUFFIXES, LoraKey, split_lora_matrix_key
from ..names import LORA_PAIRS, PEFT_KEY_PREFIX
from .lora_config import as_lora_config, configured_rank, lora_config_problems


def check_adapter_tensors(
    config: Mapping, tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[str]:
    """Return the problems of an adapter's config and tensors (empty list: it is sound).

    Checks: LoRA config; at least one tensor; keys in the layout ``PeftModel.from_pretrained``
    expects (``base_model.model.`` prefix, no adapter-name segment); every ``lora_A`` has its
    ``lora_B``; ranks agree with ``r`` and with each other; no empty tensor; finite values; and,
    when ``expected_shapes`` is given, exactly those keys with those shapes.

    Examples:
        >>> check_adapter_tensors({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, {})
        ['the adapter holds no tensors']
    """
    problems: list[str] = []
    peft_type = config.get("peft_type")
    is_lora = peft_type == "LORA"
    if not is_lora:
        problems.append(f"adapter_config.json has peft_type {peft_type!r}, not 'LORA'")
    config_problems = lora_config_problems(config) if is_lora else []
    problems.extend(config_problems)
    if not tensors:
        problems.append("the adapter holds no tensors")
        return problems
    lora_config = as_lora_config(config, problems) if is_lora and not config_problems else None
    problems.extend(_key_layout_problems(tensors))
    problems.extend(_content_problems(tensors))
    pieces = _lora_weights(tensors)
    problems.extend(_pairing_problems(tensors, pieces, lora_config))
    if lora_config is not None:
        problems.extend(_targeting_problems(pieces, lora_config))
    if expected_shapes is not None:
        problems.extend(_expected_shape_problems(tensors, expected_shapes))
    return problems


def _key_layout_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys outside the layout ``PeftModel.from_pretrained`` expects: no ``base_model.model.`` prefix, an adapter name."""
    misplaced = [key for key in tensors if not key.startswith(PEFT_KEY_PREFIX)]
    named = [
        key
        for key in tensors
        if (lora := split_lora_matrix_key(key)) is not None and lora.rest and lora.rest[0] not in PARAM_SUFFIXES
    ]
    problems = []
    if misplaced:
        problems.append(
            f"{len(misplaced)} key(s) lack the '{PEFT_KEY_PREFIX}' prefix that PeftModel.from_pretrained expects "
            f"(wrapper prefix?): {listed(misplaced)}"
        )
    if named:
        problems.append(f"{len(named)} key(s) keep an adapter-name segment such as '.default': {listed(named)}")
    return problems


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors that hold NaN or inf, in order.

    One sum per tensor screens them all: a NaN or inf anywhere makes the sum NaN or inf. A sum of
    large finite values can overflow by itself, so a tensor whose sum is not finite is then checked
    element by element. For an adapter's hundreds of small tensors this is faster than
    ``isfinite(t).all()`` on each, which allocates a mask per tensor (benchmarks/README.md, "Measurements behind the code").

    Examples:
        >>> nonfinite_tensors({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.full((2,), 6e4, dtype=torch.float16)})
        ['b']
    """
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            by_dtype.setdefault(tensor.dtype, []).append(key)
    suspects = set()
    for keys in by_dtype.values():
        sums = torch.stack([tensors[key].sum() for key in keys])
        suspects.update(keys[i] for i in (~torch.isfinite(sums)).nonzero().flatten().tolist())
    return [key for key in tensors if key in suspects and not bool(torch.isfinite(tensors[key]).all())]


def _content_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors that are empty or hold NaN/inf, and LoRA tensors that are not floating point."""
    empty, not_float = [], []
    nonfinite = nonfinite_tensors(tensors)
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            empty.append(f"{key} {tuple(tensor.shape)}")
        if split_lora_matrix_key(key) is not None and not tensor.is_floating_point():
            not_float.append(f"{key} ({str(tensor.dtype).replace('torch.', '')})")
    problems = []
    if empty:
        problems.append(f"{len(empty)} tensor(s) are empty (the ZeRO-3 partitioned-save failure): {listed(empty)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or inf: {listed(nonfinite)}")
    if not_float:
        problems.append(f"{len(not_float)} LoRA tensor(s) are not floating point: {listed(not_float)}")
    return problems


def _is_weight(lora: LoraKey) -> bool:
    return not lora.rest or lora.rest[0] == "weight"


def _lora_weights(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """The LoRA matrices (not their biases) by (module, part), in the file's order."""
    return {
        (lora.module, lora.part): tensor
        for key, tensor in tensors.items()
        if (lora := split_lora_matrix_key(key)) is not None and _is_weight(lora)
    }


def _pairing_problems(
    tensors: Mapping[str, torch.Tensor], pieces: Mapping[tuple[str, str], torch.Tensor], lora_config: LoraConfig | None
) -> list[str]:
    """LoRA tensors with the wrong number of dimensions, matrices without their partner, ranks that disagree."""
    bad_dims, unpaired, bad_rank = [], [], []
    for key, tensor in tensors.items():
        lora = split_lora_matrix_key(key)
        if lora is None or not tensor.is_floating_point():
            continue
        if (tensor.dim() < 2) if _is_weight(lora) else (tensor.dim() != 1):
            bad_dims.append(f"{key} {tuple(tensor.shape)}")
    for (module, part), tensor in pieces.items():
        partner = pieces.get((module, LoraKey(module, part, ()).partner))
        if partner is None:
            unpaired.append(f"{module}.{part}")
        elif part in LORA_PAIRS and tensor.dim() != partner.dim():
            bad_dims.append(f"{module} (A {tuple(tensor.shape)}, B {tuple(partner.shape)})")
        elif part in LORA_PAIRS and tensor.numel() and partner.numel():
            rank_a, rank_b = tensor.shape[0], partner.shape[1] if partner.dim() > 1 else -1
            expected = configured_rank(lora_config, module) if lora_config is not None else rank_a
            if rank_a != rank_b or rank_a != expected:
                bad_rank.append(f"{module} (A {tuple(tensor.shape)}, B {tuple(partner.shape)}, config r={expected})")
    problems = []
    if bad_dims:
        problems.append(
            f"{len(bad_dims)} LoRA tensor(s) have the wrong number of dimensions (weights are matrices, A and B alike; "
            f"biases are vectors): {listed(bad_dims)}"
        )
    if unpaired:
        problems.append(f"{len(unpaired)} LoRA matrix(es) lack their partner: {listed(unpaired)}")
    if bad_rank:
        problems.append(
            f"{len(bad_rank)} LoRA pair(s) have ranks that disagree with the config (r, rank_pattern) or each other: "
            f"{listed(bad_rank)}"
        )
    return problems


def _targeting_problems(pieces: Mapping[tuple[str, str], torch.Tensor], lora_config: LoraConfig) -> list[str]:
    """LoRA modules of the file that the config's ``target_modules`` does not name (peft would skip them)."""
    if lora_config.target_modules in (None, "all-linear"):
        return []
    modules = sorted({module for module, _ in pieces if module.startswith(PEFT_KEY_PREFIX)})
    untargeted = [m for m in modules if not check_target_module_exists(lora_config, m[len(PEFT_KEY_PREFIX) :])]
    if not untargeted:
        return []
    return [
        f"{len(untargeted)} LoRA module(s) in the file are not in the config's target_modules, so "
        f"PeftModel.from_pretrained would skip them: {listed(untargeted)}"
    ]


def _expected_shape_problems(
    tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Tensors the model has and the file lacks, the other way round, and those of another shape."""
    missing = sorted(set(expected_shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_shapes))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(expected_shapes[k])}"
        for k in sorted(set(tensors) & set(expected_shapes))
        if tuple(tensors[k].shape) != tuple(expected_shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are missing from the file: {listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file are not in the model: {listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) have the wrong shape: {listed(wrong)}")
    return problems


__all__ = ["check_adapter_tensors", "nonfinite_tensors"]
