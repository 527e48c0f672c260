"""Gather only a PEFT component's adapter parameters from a sharded model.

Under DeepSpeed ZeRO-3 (without ``stage3_gather_16bit_weights_on_model_save``) and FSDP with
a sharded state dict, ``Trainer`` hands ``_save`` no usable weights, and the live parameters
are partitioned: saving them writes empty tensors (peft issue 2892) or crashes. Here only the
adapter's parameters (a few MB) are gathered, never the frozen base model.

Every process must call `gather_adapter_state_dict` (it runs collectives); only the
writer gets the tensors back.
"""

from __future__ import annotations

import logging
from typing import Any

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
    # One walk over the modules, stopping at the first sign (what two walks cost: benchmarks/README.md).
    for sub in module.modules():
        if type(sub).__name__ == "FullyShardedDataParallel":
            return True
        if any(p is not None and (hasattr(p, "ds_id") or _is_dtensor(p)) for p in sub._parameters.values()):
            return True
    return False


def _fsdp1_units(fsdp_root: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The FSDP1 units under ``fsdp_root`` that hold parameters, in the same order on every rank."""
    if fsdp_root is None or not has_fsdp1_units(fsdp_root):
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [unit for unit in FullyShardedDataParallel.fsdp_modules(fsdp_root) if unit._handle is not None]


def _shard_of(unit: torch.nn.Module, param: torch.Tensor, info: Any, shape: torch.Size) -> torch.Tensor:
    """The full ``param`` of an FSDP1 ``unit`` (``use_orig_params=True``), built from every rank's piece of it.

    Collective over the unit's process group. Each rank holds a contiguous slice of the flat
    parameter, so each original parameter lies in at most a few ranks' shards: every rank places its
    piece (``_ShardParamInfo``) into a zero vector of the parameter's size, and a sum gives the whole
    parameter. Only this parameter is moved; the unit's other (frozen) parameters are never unsharded.
    """
    handle = unit._handle
    flat = handle.flat_param
    if not handle.uses_sharded_strategy:  # NO_SHARD: every rank has the whole flat parameter, and param views it
        return param.detach().reshape(shape)
    # On the device FSDP runs its own collectives on (a GPU under NCCL even when the shard is offloaded to the CPU).
    full = torch.zeros(shape.numel(), dtype=flat.dtype, device=getattr(unit, "compute_device", flat.device))
    if info.in_shard:
        local = flat.detach()[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]
        full[info.intra_param_start_idx : info.intra_param_end_idx + 1] = local
    torch.distributed.all_reduce(full, group=unit.process_group)
    return full.view(shape)


def _gather_fsdp1(
    component: LoraComponent, fsdp_root: torch.nn.Module, units: list[torch.nn.Module], is_writer: bool
) -> dict[str, torch.Tensor]:
    """The adapter's parameters of an FSDP1 model, each gathered alone (never a whole unit, never the whole model).

    ``FullyShardedDataParallel.summon_full_params`` on the root would unshard every frozen base weight
    on every rank, as large as the model, to copy a few MB of adapter. With ``use_orig_params=True``
    (what accelerate and PEFT use) the original parameters are known to the flat parameter, and each
    adapter parameter is assembled from the ranks' pieces (`_shard_of`). A unit without original
    parameters (``use_orig_params=False``, where PEFT's ``fsdp_auto_wrap_policy`` gives the trainable
    layers units of their own) is unsharded alone (``recurse=False``), and only if it holds adapter weights.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    prefix = component.path + "." if component.path else ""
    names = {id(param): name for name, param in adapter_parameters(component.model)}
    unit_names = {id(module): name for name, module in fsdp_root.named_modules()}  # the root wraps the whole model
    gathered: dict[str, torch.Tensor] = {}
    for unit in units:
        flat = unit._handle.flat_param
        if flat._params is not None:  # use_orig_params=True
            for param, info, shape in zip(flat._params, flat._shard_param_infos, flat._shapes, strict=True):
                if id(param) in names:
                    full = _shard_of(unit, param, info, shape)
                    if is_writer:
                        gathered[prefix + canonical_name(names[id(param)])] = full.detach().to("cpu", copy=True)
            continue
        unit_name = unit_names[id(unit)]
        wanted = {
            fqn: canonical_name(f"{unit_name}.{fqn}" if unit_name else fqn)
            for fqn in flat._fqns
            if flat.requires_grad or _is_adapter_name(fqn)
        }
        wanted = {fqn: name for fqn, name in wanted.items() if name.startswith(prefix)}
        if not wanted:
            continue
        on_gpu = flat.is_cuda  # offload_to_cpu keeps the gathered copies out of GPU memory
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False, offload_to_cpu=on_gpu):
            if is_writer:
                for fqn, name in wanted.items():
                    gathered[name] = unit.module.get_parameter(fqn).detach().to("cpu", copy=True)
    return gathered


def _is_adapter_name(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def gather_adapter_state_dict(
    component: LoraComponent, is_writer: bool, fsdp_root: torch.nn.Module | None = None
) -> dict[str, torch.Tensor] | None:
    """Full copies (on CPU) of the component's adapter parameters, keyed as in the whole model's state dict.

    Collective: call on every process, in the same order. Returns the dict on the writer and
    ``None`` elsewhere. ``fsdp_root`` is the FSDP1 root module (``trainer.model_wrapped``) when
    there is one; FSDP2 (``fully_shard``) and DeepSpeed need none. Only the adapter's parameters
    are gathered, one at a time: the frozen base weights stay sharded (`_gather_fsdp1`).

    Examples:
        ```python
        # on every process, in the same order (a collective under DeepSpeed ZeRO-3 / FSDP):
        component = find_lora_model(model)
        state = gather_adapter_state_dict(component, is_writer=rank == 0)
        if rank == 0:
            write_lora_adapters(component, out, state_dict=state)
        ```
    """
    units = _fsdp1_units(fsdp_root)
    if units:
        gathered = _gather_fsdp1(component, fsdp_root, units, is_writer)
    else:
        prefix = component.path + "." if component.path else ""
        params = adapter_parameters(component.model)
        gathered = {}
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
