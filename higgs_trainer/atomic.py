"""Write a directory all at once: stage it beside the target, then rename it into place.

A failed or interrupted write leaves the previous target as it was; a completed one leaves
no staging residue (earlier interrupted writes' residue is removed too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directory itself to disk."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(source, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


def remove_residue(target: Path) -> None:
    """Delete staging directories left beside ``target`` by earlier interrupted writes."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    If the body raises, the staging directory is removed and ``target`` is untouched. Files are
    flushed to disk before the rename.

    Examples:
        >>> with staged_directory("out/lora_adapters") as staging:  # doctest: +SKIP
        ...     peft_model.save_pretrained(staging)
        ...     verify_adapter(staging)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    remove_residue(target)
