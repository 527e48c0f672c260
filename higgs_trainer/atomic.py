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
    """Move ``source`` to ``target``; an existing ``target`` is moved aside first and removed after.

    If the second rename fails, the previous ``target`` is moved back before the error propagates.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(source, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


def remove_residue(target: Path) -> None:
    """Clean up beside ``target`` after interrupted writes.

    A previous ``target`` moved aside by a write that died between its two renames
    (``.<name>.old-*`` with no ``target``) is moved back; other leftovers are deleted.
    """
    moved_aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if moved_aside and not target.exists():
        os.rename(moved_aside.pop(), target)
    for leftover in [*target.parent.glob(f".{target.name}.tmp-*"), *moved_aside]:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    If the body raises, the staging directory is removed and ``target`` is untouched. Files are
    flushed to disk before the rename.

    Examples:
        >>> with staged_directory("out/lora_adapters") as staging:
        ...     _ = (staging / "adapter_config.json").write_text("{}")
        >>> sorted(p.name for p in Path("out/lora_adapters").iterdir())
        ['adapter_config.json']
        >>> with staged_directory("out/lora_adapters") as staging:  # a failed write leaves the target as it was
        ...     raise OSError("disk full")
        Traceback (most recent call last):
        OSError: disk full
        >>> sorted(p.name for p in Path("out").iterdir())
        ['lora_adapters']
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_residue(target)  # first, so that a previous target an interrupted write moved aside is back
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    remove_residue(target)
