"""Save LoRA adapters correctly when fine-tuning Higgs Audio v2 (or any wrapped PEFT model) with ``transformers.Trainer``.

Importing the package is cheap: each public name is imported from its module on first use
(PEP 562), so ``higgs-trainer --help`` and ``import higgs_trainer.errors`` load neither torch nor
transformers.

Examples:
    ```python
    from higgs_trainer import HiggsLoraTrainer

    trainer = HiggsLoraTrainer(model=wrapper, args=training_args, train_dataset=ds)
    trainer.train()  # every checkpoint-N gets a verified lora_adapters/
    ```
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__  # re-exported: higgs_trainer.__version__

# Each public name and the module (under higgs_trainer) that defines it.
_PUBLIC_NAMES = {
    "AdapterSaveError": "errors",
    "AdapterSummary": "verification.inspection",
    "AdapterVerificationError": "errors",
    "AmbiguousLoraModelError": "errors",
    "CheckpointError": "errors",
    "ConvertResult": "convert.result",
    "ExtractedAdapter": "extract.extraction",
    "HiggsLoraTrainer": "training.trainer",
    "HiggsTrainerError": "errors",
    "LoraAdapterSavingMixin": "training.trainer",
    "LoraComponent": "training.discovery",
    "LoraModelNotFoundError": "errors",
    "MergeError": "errors",
    "MergeResult": "merge.result",
    "SavedAdapter": "training.saving",
    "UsageError": "errors",
    "convert_layout": "convert.conversion",
    "extract_adapter": "extract.extraction",
    "find_lora_model": "training.discovery",
    "inspect_adapter": "verification.inspection",
    "inspect_path": "verification.inspection",
    "merge_adapter": "merge.merging",
    "save_lora_adapters": "training.trainer",
    "verify_adapter": "verification.inspection",
}

# Written out, not computed, so that linters and mkdocstrings read it without running the module.
__all__ = [
    "AdapterSaveError",
    "AdapterSummary",
    "AdapterVerificationError",
    "AmbiguousLoraModelError",
    "CheckpointError",
    "ConvertResult",
    "ExtractedAdapter",
    "HiggsLoraTrainer",
    "HiggsTrainerError",
    "LoraAdapterSavingMixin",
    "LoraComponent",
    "LoraModelNotFoundError",
    "MergeError",
    "MergeResult",
    "SavedAdapter",
    "UsageError",
    "convert_layout",
    "extract_adapter",
    "find_lora_model",
    "inspect_adapter",
    "inspect_path",
    "merge_adapter",
    "save_lora_adapters",
    "verify_adapter",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .convert.conversion import convert_layout
    from .convert.result import ConvertResult
    from .errors import (
        AdapterSaveError,
        AdapterVerificationError,
        AmbiguousLoraModelError,
        CheckpointError,
        HiggsTrainerError,
        LoraModelNotFoundError,
        MergeError,
        UsageError,
    )
    from .extract.extraction import ExtractedAdapter, extract_adapter
    from .merge.merging import merge_adapter
    from .merge.result import MergeResult
    from .training.discovery import LoraComponent, find_lora_model
    from .training.saving import SavedAdapter
    from .training.trainer import HiggsLoraTrainer, LoraAdapterSavingMixin, save_lora_adapters
    from .verification.inspection import AdapterSummary, inspect_adapter, inspect_path, verify_adapter


def __getattr__(name: str) -> Any:
    module = _PUBLIC_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # imported once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC_NAMES})
