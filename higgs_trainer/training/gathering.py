"""Gather only a PEFT component's adapter parameters from a sharded model.

Under DeepSpeed ZeRO-3 (without ``stage3_gather_16bit_weights_on_model_save``) and FSDP with
a sharded state dict, ``Trainer`` hands ``_save`` no usable weights, and the live parameters
are partitioned: saving them writes empty tensors (peft issue 2892) or crashes. Here only the
adapter's parameters (a few MB) are gathered, never the frozen base model.

Every process must call `gather_adapter_state_dict` (it runs collectives); only the
writer gets the tensors back.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from peft import PeftModel

from .discovery import LoraComponent, canonical_name

logger = logging.getLogger(__name__)


def adapter_parameters(peft_model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an adapter file can hold: trainable ones and every ``lora_`` / ``modules_to_save`` one.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> [name for name, _ in adapter_parameters(get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])))]
        ['base_model.model.q_proj.lora_A.default.weight', 'base_model.model.q_proj.lora_B.default.weight']
    """
    return [
        (name, param)
        for name, param in peft_model.named_parameters()
        if param.requires_grad or "lora_" in name or "modules_to_save" in name
    ]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def has_fsdp1_units(module: torch.nn.Module) -> bool:
    """True when ``module`` holds FSDP1 (``FullyShardedDataParallel``) units, whose ``state_dict()`` is a collective.

    Examples:
        >>> has_fsdp1_units(torch.nn.Linear(2, 2))
        False
    """
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())


def is_sharded(module: torch.nn.Module) -> bool:
    """True when any parameter of ``module`` is partitioned (DeepSpeed ZeRO-3, FSDP2 DTensor) or FSDP1-wrapped.

    Examples:
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    # One walk over the modules, stopping at the first sign (two walks took about 27 ms a save at 1.2e9 parameters).
    for sub in module.modules():
        if type(sub).__name__ == "FullyShardedDataParallel":
            return True
        if any(p is not None and (hasattr(p, "ds_id") or _is_dtensor(p)) for p in sub._parameters.values()):
            return True
    return False


def _fsdp1_full_params(fsdp_root: torch.nn.Module | None) -> contextlib.AbstractContextManager:
    if fsdp_root is not None and type(fsdp_root).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel

        # offload_to_cpu keeps the gathered copies out of GPU memory; on CPU there is nothing to offload to.
        on_gpu = any(p.is_cuda for p in fsdp_root.parameters())
        return FullyShardedDataParallel.summon_full_params(fsdp_root, writeback=False, offload_to_cpu=on_gpu)
    return contextlib.nullcontext()


def gather_adapter_state_dict(
    component: LoraComponent, is_writer: bool, fsdp_root: torch.nn.Module | None = None
) -> dict[str, torch.Tensor] | None:
    """Full copies (on CPU) of the component's adapter parameters, keyed as in the whole model's state dict.

    Collective: call on every process, in the same order. Returns the dict on the writer and
    ``None`` elsewhere. ``fsdp_root`` is the FSDP1 root module (``trainer.model_wrapped``) when
    there is one; FSDP2 (``fully_shard``) and DeepSpeed need none.

    Examples:
        ```python
        # on every process, in the same order (a collective under DeepSpeed ZeRO-3 / FSDP):
        component = find_lora_model(model)
        state = gather_adapter_state_dict(component, is_writer=rank == 0)
        if rank == 0:
            write_lora_adapters(component, out, state_dict=state)
        ```
    """
    prefix = component.path + "." if component.path else ""
    with _fsdp1_full_params(fsdp_root):
        params = adapter_parameters(component.model)
        gathered: dict[str, torch.Tensor] = {}
        if any(hasattr(p, "ds_id") for _, p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if is_writer:
                    gathered = {prefix + canonical_name(n): p.detach().to("cpu", copy=True) for n, p in params}
        else:
            for name, param in params:
                full = param.full_tensor() if _is_dtensor(param) else param  # full_tensor() is a collective
                if is_writer:
                    gathered[prefix + canonical_name(name)] = full.detach().to("cpu", copy=True)
    if is_writer:
        logger.debug("gathered %d adapter tensors of %s", len(gathered), component.display_path)
        return gathered
    return None
