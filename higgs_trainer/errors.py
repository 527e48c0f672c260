"""Error types raised by higgs_trainer.

Each also subclasses the builtin a caller would naturally catch (``ValueError`` for bad
input, ``RuntimeError`` for a failed save), so ``except ValueError`` keeps working.

Example:
    >>> from higgs_trainer.errors import LoraModelNotFoundError
    >>> issubclass(LoraModelNotFoundError, ValueError)
    True
"""

from __future__ import annotations


class HiggsTrainerError(Exception):
    """Base class of every error this library raises on purpose."""


class LoraModelNotFoundError(HiggsTrainerError, ValueError):
    """No ``peft.PeftModel`` was found inside the model (or not at the named path)."""


class AmbiguousLoraModelError(HiggsTrainerError, ValueError):
    """Two or more distinct ``peft.PeftModel`` components were found; name one."""


class AdapterSaveError(HiggsTrainerError, RuntimeError):
    """Writing an adapter failed; the previous adapter directory, if any, is intact."""


class AdapterVerificationError(HiggsTrainerError, ValueError):
    """An adapter directory is missing, unreadable, empty or does not match its model."""
