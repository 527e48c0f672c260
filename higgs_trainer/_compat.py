"""Shims for differences between library versions, all in one place.

Each shim names the versions (or upstream issue) it is for and when it can go.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch


def rng_state_safe_globals() -> contextlib.AbstractContextManager[Any]:
    """Allow-list the numpy globals that ``rng_state.pth`` pickles, for ``torch.load(weights_only=True)``.

    For transformers < 4.47 with torch >= 2.6: ``Trainer._load_rng_state`` calls ``torch.load``
    without ``weights_only`` and fails to unpickle numpy's RNG state (transformers issue 34631,
    fixed upstream by PR 34632 in 4.47.0). Can go once the Higgs stack moves past 4.46.
    Harmless on newer transformers, which allow-list the same globals themselves.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5 loads with weights_only=False by default
        return contextlib.nullcontext()
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    allowed = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return safe_globals(allowed)
