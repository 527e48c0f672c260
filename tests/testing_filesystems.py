"""Real file systems for fault tests: a tiny tmpfs that fills up, and a umask set for one test."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from tests.testing_environment import missing


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str):
    """Mount a tmpfs of ``size`` (e.g. ``"8k"``) at ``directory`` for the block; unmounted after, even on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if mounted.returncode != 0:  # CI runs as root, where this works
        missing(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777
