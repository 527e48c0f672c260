"""Decide ``lora_alpha`` for an adapter rescued from a full checkpoint: from the caller or the files the run saved; never guess.

``lora_alpha`` is not in the weights (only ``r`` follows from the shapes), so `find_lora_settings`
takes it from an adapter config, ``--lora-alpha``, or what the run recorded, and refuses otherwise.

Examples:
    >>> find_lora_settings("out/checkpoint-500", lora_alpha=32).lora_alpha
    32.0
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, HiggsTrainerError, UsageError
from ..names import ADAPTER_DIRNAME, CONFIG_NAME
from ..verification.lora_config import is_valid_alpha
from .paths import read_json_object
from .pickles import pickled_attributes
from .runs import own_adapter_dir, run_dir_of

logger = logging.getLogger(__name__)

# Where a run may have written lora_alpha, relative to the checkpoint and to its parent (the run directory).
_ALPHA_FILES = (f"{ADAPTER_DIRNAME}/{CONFIG_NAME}", CONFIG_NAME, "training_args.json", "args.json", "training_args.bin")


@dataclass(frozen=True)
class LoraSettings:
    """``lora_alpha`` and where it came from; ``config`` is a whole adapter config when the source was one.

    Examples:
        >>> find_lora_settings("out/checkpoint-500", lora_alpha=32)
        LoraSettings(lora_alpha=32.0, source='--lora-alpha', config=None)
    """

    lora_alpha: float
    source: str
    config: dict | None = None


def read_lora_config_file(path: str | os.PathLike) -> dict:
    """A LoRA adapter config from ``path`` (an ``adapter_config.json`` or a directory holding one).

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, lora_alpha=32, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
        >>> read_lora_config_file("out/lora_adapters")["lora_alpha"]
        32
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"adapter config {path} does not exist")
    config = read_json_object(path, CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} has peft_type {config.get('peft_type')!r}, not 'LORA'")
    if not is_valid_alpha(config.get("lora_alpha")):
        raise CheckpointError(f"{path} has no usable lora_alpha (a positive number): {config.get('lora_alpha')!r}")
    return config


def _alpha_in(path: Path) -> tuple[float, dict | None] | None:
    """``(lora_alpha, adapter config or None)`` if the file at ``path`` records one."""
    if path.name == CONFIG_NAME:
        try:
            config = read_lora_config_file(path)
        except HiggsTrainerError as exc:
            logger.info("ignoring %s: %s", path, exc)
            return None
        return float(config["lora_alpha"]), config
    if path.suffix == ".bin":
        values = pickled_attributes(path)
    else:
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    alpha = values.get("lora_alpha") if isinstance(values, dict) else None
    if is_valid_alpha(alpha):
        return float(alpha), None
    if alpha is not None:
        logger.warning("ignoring lora_alpha %r in %s: not a positive number", alpha, path)
    return None


def find_lora_settings(
    checkpoint: str | os.PathLike,
    lora_alpha: float | None = None,
    adapter_config: str | os.PathLike | None = None,
) -> LoraSettings:
    """Decide ``lora_alpha`` for an adapter rescued from ``checkpoint``; never guess.

    In order: ``adapter_config`` (a whole LoRA config; ``lora_alpha``, if also given, must agree),
    ``lora_alpha``, then what the run saved, in the checkpoint and then in its parent (the run
    directory): ``lora_adapters/adapter_config.json``, ``adapter_config.json``,
    ``training_args.json`` / ``args.json`` with a top-level ``lora_alpha``, and the attributes of
    ``training_args.bin`` (a ``TrainingArguments`` subclass with a ``lora_alpha`` field), read
    without unpickling anything. Otherwise raises `UsageError`.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, lora_alpha=32, target_modules=["q_proj"])).save_pretrained("old_run")
        >>> find_lora_settings("out/checkpoint-500", adapter_config="old_run/adapter_config.json").source
        'old_run/adapter_config.json'
    """
    if adapter_config is not None:
        config = read_lora_config_file(adapter_config)
        alpha = float(config["lora_alpha"])
        if lora_alpha is not None and float(lora_alpha) != alpha:
            raise UsageError(f"--lora-alpha {lora_alpha} disagrees with lora_alpha {alpha} in {adapter_config}")
        return LoraSettings(alpha, str(adapter_config), config)
    if lora_alpha is not None:
        if not is_valid_alpha(lora_alpha):
            raise UsageError(f"--lora-alpha must be a positive number, got {lora_alpha}")
        return LoraSettings(float(lora_alpha), "--lora-alpha")
    checkpoint = Path(checkpoint)
    run_dir = run_dir_of(checkpoint)
    directories = [checkpoint] + ([run_dir] if run_dir is not None else [])
    for directory in directories:
        for name in _ALPHA_FILES:
            path = directory / name
            if name.startswith(ADAPTER_DIRNAME + "/"):  # also where an interrupted re-save left it moved aside
                path = own_adapter_dir(directory) / CONFIG_NAME
            if path.is_file():
                found = _alpha_in(path)
                if found is not None:
                    logger.info("lora_alpha %s taken from %s", found[0], path)
                    return LoraSettings(found[0], str(path), found[1])
    raise UsageError(
        f"lora_alpha cannot be inferred from the weights and the run did not record it (looked for "
        f"{', '.join(_ALPHA_FILES)} in {' and '.join(str(d) for d in directories)}); pass --lora-alpha A with the value used in "
        "training, or --adapter-config FILE"
    )


__all__ = ["LoraSettings", "find_lora_settings", "read_lora_config_file"]
