"""Convert adapters and models between boson_multimodal's and transformers' Higgs Audio v2 layouts.

``convert_layout(SRC, to, OUTPUT)`` takes an adapter directory, a run or checkpoint directory (each
``lora_adapters`` in it), or a full model directory (safetensors, sharded or not) and writes the
same thing in the other layout (`layouts` holds the key table and the config mapping). It refuses
what has no equivalent, never drops a tensor silently, reads one tensor at a time, writes the
whole output atomically, and checks the result before it is put in place: a converted model has
exactly the weights its converted config implies; a converted adapter's modules are the ones its
converted ``adapter_config.json`` selects, and with ``base`` peft itself finds zero missing and
zero unexpected adapter keys on that base.

Examples:
    ```python
    convert_layout("run/lora_adapters", "transformers", "adapter-hf")  # ConvertResult(kind='adapter', ...)
    PeftModel.from_pretrained(HiggsAudioV2ForConditionalGeneration.from_pretrained("base-hf"), "adapter-hf")
    ```
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..errors import AdapterVerificationError, CheckpointError, HiggsTrainerError, UsageError, first_line
from ..files.atomic import staged_directory
from ..files.paths import (
    existing_directory,
    output_directory,
    read_json_object,
)
from ..files.runs import adapter_dirs_of, holds_adapter_files
from ..names import FULL_WEIGHT_FILES
from .adapter import build_empty_model, convert_adapter
from .keys import LAYOUTS, MODEL_TYPES
from .model import convert_model
from .result import ConvertResult

logger = logging.getLogger(__name__)


def convert_layout(
    source: str | os.PathLike,
    to: str,
    output: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert ``source`` (adapter, run/checkpoint, or full model directory) to layout ``to`` into ``output``.

    ``to`` is ``"transformers"`` (``HiggsAudioV2ForConditionalGeneration``) or ``"boson"``
    (``HiggsAudioModel``). With ``base`` (a model directory of either layout), converted adapters
    are also loaded by peft onto that model, built empty from its config, and must show zero
    missing and zero unexpected adapter keys.

    Args:
        source: an adapter directory, a run or checkpoint directory (each ``lora_adapters`` in it),
            or a full Higgs model directory (safetensors, sharded or not).
        to: the layout to write, ``"transformers"`` or ``"boson"``.
        output: the directory to write (absent or empty, unless ``overwrite``).
        base: a model directory of either layout to load the converted adapters onto, as a check.
        overwrite: replace ``output`` if it exists and is not empty.

    Examples:
        ```python
        convert_layout("out", "transformers", "out-hf").outputs
        # ['out-hf/lora_adapters', 'out-hf/checkpoint-2/lora_adapters']
        ```
    """
    started = time.perf_counter()
    if to not in LAYOUTS:
        raise UsageError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    source = existing_directory(source, "source")
    base = existing_directory(base, "base model") if base is not None else None
    output = output_directory(output, overwrite, inputs=[source] + ([base] if base else []))
    is_model = _is_model_dir(source)
    if is_model and base is not None:
        raise UsageError("--base checks converted adapters; converting a model needs none (leave it out)")
    base_model = build_empty_model(base, to) if base is not None else None
    result = ConvertResult(source=str(source), path=str(output), to=to, kind="", outputs=[], num_tensors=0, renamed=0)
    try:
        with staged_directory(output) as staging:
            if is_model:
                result.kind = "model"
                convert_model(source, staging, to, result)
                result.outputs = [str(output)]
            else:
                adapters = _adapter_dirs(source)
                result.kind = "adapter" if adapters == [source] else "adapters"
                for directory in adapters:
                    relative = directory.relative_to(source)
                    convert_adapter(directory, staging / relative, to, result, base_model)
                    result.outputs.append(str(output / relative))
    except OSError as exc:  # a full disk: say where (the OSError of a write names no file)
        raise HiggsTrainerError(f"writing {output} failed: {first_line(exc)} (nothing written)") from exc
    result.verified_on_base = base_model is not None
    result.seconds = time.perf_counter() - started
    logger.info("Converted %s to the %s layout in %s", source, to, output)
    return result


# what the source is


def _is_model_dir(directory: Path) -> bool:
    """A full model: config.json and model weights (a run or checkpoint directory has neither at its root)."""
    if holds_adapter_files(directory) or not (directory / "config.json").is_file():
        return False
    if not any((directory / name).is_file() for name in FULL_WEIGHT_FILES):
        return False
    config = read_json_object(directory / "config.json", CheckpointError)
    if config.get("model_type") not in MODEL_TYPES.values():
        raise CheckpointError(
            f"{directory} holds a {config.get('model_type')!r} model, not a Higgs Audio one "
            f"({' or '.join(MODEL_TYPES.values())}); only those convert"
        )
    return True


def _adapter_dirs(source: Path) -> list[Path]:
    try:
        directories = adapter_dirs_of(source)
    except AdapterVerificationError as exc:
        raise CheckpointError(f"{exc}; convert takes an adapter, checkpoint, run or model directory") from exc
    missing = [d for d in directories if not holds_adapter_files(d)]
    if missing:
        raise CheckpointError(
            f"{missing[0]} holds no adapter ({len(missing)} of {len(directories)} in {source}); rescue a checkpoint "
            f"saved without one with `higgs-trainer extract {missing[0].parent} --output DIR` first (nothing written)"
        )
    return directories


__all__ = ["convert_layout"]
