"""What a merge wrote: `MergeResult`, and the record of it in ``merge_info.json``."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import transformers

from .._version import __version__


@dataclass
class MergeResult:
    """What `merge_adapter` wrote.

    Examples:
        ```python
        result = merge_adapter("higgs-audio-v2-base", "out/lora_adapters", "merged")
        result.model_class, result.dtype, result.merged_modules  # ('HiggsAudioModel', 'bfloat16', 196)
        ```
    """

    path: str
    base: str
    adapter: str
    model_class: str
    dtype: str
    merged_modules: int
    num_parameters: int
    num_bytes: int
    copied_files: list[str]
    seconds: float
    compare: dict | None = None
    modules_to_save: list[str] = field(default_factory=list)  # modules replaced by their trained copies
    method: str = "in-memory"


def merge_info(
    base_dir: Path,
    adapter_dir: Path,
    config: dict,
    method: str,
    model_class: str | None,
    dtype_name: str,
    merged_modules: int,
    modules_to_save: list[str],
) -> dict:
    """What ``merge_info.json`` records of a merge (``compare`` is filled in when the outputs were compared).

    Examples:
        >>> merge_info(Path("base"), Path("adapter"), {"r": 4}, "streaming", None, "bfloat16", 2, [])["adapter_config"]
        {'r': 4, 'lora_alpha': None, 'target_modules': None, 'use_rslora': None}
    """
    return {
        "base": str(base_dir.resolve()),
        "adapter": str(adapter_dir.resolve()),
        "model_class": model_class,
        "dtype": dtype_name,
        "method": method,
        "adapter_config": {k: config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora")},
        "merged_modules": merged_modules,
        "modules_to_save": modules_to_save,
        "merged_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "compare": None,
    }


def _versions() -> dict[str, str]:
    return {
        "higgs_trainer": __version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
    }
