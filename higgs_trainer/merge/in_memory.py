"""Merge an adapter with peft in memory: the base loaded in its own dtype, ``merge_and_unload`` in place.

The path `merge_adapter` takes for a ``pytorch_model.bin`` base or ``streaming=False``: the adapter is
checked against the base's modules before any weight is loaded and after peft applied it (every
adapter key must have landed); ``merge_and_unload`` merges in place, so peak memory stays near one
copy of the model; the result is written in safetensors through a staging directory.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from .._compat import save_pretrained_safetensors
from ..errors import (
    PROGRAMMING_ERRORS,
    AdapterVerificationError,
    CheckpointError,
    HiggsTrainerError,
    MergeError,
    first_line,
)
from ..files.atomic import staged_directory
from ..files.checkpoint import CheckpointWeights
from ..files.safetensors_files import StoredTensor
from ..files.sizes import human_size
from ..files.support_files import copy_support_files
from ..lora_keys import split_lora_key
from ..names import PEFT_KEY_PREFIX
from ..verification.base_model import check_adapter_modules
from ..verification.modules_to_save import saved_modules
from .base_model import empty_base_model, load_base_model
from .compare import logit_difference, probe_inputs, probe_logits
from .plan import check_floating_targets, lora_target_weights
from .result import MergeResult, merge_info

logger = logging.getLogger(__name__)


def merge_in_memory(
    base_dir: Path,
    adapter_dir: Path,
    output: Path,
    *,
    config: dict,
    tensors: dict[str, torch.Tensor],
    stored: Mapping[str, StoredTensor] | None,
    dtype: torch.dtype | None,
    compare: bool,
    max_shard_size: int | None,
    started: float,
) -> MergeResult:
    """Merge the adapter at ``adapter_dir`` into the model at ``base_dir`` with peft and write ``output``.

    Called by `merging.merge_adapter` after it checked the paths and the adapter; ``config`` and
    ``tensors`` are the adapter's, ``stored`` the base's safetensors tensors (None for a pickle),
    ``started`` when the merge began (for the result's ``seconds``).

    Examples:
        ```python
        merge_adapter("base", "out/lora_adapters", "merged", streaming=False).method  # 'in-memory'
        ```
    """
    _check_fits(base_dir, adapter_dir, tensors, stored)
    logger.info("Loading the base model from %s", base_dir)
    model = load_base_model(base_dir, dtype)
    model_class = type(model).__name__
    probe = probe_inputs(model.config) if compare else None
    merged, merged_modules, saved, logits = _apply_and_merge(model, base_dir, adapter_dir, config, tensors, probe)
    del model

    comparison = None
    if logits:
        comparison = {
            "probe_tokens": probe["input_ids"].shape[1],
            "base_vs_merged": logit_difference(logits["base"], logits["merged"]),
            "adapter_vs_merged": logit_difference(logits["adapter"], logits["merged"]),
        }
    dtype_name = _dtype_name(merged)
    num_parameters = sum(p.numel() for p in merged.parameters())
    info = merge_info(base_dir, adapter_dir, config, "in-memory", model_class, dtype_name, merged_modules, saved)
    info["compare"] = comparison
    logger.info("Writing the merged model (%s, %s) to %s", model_class, dtype_name, output)
    copied, num_bytes = _write_merged(merged, base_dir, output, info, max_shard_size)
    result = MergeResult(
        path=str(output),
        base=str(base_dir),
        adapter=str(adapter_dir),
        model_class=model_class,
        dtype=dtype_name,
        merged_modules=merged_modules,
        num_parameters=num_parameters,
        num_bytes=num_bytes,
        copied_files=copied,
        seconds=time.perf_counter() - started,
        compare=comparison,
        modules_to_save=saved,
    )
    logger.info("Merged model written to %s (%s)", output, human_size(num_bytes))
    return result


def _check_fits(
    base_dir: Path, adapter_dir: Path, tensors: dict[str, torch.Tensor], stored: Mapping[str, StoredTensor] | None
) -> None:
    """Before any weight is loaded: the adapter's modules are in the base, with matching sizes, on float weights."""
    problems = check_adapter_modules(tensors, empty_base_model(base_dir))
    if problems:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model at {base_dir}: " + "; ".join(problems)
        )

    check_floating_targets(_stored_dtypes(base_dir, stored), lora_target_weights(tensors), base_dir)


def _apply_and_merge(
    model: torch.nn.Module,
    base_dir: Path,
    adapter_dir: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    probe: dict[str, torch.Tensor] | None,
) -> tuple[torch.nn.Module, int, list[str], dict[str, torch.Tensor]]:
    """``(merged model, merged modules, modules_to_save, logits)``: the adapter applied by peft, checked, merged in place."""
    logits: dict[str, torch.Tensor] = {}
    try:
        if probe is not None:
            logits["base"] = probe_logits(model, probe)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, targets not found
            raise AdapterVerificationError(
                f"the adapter at {adapter_dir} does not fit the base model at {base_dir}: {first_line(exc)}"
            ) from exc
        _check_applied(peft_model, tensors, adapter_dir)
        merged_modules = sum(1 for lora in map(split_lora_key, tensors) if lora is not None and lora.is_a)
        saved, _ = saved_modules(config, tensors)
        if probe is not None:
            logits["adapter"] = probe_logits(peft_model, probe)
        # In place (safe_merge=False): safe_merge clones every merged weight, a second copy of most of the model.
        merged = peft_model.merge_and_unload(progressbar=sys.stderr.isatty(), safe_merge=False)
        _check_finite(merged, tensors)
        if probe is not None:
            logits["merged"] = probe_logits(merged, probe)
    except HiggsTrainerError:
        raise
    except Exception as exc:
        raise MergeError(f"merging the adapter at {adapter_dir} into {base_dir} failed: {first_line(exc)}") from exc
    del peft_model
    return merged, merged_modules, saved, logits


def _write_merged(
    merged: torch.nn.Module, base_dir: Path, output: Path, info: dict, max_shard_size: int | None
) -> tuple[list[str], int]:
    """Write the merged model, the base's support files and ``merge_info.json`` to ``output`` at once; ``(copied, bytes)``."""
    try:
        with staged_directory(output) as staging:
            save_pretrained_safetensors(merged, staging, max_shard_size)
            copied = copy_support_files(base_dir, staging)
            (staging / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
            num_bytes = sum(f.stat().st_size for f in staging.iterdir() if f.suffix == ".safetensors")
    except (HiggsTrainerError, *PROGRAMMING_ERRORS):
        raise
    except Exception as exc:  # OSError (a full disk), safetensors' and torch's errors
        raise MergeError(f"writing the merged model to {output} failed: {first_line(exc)} (nothing written)") from exc
    return copied, num_bytes


def _stored_dtypes(base_dir: Path, stored: Mapping[str, StoredTensor] | None) -> dict[str, torch.dtype]:
    """The dtype of each tensor in the base's weight files, as saved (before any loader casts it); {} without weights."""
    if stored is not None:
        return {name: tensor.torch_dtype for name, tensor in stored.items()}
    try:
        with CheckpointWeights(base_dir) as weights:  # a pickle is memory-mapped: nothing is copied
            return weights.dtypes
    except CheckpointError:  # no weights: loading the base says so
        return {}


def _check_applied(peft_model: PeftModel, tensors: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Every tensor of the adapter file landed in a LoRA module, and every LoRA module got one.

    Embedding weights that peft saves beside the LoRA tensors (``save_embedding_layers``, for a
    targeted or resized embedding) are loaded into the base too, so they count as landed.
    """
    applied = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    try:
        embeddings = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True)) - applied
    except (NotImplementedError, AttributeError, ValueError):  # a model without get_input_embeddings (HiggsAudioModel)
        embeddings = set()
    unexpected, missing = sorted(set(tensors) - applied - embeddings), sorted(applied - set(tensors))
    if unexpected or missing:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model: {len(unexpected)} adapter tensor(s) matched no "
            f"module {unexpected[:3]}, {len(missing)} LoRA module(s) got no tensor {missing[:3]}"
        )


def _check_finite(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The merged weights hold no NaN or inf (what peft's safe_merge checks, without its copy of every weight)."""
    names = {lora.module[len(PEFT_KEY_PREFIX) :] for lora in map(split_lora_key, tensors) if lora is not None}
    modules = dict(model.named_modules())
    broken = [n for n in sorted(names) if n in modules and not bool(torch.isfinite(modules[n].weight).all())]
    if broken:
        raise MergeError(
            f"merged weights of {len(broken)} module(s) hold NaN or inf (adapter too large for the dtype?): {broken[:3]}"
        )


# writing


def _dtype_name(model: torch.nn.Module) -> str:
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return str(max(counts, key=counts.get)).replace("torch.", "") if counts else "unknown"


__all__ = ["merge_in_memory"]
