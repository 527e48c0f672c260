"""Shims for differences between library versions, all in one place.

Each shim names the versions (or upstream issue) it is for and when it can go.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers.trainer_pt_utils import reissue_pt_warnings

from .errors import HiggsTrainerError

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


def save_pretrained_safetensors(model: Any, directory: str | os.PathLike, max_shard_size: int | None = None) -> None:
    """``model.save_pretrained(directory)`` in safetensors (shards of at most ``max_shard_size`` bytes if given).

    transformers < 5 takes ``safe_serialization`` (True by default since 4.35, passed to be sure);
    5.x writes only safetensors and removed the argument.
    """
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(directory), **kwargs)


# DeepSpeed and adapter-only checkpoints of a *wrapped* PeftModel.
#
# transformers decides both by `_is_peft_model(self.model)`, which is false for a plain nn.Module wrapper around a
# PeftModel (the community scripts' layout). Both shims can go if transformers ever looks for a PeftModel inside the
# wrapper; until then they are needed on 4.46.3 and 5.x alike.


@contextlib.contextmanager
def exclude_frozen_parameters_on_save(engine: Any) -> Iterator[None]:
    """For one save: ``engine.save_checkpoint`` leaves the frozen (base) parameters out of DeepSpeed's checkpoint.

    Works around ``Trainer._save_optimizer_and_scheduler`` (transformers 4.46.3 trainer.py:3233, 5.24
    trainer.py:3558: ``if accept_exclude_frozen_parameters and _is_peft_model(self.model):
    self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)``), which writes
    the whole frozen base into every checkpoint of a wrapper. Whatever ``engine.save_checkpoint`` was
    before (the class's method, or an instance attribute someone else set) is put back afterwards;
    nested use is harmless.
    """
    had_own = "save_checkpoint" in vars(engine)
    previous = vars(engine).get("save_checkpoint")
    current = engine.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        kwargs["exclude_frozen_parameters"] = True
        return current(*args, **kwargs)

    save_checkpoint.__signature__ = inspect.signature(current)  # Trainer probes it for the keyword
    engine.save_checkpoint = save_checkpoint
    try:
        yield
    finally:
        if had_own:
            engine.save_checkpoint = previous
        else:
            del engine.save_checkpoint


_ALLOWS_MISSING_FROZEN = "_higgs_trainer_allows_missing_frozen"


def allow_missing_frozen_parameters(engine: Any) -> None:
    """Let ``engine`` load a module state saved without its frozen parameters, strict about every other key.

    Works around ``Trainer._load_from_checkpoint`` / ``_load_best_model`` (transformers 4.46.3
    trainer.py:2300 and :2840, 5.24 trainer.py:1812 and :3756: ``deepspeed_load_checkpoint(...,
    load_module_strict=not _is_peft_model(self.model))``), which loads a wrapper strictly, so a
    checkpoint from `exclude_frozen_parameters_on_save` fails on the missing base weights. Uses
    DeepSpeed's own ``allowed_missing_keys`` of ``load_module_state_dict`` (deepspeed >= 0.18).
    Applying it again to the same engine changes nothing.
    """
    if getattr(engine.load_module_state_dict, _ALLOWS_MISSING_FROZEN, False):
        return
    original = engine.load_module_state_dict
    if "allowed_missing_keys" not in inspect.signature(type(engine).load_module_state_dict).parameters:
        raise HiggsTrainerError(
            "adapter_only_checkpoints=True under DeepSpeed needs deepspeed >= 0.18 (load_module_state_dict's "
            "allowed_missing_keys); upgrade deepspeed or keep full checkpoints."
        )
    frozen = {name for name, param in engine.module.named_parameters() if not param.requires_grad}

    def load_module_state_dict(checkpoint: Any, strict: bool = True, *args: Any, **kwargs: Any) -> Any:
        kwargs["allowed_missing_keys"] = frozen | set(kwargs.get("allowed_missing_keys") or ())
        return original(checkpoint, strict, *args, **kwargs)

    setattr(load_module_state_dict, _ALLOWS_MISSING_FROZEN, True)
    engine.load_module_state_dict = load_module_state_dict


def check_accelerate_can_unwrap(model: torch.nn.Module) -> None:
    """Refuse, with the fix, a model whose submodule is ``torch.compile``'d where accelerate cannot unwrap it.

    accelerate up to 1.12 (1.9.0 on the Higgs stack) raises ``KeyError: '_orig_mod'`` in
    ``extract_model_from_parallel`` for a model that is not compiled itself but has a compiled
    submodule (``wrapper.model = torch.compile(wrapper.model)``), and ``Trainer.__init__`` calls it
    (transformers 4.46.3 trainer.py:585, ``self.accelerator.unwrap_model(model)``): accelerate issues
    3683 and 3879, fixed by PR 3881. Feature-detected: a no-op where accelerate has the fix. Can go
    once the Higgs stack's accelerate includes PR 3881.
    """
    from accelerate.utils import extract_model_from_parallel

    try:
        extract_model_from_parallel(model)
    except KeyError as exc:
        if "_orig_mod" not in str(exc):
            raise
        import accelerate

        raise HiggsTrainerError(
            f"accelerate {accelerate.__version__} cannot unwrap a model with a torch.compile'd submodule, so "
            "transformers.Trainer fails on it (KeyError '_orig_mod', accelerate issues 3683/3879): compile the whole "
            "model with TrainingArguments(torch_compile=True) instead, or upgrade accelerate to a release with PR 3881"
        ) from exc


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
        ```python
        if not load_optimizer_and_scheduler_on_cpu(trainer, "out/checkpoint-2"):
            Trainer._load_optimizer_and_scheduler(trainer, "out/checkpoint-2")
        ```
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


def reregister_fsdp1_original_parameters(model: torch.nn.Module) -> int:
    """Register again, as parameters, the original parameters an FSDP1 ``NO_SHARD`` unit left as plain tensors.

    FSDP1 with one process (it switches ``FULL_SHARD`` to ``NO_SHARD``), ``use_orig_params=True`` and
    a unit whose parameters are all frozen (the root of a LoRA fine-tune of a wrapper: embeddings,
    norm and heads): the forward pass swaps that unit's original parameters for plain tensors, and
    since no gradient reaches them, nothing after the backward pass registers them back (the next
    forward's write-back even keeps the tensors as "changed" parameters).
    ``state_dict()`` then misses them and FSDP's own post-state-dict hook raises "FSDP assumes
    model.base_model.model.embed_tokens.weight is in the state_dict" inside ``Trainer.save_model``.
    Seen with torch 2.11 on CUDA (transformers 4.46.3, accelerate 1.9.0) and torch 2.13 on CPU;
    several processes are not affected (the catch-all reshard registers them back). Only touches
    ``NO_SHARD`` handles whose parameters are missing; returns how many units it fixed. Can go once
    accelerate no longer uses FSDP1 (FSDP2 has no flat parameters) or torch registers them back itself.

    Examples:
        ```python
        reregister_fsdp1_original_parameters(trainer.model_wrapped)  # before a state_dict() of the FSDP model
        ```
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    fixed = 0
    for unit in model.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FullyShardedDataParallel) else None
        if handle is None or not handle._use_orig_params or handle.uses_sharded_strategy:
            continue
        flat_param = handle.flat_param
        if all(info.param_name in info.module._parameters for info in flat_param._param_infos):
            continue
        # The next forward's write-back took the plain tensors for user-changed parameters and keeps them in
        # `_params`: make them parameters again (same storage, same requires_grad), then register them.
        for i, param in enumerate(flat_param._params):
            if not isinstance(param, torch.nn.Parameter):
                flat_param._params[i] = torch.nn.Parameter(param, requires_grad=param.requires_grad)
        handle._use_unsharded_views(as_params=True)
        fixed += 1
    return fixed
