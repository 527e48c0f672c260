"""Check an adapter directory by its content, not by file names.

Used after every save (against the shapes the live model says it must have) and by
``higgs-trainer verify``. A check collects every problem it finds; the raising form joins
them into one message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import AdapterVerificationError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# Every key of a LoRA adapter that PeftModel.from_pretrained loads starts with this.
PEFT_KEY_PREFIX = "base_model.model."
_PAIRS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
_PARAM_SUFFIXES = {"weight", "bias"}
_MAX_LISTED = 3


@dataclass
class AdapterSummary:
    """What an adapter directory holds, and what is wrong with it (``problems`` empty when it passed).

    Example:
        >>> summary = inspect_adapter("out/checkpoint-2/lora_adapters")  # doctest: +SKIP
        >>> summary.ok, summary.num_tensors, summary.r  # doctest: +SKIP
        (True, 8, 4)
    """

    path: str
    problems: list[str] = field(default_factory=list)
    peft_type: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    num_tensors: int = 0
    num_parameters: int = 0
    num_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def read_adapter_config(directory: Path) -> dict:
    """Parse ``adapter_config.json`` of an adapter directory."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterVerificationError(f"{path} is missing: not an adapter directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterVerificationError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterVerificationError(f"{path} does not hold a JSON object")
    return config


def read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Load the adapter weights of a directory: safetensors, or a pickle read with ``weights_only=True``."""
    safe_path, pickle_path = directory / SAFETENSORS_NAME, directory / PICKLE_NAME
    if safe_path.is_file():
        try:
            with safe_open(str(safe_path), framework="pt", device="cpu") as reader:
                return {key: reader.get_tensor(key) for key in reader.keys()}
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise AdapterVerificationError(f"cannot read {safe_path} (truncated or corrupt?): {exc}") from exc
    if pickle_path.is_file():
        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterVerificationError(
                f"cannot read {pickle_path} safely (weights_only=True refused it or it is corrupt): {exc}"
            ) from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterVerificationError(f"{pickle_path} does not hold a dict of tensors")
        return state
    raise AdapterVerificationError(f"{directory} has no {SAFETENSORS_NAME} (or {PICKLE_NAME})")


def _lora_part(key: str) -> tuple[str, str, list[str]] | None:
    """Split ``<module>.<lora part>.<rest>`` for LoRA keys; None for other keys."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _PAIRS or part in _PAIRS.values():
            return ".".join(parts[:i]), part, parts[i + 1 :]
    return None


def _listed(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def check_adapter_tensors(
    config: Mapping, tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[str]:
    """Return the problems of an adapter's config and tensors (empty list: it is sound).

    Checks: LoRA config; at least one tensor; keys in the layout ``PeftModel.from_pretrained``
    expects (``base_model.model.`` prefix, no adapter-name segment); every ``lora_A`` has its
    ``lora_B``; ranks agree with ``r`` and with each other; no empty tensor; finite values; and,
    when ``expected_shapes`` is given, exactly those keys with those shapes.

    Example:
        >>> check_adapter_tensors({"peft_type": "LORA", "r": 2}, {})
        ['the adapter holds no tensors']
    """
    problems: list[str] = []
    peft_type = config.get("peft_type")
    is_lora = peft_type == "LORA"
    if not is_lora:
        problems.append(f"adapter_config.json has peft_type {peft_type!r}, not 'LORA'")
    if not tensors:
        problems.append("the adapter holds no tensors")
        return problems

    ranks = {config.get("r")} | set((config.get("rank_pattern") or {}).values())
    misplaced, named, empty, nonfinite, bad_rank = [], [], [], [], []
    pieces: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            misplaced.append(key)
        if tensor.numel() == 0:
            empty.append(f"{key} {tuple(tensor.shape)}")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nonfinite.append(key)
        split = _lora_part(key)
        if split is None:
            continue
        module, part, rest = split
        if rest and rest[0] not in _PARAM_SUFFIXES:
            named.append(key)
        if not rest or rest[0] == "weight":
            pieces[(module, part)] = tensor
    if misplaced:
        problems.append(
            f"{len(misplaced)} key(s) lack the '{PEFT_KEY_PREFIX}' prefix that PeftModel.from_pretrained expects "
            f"(wrapper prefix?): {_listed(misplaced)}"
        )
    if named:
        problems.append(f"{len(named)} key(s) keep an adapter-name segment such as '.default': {_listed(named)}")
    if empty:
        problems.append(f"{len(empty)} tensor(s) are empty (the ZeRO-3 partitioned-save failure): {_listed(empty)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or inf: {_listed(nonfinite)}")

    unpaired = []
    for (module, part), tensor in pieces.items():
        partner_part = _PAIRS.get(part) or next(a for a, b in _PAIRS.items() if b == part)
        partner = pieces.get((module, partner_part))
        if partner is None:
            unpaired.append(f"{module}.{part}")
        elif part in _PAIRS and tensor.numel() and partner.numel():
            rank_a, rank_b = tensor.shape[0], partner.shape[1] if partner.dim() > 1 else -1
            if rank_a != rank_b or (is_lora and rank_a not in ranks):
                bad_rank.append(f"{module} (A {tuple(tensor.shape)}, B {tuple(partner.shape)}, r={config.get('r')})")
    if unpaired:
        problems.append(f"{len(unpaired)} LoRA matrix(es) lack their partner: {_listed(unpaired)}")
    if bad_rank:
        problems.append(
            f"{len(bad_rank)} LoRA pair(s) have ranks that disagree with r or each other: {_listed(bad_rank)}"
        )

    if expected_shapes is not None:
        missing = sorted(set(expected_shapes) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected_shapes))
        wrong = [
            f"{k} {tuple(tensors[k].shape)} != {tuple(expected_shapes[k])}"
            for k in sorted(set(tensors) & set(expected_shapes))
            if tuple(tensors[k].shape) != tuple(expected_shapes[k])
        ]
        if missing:
            problems.append(f"{len(missing)} tensor(s) of the model are missing from the file: {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) in the file are not in the model: {_listed(unexpected)}")
        if wrong:
            problems.append(f"{len(wrong)} tensor(s) have the wrong shape: {_listed(wrong)}")
    return problems


def inspect_adapter(
    directory: str | Path, expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> AdapterSummary:
    """Read an adapter directory and report what it holds and every problem found; never raises for bad content.

    Example:
        >>> summary = inspect_adapter("out/lora_adapters")  # doctest: +SKIP
        >>> summary.ok or summary.problems  # doctest: +SKIP
        True
    """
    directory = Path(directory)
    summary = AdapterSummary(path=str(directory))
    try:
        config = read_adapter_config(directory)
        tensors = read_adapter_tensors(directory)
    except AdapterVerificationError as exc:
        summary.problems.append(str(exc))
        return summary
    summary.peft_type = config.get("peft_type")
    summary.r = config.get("r")
    summary.lora_alpha = config.get("lora_alpha")
    targets = config.get("target_modules") or []
    summary.target_modules = sorted(targets) if isinstance(targets, list) else [str(targets)]
    summary.num_tensors = len(tensors)
    summary.num_parameters = sum(t.numel() for t in tensors.values())
    summary.num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    summary.problems.extend(check_adapter_tensors(config, tensors, expected_shapes))
    return summary


def verify_adapter(
    directory: str | Path, expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> AdapterSummary:
    """Like :func:`inspect_adapter`, but raise :class:`AdapterVerificationError` listing every problem.

    Example:
        >>> verify_adapter("out/checkpoint-4/lora_adapters").num_tensors  # doctest: +SKIP
        8
    """
    summary = inspect_adapter(directory, expected_shapes)
    if summary.problems:
        raise AdapterVerificationError(f"adapter at {directory} failed verification: " + "; ".join(summary.problems))
    return summary


def human_size(num_bytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Example:
        >>> human_size(1536)
        '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"  # pragma: no cover


__all__ = [
    "AdapterSummary",
    "check_adapter_tensors",
    "human_size",
    "inspect_adapter",
    "read_adapter_config",
    "read_adapter_tensors",
    "verify_adapter",
]
