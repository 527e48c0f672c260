"""Merge a LoRA adapter into its base model and save the result (``higgs-trainer merge``): the entry point.

What the community ``merger.py`` does, done safely. `merge_adapter` checks the paths and the adapter
(verified, trained), then merges a safetensors base tensor by tensor (`streaming`) or loads the base
in its own dtype and merges with peft (`in_memory`). Either way the result is written into a
staging directory and renamed into place with the base's tokenizer and generation config files and
a ``merge_info.json``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

from ..errors import (
    AdapterVerificationError,
    UsageError,
)
from ..files.paths import (
    existing_directory,
    output_directory,
    read_adapter_config,
    read_adapter_tensors,
)
from ..files.runs import resolve_adapter_dir
from ..files.safetensors_files import read_stored_tensors, safetensors_weight_files
from ..files.sizes import parse_size
from ..names import DTYPE_NAMES
from ..verification.inspection import verify_adapter
from ..verification.untrained import untrained_problem
from .base_model import check_base_complete
from .in_memory import merge_in_memory
from .plan import IN_MEMORY
from .result import MergeResult
from .streaming import stream_merge

logger = logging.getLogger(__name__)

DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    compare: bool = False,
    overwrite: bool = False,
    allow_untrained: bool = False,
    streaming: bool | None = None,
    max_shard_size: int | str | None = None,
) -> MergeResult:
    """Merge the LoRA adapter at ``adapter`` into the model at ``base`` and save the merged model at ``output``.

    ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``) overrides the dtype the base
    was saved in. With ``compare``, the logits of base, adapter and merged model on a probe input
    are compared and recorded in ``merge_info.json``. An adapter that never trained (every ``lora_B`` still
    at peft's zero init, `untrained.untrained_problem`) is refused unless ``allow_untrained``.

    A safetensors base is merged tensor by tensor without building the model
    (`streaming.stream_merge`, sharded at ``max_shard_size``) unless ``streaming=False``;
    a ``pytorch_model.bin`` base, or ``streaming=False``, loads the model and merges with peft's
    ``merge_and_unload`` in memory.

    Args:
        base: the base model directory (``config.json`` and its weights).
        adapter: the adapter directory, or a checkpoint or run directory (its ``lora_adapters``).
        output: the directory to write the merged model to (absent or empty, unless ``overwrite``).
        dtype: save in this dtype (``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``); default
            the base's own.
        compare: compare the logits of base, adapter and merged model on a probe input and record
            them in ``merge_info.json`` and the result.
        overwrite: replace ``output`` if it exists and is not empty.
        allow_untrained: merge even an adapter whose ``lora_B`` are all still at peft's zero init.
        streaming: True merges tensor by tensor (a safetensors base is required), False in memory
            with peft; None (the default) streams whenever the base has safetensors weights.
        max_shard_size: the largest weight file of the output (bytes, or a size like ``"5GB"``);
            default that of the installed transformers' ``save_pretrained``.

    Raises:
        UsageError: a path does not exist, ``output`` is not empty (without ``overwrite``), ``dtype``
            is not one of ``bf16``, ``fp16``, ``fp32``, or ``max_shard_size`` is not a size.
        HiggsTrainerError: the base is a ``higgs_audio`` model and ``boson_multimodal`` cannot be imported.
        AdapterVerificationError: the adapter is broken or does not fit the base model.
        CheckpointError: the base model cannot be read or loaded.
        MergeError: merging or writing failed; nothing was written.

    Examples:
        >>> import transformers
        >>> from peft import LoraConfig, get_peft_model
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> transformers.LlamaForCausalLM(config).save_pretrained("base")
        >>> lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # as if trained
        >>> get_peft_model(transformers.LlamaForCausalLM(config), lora).save_pretrained("out/lora_adapters")
        >>> result = merge_adapter("base", "out/lora_adapters", "merged", compare=True)
        >>> result.model_class, result.dtype, result.merged_modules
        ('LlamaForCausalLM', 'float32', 2)
        >>> result.compare["adapter_vs_merged"]["max_abs"] < 1e-4 < result.compare["base_vs_merged"]["max_abs"]
        True
    """
    start = time.perf_counter()
    base_dir = existing_directory(base, "base model")
    adapter_dir = resolve_adapter_dir(adapter)
    output = output_directory(output, overwrite, inputs=[base_dir, adapter_dir])
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    dtype = _torch_dtype(dtype)
    config, tensors = _read_mergeable_adapter(adapter_dir, allow_untrained)
    # A safetensors base's headers are checked on both paths (what safetensors' loader refuses, a tensor stored twice).
    files = safetensors_weight_files(base_dir)
    stored = read_stored_tensors(base_dir, files, "the base model") if files else None
    if stored is not None and streaming is not False:
        return stream_merge(
            base_dir,
            adapter_dir,
            output,
            files,
            config=config,
            tensors=tensors,
            stored=stored,
            dtype=dtype,
            compare=compare,
            max_shard_size=shard_bytes,
            check=functools.partial(check_base_complete, base_dir, list(stored)),
        )
    if streaming:
        raise UsageError(f"{base_dir} has no safetensors weights, which the streaming merge reads; {IN_MEMORY}")
    logger.info("Merging in memory (%s)", "asked for" if streaming is False else "the base has no safetensors weights")
    return merge_in_memory(
        base_dir,
        adapter_dir,
        output,
        config=config,
        tensors=tensors,
        stored=stored,
        dtype=dtype,
        compare=compare,
        max_shard_size=shard_bytes,
        started=start,
    )


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` as a ``torch.dtype``; a ``torch.dtype`` or None as it is."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype


def _read_mergeable_adapter(adapter_dir: Path, allow_untrained: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The verified adapter's config and tensors; an untrained one is refused unless ``allow_untrained`` (both paths)."""
    verify_adapter(adapter_dir)
    config, tensors = read_adapter_config(adapter_dir), read_adapter_tensors(adapter_dir)
    untrained = untrained_problem(config, tensors)
    if untrained is not None:
        if not allow_untrained:
            raise AdapterVerificationError(
                f"refusing to merge the adapter at {adapter_dir}: {untrained}. Pass --allow-untrained "
                "(allow_untrained=True) to merge it anyway."
            )
        logger.warning("merging the adapter at %s anyway (allow_untrained): %s", adapter_dir, untrained)
    return config, tensors


__all__ = [
    "DTYPES",
    "merge_adapter",
]
