"""Shims for differences between library versions, all in one place.

Each shim names the versions (or upstream issue) it is for and when it can go.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Any

import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers.trainer_pt_utils import reissue_pt_warnings

_TRANSFORMERS = Version(transformers.__version__)


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


def from_pretrained_kwargs(dtype: torch.dtype | str) -> dict[str, Any]:
    """Keyword arguments for ``PreTrainedModel.from_pretrained`` that load in ``dtype`` without a random init first.

    transformers >= 4.56 names the argument ``dtype`` (``torch_dtype`` is deprecated there; older
    versions know only ``torch_dtype``). transformers < 5 builds the model with random weights
    before loading unless ``low_cpu_mem_usage=True``; 5.x always loads lazily and has no such flag.
    """
    kwargs: dict[str, Any] = {"dtype" if _TRANSFORMERS >= Version("4.56") else "torch_dtype": dtype}
    if _TRANSFORMERS < Version("5"):
        kwargs["low_cpu_mem_usage"] = True
    return kwargs


def save_pretrained_safetensors(model: Any, directory: str | os.PathLike) -> None:
    """``model.save_pretrained(directory)`` in safetensors.

    transformers < 5 takes ``safe_serialization`` (True by default since 4.35, passed to be sure);
    5.x writes only safetensors and removed the argument.
    """
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(directory), **kwargs)


def load_optimizer_and_scheduler_on_cpu(trainer: Any, checkpoint: str) -> bool:
    """Load ``checkpoint``'s optimizer and scheduler state for a multi-process CPU (gloo) run; False if not that case.

    For transformers < 5 (seen with 4.46.3): ``Trainer._load_optimizer_and_scheduler`` loads the
    optimizer with ``map_location=self.args.device`` whenever ``world_size > 1``, and on CPU that
    device is the indexed ``cpu:0``, which ``torch.load`` cannot restore ("don't know how to restore
    data location of torch.storage.UntypedStorage (tagged with cpu:0)"): every DDP resume on CPU
    fails on every rank. transformers 5.x maps a CPU device to plain ``"cpu"`` itself (5.24 checked).
    Can go once the Higgs stack moves to transformers 5.
    Only the plain DDP path is taken over (no DeepSpeed, FSDP, XLA or SageMaker, whose loaders
    differ); anything else, or a checkpoint without both files, is left to ``Trainer``.

    Examples:
        >>> if not load_optimizer_and_scheduler_on_cpu(trainer, "out/checkpoint-2"):  # doctest: +SKIP
        ...     Trainer._load_optimizer_and_scheduler(trainer, "out/checkpoint-2")
    """
    device = trainer.args.device
    if (
        _TRANSFORMERS >= Version("5")
        or trainer.args.world_size <= 1
        or device.type != "cpu"
        or trainer.is_deepspeed_enabled
        or trainer.is_fsdp_enabled
    ):
        return False
    optimizer_file = os.path.join(checkpoint, "optimizer.pt")  # transformers' OPTIMIZER_NAME
    scheduler_file = os.path.join(checkpoint, "scheduler.pt")  # transformers' SCHEDULER_NAME
    if not (os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)):
        return False
    trainer.optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=True))
    with warnings.catch_warnings(record=True) as caught:  # as Trainer does: the scheduler's save warning, reissued
        trainer.lr_scheduler.load_state_dict(torch.load(scheduler_file, map_location="cpu", weights_only=True))
    reissue_pt_warnings(caught)
    return True
