"""Read the plain values in a pickle without running it: every class it names becomes an inert stand-in.

For ``training_args.bin``, which ``Trainer`` writes with ``torch.save``: ``torch.load(weights_only=True)``
refuses its ``TrainingArguments`` object, and a full unpickle would run whatever code the file names.
Written here because neither torch nor transformers reads a pickle's state without importing its classes.

Examples:
    >>> import torch
    >>> torch.save({"lora_alpha": 32}, "args.bin")
    >>> pickled_attributes("args.bin")
    {'lora_alpha': 32}
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from typing import Any

logger = logging.getLogger(__name__)


class _Stub:
    """Stands in for every class and function named in a pickle: records arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub(*args)


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Stub,), {})  # never imports or calls anything real

    def persistent_load(self, pid: Any) -> None:
        return None  # tensor storages: not needed


def pickled_attributes(path: str | os.PathLike) -> dict:
    """The attributes of the object (or the dict) in a ``torch.save`` file (``training_args.bin``), read without running it.

    Every class the pickle names is replaced by an inert stand-in, so nothing is imported or
    executed; only plain values (numbers, strings, containers) come back. Returns ``{}`` for
    anything else.

    Examples:
        >>> import torch, transformers
        >>> torch.save(transformers.TrainingArguments("out", learning_rate=1e-4), "training_args.bin")
        >>> pickled_attributes("training_args.bin")["learning_rate"]
        0.0001
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > 10_000_000:
                return {}
            obj = _StubUnpickler(io.BytesIO(archive.read(names[0]))).load()
    except Exception as exc:  # not a zip, truncated, odd opcodes: no attributes to be had
        logger.debug("cannot read attributes from %s: %s", path, exc)
        return {}
    state = obj if isinstance(obj, dict) else getattr(obj, "state", None)
    if isinstance(state, tuple):  # (dict, slots) for classes with __slots__
        state = next((s for s in state if isinstance(s, dict)), None)
    return state if isinstance(state, dict) else {}


__all__ = ["pickled_attributes"]
