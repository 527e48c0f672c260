"""Skipping a test for a missing part of the environment, which the test command turns into a failure.

A skip for a missing DeepSpeed, a tmpfs that cannot be mounted, the other stack's python or the
console script is fine on a developer's machine, but in ``scripts/test.sh`` (which sets
``HIGGS_TRAINER_STRICT_SKIPS=1`` and installs all of them) it would be a check that cannot fail.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

STRICT = os.environ.get("HIGGS_TRAINER_STRICT_SKIPS") == "1"


def missing(reason: str) -> None:
    """Skip the test (fail it under ``HIGGS_TRAINER_STRICT_SKIPS=1``): ``reason`` names what is missing."""
    if STRICT:
        pytest.fail(f"{reason} (the test command needs it: HIGGS_TRAINER_STRICT_SKIPS=1)", pytrace=False)
    pytest.skip(reason)


def need_module(name: str) -> ModuleType:
    """``importlib.import_module(name)``, or `missing` when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} cannot be imported: {exc}")
        raise  # not reached: missing() skips or fails
