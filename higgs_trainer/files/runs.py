"""A training run's output directory: its ``checkpoint-N`` directories, which are complete, and the adapter directories they hold.

The one place that knows this layout. An adapter directory is found by content (its
``adapter_config.json`` or weights), in a checkpoint's or run's ``lora_adapters/``, and also where an
interrupted re-save left it moved aside (`atomic.find_directory`), so every reader sees the same
adapter.

Examples:
    >>> bool(CHECKPOINT_NAME.match("checkpoint-500"))
    True
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import AdapterVerificationError
from ..names import ADAPTER_DIRNAME, CONFIG_NAME, FULL_WEIGHT_FILES, PICKLE_NAME, SAFETENSORS_NAME, TRAINER_STATE
from .atomic import find_directory
from .paths import existing_directory

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR
CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")  # what Trainer writes and get_last_checkpoint reads


# checkpoint-N directories


def is_complete_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """True when ``checkpoint`` was written to the end: ``Trainer._save_checkpoint`` writes ``trainer_state.json`` last.

    Examples:
        >>> Path("out/checkpoint-500").mkdir(parents=True)
        >>> is_complete_checkpoint("out/checkpoint-500")  # killed before Trainer wrote its state
        False
        >>> _ = Path("out/checkpoint-500/trainer_state.json").write_text("{}")
        >>> is_complete_checkpoint("out/checkpoint-500")
        True
    """
    return (Path(checkpoint) / TRAINER_STATE).is_file()


def is_interrupted_checkpoint(checkpoint: Path) -> bool:
    """True for a ``checkpoint-N`` directory that a kill cut short while ``Trainer`` saved it.

    Examples:
        >>> Path("out/checkpoint-6").mkdir(parents=True)
        >>> is_interrupted_checkpoint(Path("out/checkpoint-6")), is_interrupted_checkpoint(Path("out"))
        (True, False)
    """
    return (
        bool(CHECKPOINT_NAME.match(checkpoint.name)) and checkpoint.is_dir() and not is_complete_checkpoint(checkpoint)
    )


def checkpoints_of(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` directories of a run, by step (oldest first).

    Examples:
        >>> for name in ("checkpoint-10", "checkpoint-2", "checkpoint-x", "lora_adapters"):
        ...     Path("out", name).mkdir(parents=True)
        >>> [p.name for p in checkpoints_of("out")]
        ['checkpoint-2', 'checkpoint-10']
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_like_dirs(run_dir: Path) -> list[Path]:
    """Every ``checkpoint-*`` directory of a run (``checkpoint-N`` by step, after any other ``checkpoint-*``).

    What the commands look into: a copied ``checkpoint-best`` holds an adapter too.

    Examples:
        >>> for name in ("checkpoint-10", "checkpoint-2", "checkpoint-best"):
        ...     Path("out", name).mkdir(parents=True)
        >>> [p.name for p in checkpoint_like_dirs(Path("out"))]
        ['checkpoint-best', 'checkpoint-2', 'checkpoint-10']
    """
    return sorted((p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), key=_step)


def _step(checkpoint: Path) -> tuple[int, str]:
    suffix = checkpoint.name.rsplit("-", 1)[-1]
    return (int(suffix) if suffix.isdigit() else -1, checkpoint.name)


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a ``checkpoint-*`` directory belongs to, named as the user named it; None for another directory.

    Examples:
        >>> run_dir_of(Path("out/checkpoint-500")), run_dir_of(Path("out"))
        (PosixPath('out'), None)
    """
    if checkpoint.name.startswith(CHECKPOINT_PREFIX):
        return checkpoint.parent
    if checkpoint.resolve().name.startswith(CHECKPOINT_PREFIX):  # "." or a symlink
        return checkpoint.resolve().parent
    return None


# adapter directories


def holds_adapter_files(directory: Path) -> bool:
    """True when ``directory`` holds an adapter's own files (its config or weights) at its top level.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
        >>> holds_adapter_files(Path("out/lora_adapters")), holds_adapter_files(Path("out"))
        (True, False)
    """
    return any((directory / name).is_file() for name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME))


def adapter_dirs_of(path: str | Path) -> list[Path]:
    """The adapter directories ``path`` stands for: itself, a checkpoint's ``lora_adapters``, or a run's final and every ``checkpoint-*``.

    A checkpoint that holds full weights but no ``lora_adapters`` still yields its (missing)
    ``lora_adapters`` path, so the check reports it. Raises `AdapterVerificationError` when
    ``path`` is none of these.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> peft_model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> for directory in ("out/checkpoint-2", "out/checkpoint-4", "out"):
        ...     peft_model.save_pretrained(f"{directory}/lora_adapters")
        >>> [str(p) for p in adapter_dirs_of("out")]
        ['out/lora_adapters', 'out/checkpoint-2/lora_adapters', 'out/checkpoint-4/lora_adapters']
    """
    path = find_directory(path)
    if not path.is_dir():
        raise AdapterVerificationError(f"{path} is not a directory")
    if holds_adapter_files(path):
        return _with_named_adapters(path)
    own = own_adapter_dir(path)
    has_own = own.is_dir() or any((path / name).is_file() for name in FULL_WEIGHT_FILES)
    checkpoints = checkpoint_like_dirs(path)
    if not has_own and not checkpoints:
        raise AdapterVerificationError(
            f"{path} is not an adapter, checkpoint or run directory: no {CONFIG_NAME}, no {ADAPTER_DIRNAME}/, "
            "no model weights, no checkpoint-*/"
        )
    return [
        d
        for a in ([own] if has_own else []) + [_adapter_of_checkpoint(c) for c in checkpoints]
        for d in _with_named_adapters(a)
    ]


def _adapter_of_checkpoint(checkpoint: Path) -> Path:
    """A checkpoint's ``lora_adapters``, or the checkpoint itself where peft's own saving put the adapter at its root."""
    own = own_adapter_dir(checkpoint)
    if not own.exists() and holds_adapter_files(checkpoint):
        return checkpoint
    return own


def _with_named_adapters(directory: Path) -> list[Path]:
    """``directory`` and the subdirectories peft writes for adapters not named ``default``."""
    if not directory.is_dir():
        return [directory]
    named = sorted(sub for sub in directory.iterdir() if sub.is_dir() and (sub / CONFIG_NAME).is_file())
    top = not named or holds_adapter_files(directory)
    return ([directory] if top else []) + named


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` if it is an adapter directory, else its ``lora_adapters`` (a checkpoint or run directory).

    The one-adapter form of `adapter_dirs_of`, for commands that take one adapter (merge, convert).

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/checkpoint-500/lora_adapters")
        >>> resolve_adapter_dir("out/checkpoint-500")
        PosixPath('out/checkpoint-500/lora_adapters')
    """
    path = existing_directory(find_directory(path), "adapter")
    own = own_adapter_dir(path)
    if not (path / CONFIG_NAME).is_file() and (own / CONFIG_NAME).is_file():
        logger.info("Using the adapter in %s", own)
        return own
    return path


def own_adapter_dir(directory: Path) -> Path:
    """``directory``'s ``lora_adapters``, or where an interrupted re-save left it moved aside (may not exist).

    Examples:
        >>> own_adapter_dir(Path("out/checkpoint-500"))
        PosixPath('out/checkpoint-500/lora_adapters')
    """
    return find_directory(directory / ADAPTER_DIRNAME)


__all__ = [
    "CHECKPOINT_NAME",
    "adapter_dirs_of",
    "checkpoint_like_dirs",
    "checkpoints_of",
    "holds_adapter_files",
    "is_complete_checkpoint",
    "is_interrupted_checkpoint",
    "own_adapter_dir",
    "resolve_adapter_dir",
    "run_dir_of",
]
