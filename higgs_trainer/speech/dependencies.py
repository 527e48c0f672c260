"""Importing what the ``speech`` extra installs, with a one-line error naming the extra when it is missing.

Examples:
    >>> import_speech_dependency("json").__name__
    'json'
    >>> import_speech_dependency("no_such_module_here")
    Traceback (most recent call last):
    ModuleNotFoundError: no_such_module_here is needed for speech scoring and is not installed: pip install "higgs-trainer[speech]"
"""

from __future__ import annotations

import importlib
from types import ModuleType

SPEECH_EXTRA = 'pip install "higgs-trainer[speech]"'


def import_speech_dependency(name: str) -> ModuleType:
    """Import ``name`` (jiwer, soundfile, soxr), or raise ``ModuleNotFoundError`` saying how to install it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ModuleNotFoundError(
            f"{name} is needed for speech scoring and is not installed: {SPEECH_EXTRA}", name=name
        ) from None
