"""Sizes in bytes: read from the command line or the API (``--max-shard-size``) and written for people.

No torch here, so argument parsing and the CLI's reports stay light.
"""

from __future__ import annotations

import re

from ..errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
SIZE_FORMS = (
    "a byte count (e.g. 1000000) or a number with a unit: 500MB, 5GB, 1.5GB, 2GiB (KB/MB/GB/TB, KiB/MiB/GiB/TiB)"
)


def parse_size(text: str | int) -> int:
    """A shard size in bytes from ``text`` (`SIZE_FORMS`); `UsageError` for anything else, or a size under 1 byte.

    Units are bytes in any case (``5gb`` is 5 GB, not transformers' 5 gigabits); a decimal needs a
    unit and is rounded down to whole bytes. Refused: ``0`` and negative sizes (no shard holds a
    tensor), ``1e3`` and other forms that are not a number followed by a unit.

    Examples:
        >>> parse_size("5GB"), parse_size("2GiB"), parse_size("0.5GB"), parse_size("1000"), parse_size(64)
        (5000000000, 2147483648, 500000000, 1000, 64)
        >>> parse_size("0")
        Traceback (most recent call last):
        ...
        higgs_trainer.errors.UsageError: max shard size '0' is not a size of at least 1 byte; give a byte count (e.g. 1000000) or a number with a unit: 500MB, 5GB, 1.5GB, 2GiB (KB/MB/GB/TB, KiB/MiB/GiB/TiB)
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text)) if not isinstance(text, bool) else None
    unit = found.group(2).upper() if found else ""
    if found and unit in _UNITS and ("." not in found.group(1) or unit not in ("", "B")):
        size = (
            int(float(found.group(1)) * _UNITS[unit]) if "." in found.group(1) else int(found.group(1)) * _UNITS[unit]
        )
        if size >= 1:
            return size
    raise UsageError(f"max shard size {text!r} is not a size of at least 1 byte; give {SIZE_FORMS}")


def human_size(num_bytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Examples:
        >>> human_size(1536)
        '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"  # pragma: no cover
