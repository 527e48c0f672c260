"""Merge a LoRA adapter into its base model and save the result (``higgs-trainer merge``).

What the community ``merger.py`` does, done safely: the base loads in its own dtype (no float32
upcast), through ``boson_multimodal``'s ``HiggsAudioModel`` for a ``higgs_audio`` config (imported
only then) and through transformers otherwise; the adapter is checked against the base's modules
before any weight is loaded and after it is applied (every adapter key must have landed);
``merge_and_unload`` merges in place, so peak memory stays near one copy of the model; the result
is written in safetensors into a staging directory and renamed into place with the base's
tokenizer and generation config files and a ``merge_info.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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
    UsageError,
    first_line,
)
from ..files.atomic import staged_directory
from ..files.checkpoint import CheckpointWeights
from ..files.paths import (
    existing_directory,
    output_directory,
    read_adapter_config,
    read_adapter_tensors,
    resolve_adapter_dir,
)
from ..files.safetensors_files import StoredTensor, read_stored_tensors, safetensors_weight_files
from ..files.sizes import parse_size
from ..files.support_files import copy_support_files
from ..lora_keys import split_lora_key
from ..names import DTYPE_NAMES, PEFT_KEY_PREFIX
from ..verification.checks import (
    check_adapter_modules,
    human_size,
    saved_modules,
    verify_adapter,
)
from ..verification.untrained import untrained_problem
from .base_model import check_base_complete, empty_base_model, load_base_model, model_class_for
from .compare import logit_difference, probe_inputs, probe_logits
from .plan import IN_MEMORY, check_floating_targets, lora_target_weights
from .result import MergeResult, merge_info
from .streaming import stream_merge

logger = logging.getLogger(__name__)

DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))


# checks


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
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]

    verify_adapter(adapter_dir)
    config, tensors = read_adapter_config(adapter_dir), read_adapter_tensors(adapter_dir)
    untrained = untrained_problem(config, tensors)  # both paths refuse it
    if untrained is not None:
        if not allow_untrained:
            raise AdapterVerificationError(
                f"refusing to merge the adapter at {adapter_dir}: {untrained}. Pass --allow-untrained "
                "(allow_untrained=True) to merge it anyway."
            )
        logger.warning("merging the adapter at %s anyway (allow_untrained): %s", adapter_dir, untrained)
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
    problems = check_adapter_modules(tensors, empty_base_model(base_dir))
    if problems:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model at {base_dir}: " + "; ".join(problems)
        )

    check_floating_targets(_stored_dtypes(base_dir, stored), lora_target_weights(tensors), base_dir)
    logger.info("Loading the base model from %s", base_dir)
    model = load_base_model(base_dir, dtype)
    model_class = type(model).__name__
    probe = probe_inputs(model.config) if compare else None
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
    del model, peft_model

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
    try:
        with staged_directory(output) as staging:
            save_pretrained_safetensors(merged, staging, shard_bytes)
            copied = copy_support_files(base_dir, staging)
            (staging / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
            num_bytes = sum(f.stat().st_size for f in staging.iterdir() if f.suffix == ".safetensors")
    except (HiggsTrainerError, *PROGRAMMING_ERRORS):
        raise
    except Exception as exc:  # OSError (a full disk), safetensors' and torch's errors
        raise MergeError(f"writing the merged model to {output} failed: {first_line(exc)} (nothing written)") from exc
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
        seconds=time.perf_counter() - start,
        compare=comparison,
        modules_to_save=saved,
    )
    logger.info("Merged model written to %s (%s)", output, human_size(num_bytes))
    return result


__all__ = [
    "DTYPES",
    "MergeResult",
    "empty_base_model",
    "load_base_model",
    "merge_adapter",
    "model_class_for",
    "probe_inputs",
    "resolve_adapter_dir",
]
