"""Rescue a LoRA adapter from a full checkpoint written without one (``higgs-trainer extract``).

Runs made with plain ``Trainer`` on a wrapper saved ``checkpoint-N/model.safetensors`` (the whole
wrapper state dict) and no adapter. Here the LoRA tensors are read from it lazily
(``checkpoint.CheckpointWeights``), renamed to the keys ``PeftModel.from_pretrained`` expects,
written with a ``peft.LoraConfig`` into a staging directory, verified, and renamed into place
(``atomic.staged_directory``). The model is never built.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import save_file

from ..errors import AdapterSaveError, AdapterVerificationError, CheckpointError, first_line, listed
from ..files.atomic import staged_directory
from ..files.checkpoint import CheckpointWeights, LoraLayout, find_lora_layout
from ..files.lora_settings import LoraSettings, find_lora_settings
from ..files.paths import existing_directory, output_directory
from ..files.sizes import human_size
from ..names import CONFIG_NAME, SAFETENSORS_NAME
from ..verification.inspection import verify_adapter
from ..verification.lora_config import configured_rank, lora_config_from_dict
from ..verification.untrained import untrained_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractedAdapter:
    """What `extract_adapter` wrote, and what it inferred.

    Examples:
        ```python
        result = extract_adapter("old_run/checkpoint-500", "rescued", lora_alpha=32)
        result.prefix, result.r, result.lora_alpha, result.alpha_source  # ('model.', 16, 32.0, '--lora-alpha')
        ```
    """

    path: str
    checkpoint: str
    prefix: str
    r: int
    lora_alpha: float
    alpha_source: str
    target_modules: list[str] | str
    num_tensors: int
    num_parameters: int
    num_bytes: int
    checkpoint_bytes: int
    seconds: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)


def _checked_config(layout: LoraLayout, settings: LoraSettings) -> LoraConfig:
    """The ``LoraConfig`` to write: the run's own when one was found (checked against the tensors), else one built from the layout."""
    if settings.config is None:
        extra = {"lora_bias": True} if layout.lora_bias else {}
        return LoraConfig(
            r=layout.r,
            lora_alpha=settings.lora_alpha,
            target_modules=layout.target_modules,
            rank_pattern=layout.rank_pattern,
            lora_dropout=0.0,
            bias="none",
            inference_mode=True,
            modules_to_save=list(layout.modules_to_save) or None,
            **extra,
        )
    try:
        config = lora_config_from_dict(settings.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the adapter config from {settings.source} is not a valid LoraConfig: {exc}") from exc
    config.inference_mode = True
    # Not the old adapter's task_type: the tensors were found under the PEFT component's prefix, and the adapter loads
    # onto that component (e.g. HiggsAudioModel), whose class the checkpoint does not record. A task type such as the
    # community scripts' CAUSAL_LM makes PeftModel.from_pretrained build a PeftModelForCausalLM, which passes labels=
    # the component does not take; None gives the plain PeftModel that fits any component.
    config.task_type = None
    # What the config promises beyond lora_A/lora_B must be in the tensors extract copies, or the adapter loads wrong.
    unsupported = [
        name
        for name, used in (
            ("use_dora", config.use_dora),
            ("trainable_token_indices", getattr(config, "trainable_token_indices", None)),
            (f"bias={config.bias!r} (trained base-layer biases)", config.bias != "none"),
        )
        if used
    ]
    if unsupported:
        raise CheckpointError(
            f"the adapter config from {settings.source} uses {', '.join(unsupported)}, which extract does not carry "
            "over from a full checkpoint (it copies lora_A/lora_B tensors only)"
        )
    _check_modules_to_save(config, layout, settings)
    if bool(getattr(config, "lora_bias", False)) != layout.lora_bias:
        raise CheckpointError(
            f"the adapter config from {settings.source} says lora_bias={getattr(config, 'lora_bias', False)} but the "
            f"checkpoint {'has' if layout.lora_bias else 'has no'} lora_B bias tensors; is it from another run?"
        )
    if config.target_modules != "all-linear":
        untargeted = [m for m in layout.modules if not check_target_module_exists(config, m)]
        extra = sorted(m for m in layout.other_modules if check_target_module_exists(config, m))
        if untargeted or extra:
            raise CheckpointError(
                f"the adapter config from {settings.source} does not match the checkpoint's LoRA modules "
                f"(not targeted: {listed(untargeted) or 'none'}; targeted but without LoRA tensors: {listed(extra) or 'none'}); "
                "is it from another run?"
            )
    wrong_rank = [
        f"{module} (rank {rank}, config {expected})"
        for module, rank in sorted(layout.ranks.items())
        if rank != (expected := configured_rank(config, module))
    ]
    if wrong_rank:
        raise CheckpointError(
            f"the adapter config from {settings.source} gives {len(wrong_rank)} LoRA module(s) another rank than "
            f"their tensors have: {listed(wrong_rank)}; is it from another run?"
        )
    return config


def _check_modules_to_save(config: LoraConfig, layout: LoraLayout, settings: LoraSettings) -> None:
    """The config's ``modules_to_save`` and the trained copies in the checkpoint must agree (peft matches by suffix)."""
    wanted = list(config.modules_to_save or [])
    unlisted = [m for m in layout.modules_to_save if not any(m == w or m.endswith("." + w) for w in wanted)]
    if unlisted or (wanted and not layout.modules_to_save):
        raise CheckpointError(
            f"the adapter config from {settings.source} lists modules_to_save {sorted(wanted)} but the checkpoint "
            f"holds trained copies of {list(layout.modules_to_save) or 'none'}; is it from another run?"
        )


def extract_adapter(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    lora_alpha: float | None = None,
    adapter_config: str | os.PathLike | None = None,
    prefix: str | None = None,
    overwrite: bool = False,
) -> ExtractedAdapter:
    """Write the LoRA adapter held in a full checkpoint's weights as a standard adapter directory at ``output``.

    Reads only the LoRA tensors and the trained copies of ``modules_to_save`` modules (never the
    frozen base weights), infers the wrapper prefix, target
    modules and ``r`` from keys and shapes, and takes ``lora_alpha`` as
    `lora_settings.find_lora_settings` decides (refusing when it is unknown). The result loads
    with ``PeftModel.from_pretrained(base, output)`` with no missing keys; it is verified before it
    is moved into place, and nothing is left behind if anything fails.

    Args:
        checkpoint: a ``checkpoint-N`` directory (or any directory) holding full weights:
            ``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``.
        output: the adapter directory to write (absent or empty, unless ``overwrite``).
        lora_alpha: the ``lora_alpha`` used in training, when the run did not record it.
        adapter_config: the run's ``adapter_config.json`` (or its directory), to take the LoRA
            settings from.
        prefix: the wrapper prefix to take (e.g. ``"model.text_model."``) when several PEFT
            components hold LoRA tensors.
        overwrite: replace ``output`` if it exists and is not empty.

    Raises:
        UsageError: a path does not exist, ``output`` is not empty (without ``overwrite``),
            ``lora_alpha`` is unknown or contradicted, or ``prefix`` is needed.
        CheckpointError: not a checkpoint, unreadable weights, no or broken LoRA tensors.
        AdapterSaveError: writing failed (disk full); nothing was written.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> wrapper = torch.nn.Module()
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        >>> from pathlib import Path
        >>> Path("old_run/checkpoint-500").mkdir(parents=True)
        >>> save_file(wrapper.state_dict(), "old_run/checkpoint-500/model.safetensors")  # what Trainer writes for a wrapper
        >>> extract_adapter("old_run/checkpoint-500", "rescued", lora_alpha=32)
        ExtractedAdapter(path='rescued', checkpoint='old_run/checkpoint-500', prefix='model.', r=2, ...)
    """
    start = time.perf_counter()
    checkpoint = existing_directory(checkpoint, "checkpoint")
    config_file = Path(adapter_config) if adapter_config else None
    if config_file is not None and config_file.is_dir():
        config_file = config_file / CONFIG_NAME  # the file read: an output beside it leaves it alone
    output = output_directory(output, overwrite, inputs=[checkpoint, *([config_file] if config_file else [])])
    with CheckpointWeights(checkpoint) as weights:
        layout = find_lora_layout(weights.shapes, prefix)
        settings = find_lora_settings(checkpoint, lora_alpha, adapter_config)
        config = _checked_config(layout, settings)
        checkpoint_bytes = weights.num_bytes
        logger.info(
            "Found %d LoRA tensors under prefix %r in %s (%s): r=%d, lora_alpha=%s from %s",
            len(layout.keys),
            layout.prefix,
            checkpoint,
            human_size(checkpoint_bytes),
            layout.r,
            settings.lora_alpha,
            settings.source,
        )
        tensors = {layout.keys[key]: value for key, value in weights.read(layout.keys).items()}
    tensors = {key: value.contiguous() for key, value in sorted(tensors.items())}
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        with staged_directory(output) as staging:
            save_file(tensors, str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
            untrained = untrained_problem(config.to_dict(), tensors)
            tensors.clear()  # the verification reads the file back: one copy of the adapter in memory at a time
            config.save_pretrained(str(staging))
            summary = verify_adapter(staging, layout.shapes)
    except AdapterVerificationError as exc:  # a bug here, not bad input: the tensors were checked above
        raise AdapterVerificationError(f"{exc} (nothing written to {output})") from exc
    except OSError as exc:
        raise AdapterSaveError(f"writing the adapter to {output} failed: {first_line(exc)} (nothing written)") from exc
    targets = config.target_modules
    result = ExtractedAdapter(
        path=str(output),
        checkpoint=str(checkpoint),
        prefix=layout.prefix,
        r=layout.r,
        lora_alpha=settings.lora_alpha,
        alpha_source=settings.source,
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        num_tensors=summary.num_tensors,
        num_parameters=summary.num_parameters,
        num_bytes=num_bytes,
        checkpoint_bytes=checkpoint_bytes,
        seconds=time.perf_counter() - start,
        rank_pattern=dict(layout.rank_pattern),
        modules_to_save=list(layout.modules_to_save),
    )
    logger.info("Wrote adapter to %s (%d tensors, %s)", output, result.num_tensors, human_size(result.num_bytes))
    if untrained is not None:  # rescued as it is; `verify` fails it and `merge` refuses it
        logger.warning("the adapter extracted to %s is %s", output, untrained)
    return result


__all__ = ["ExtractedAdapter", "extract_adapter"]
