"""The layout of a training run's output directory: its ``checkpoint-N`` directories, and which of them are complete.

Examples:
    >>> bool(CHECKPOINT_NAME.match("checkpoint-500"))
    True
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..names import TRAINER_STATE

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR and get_last_checkpoint


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
