"""Save LoRA adapters correctly when fine-tuning Higgs Audio v2 (or any wrapped PEFT model) with ``transformers.Trainer``.

Examples:
    ```python
    from higgs_trainer import HiggsLoraTrainer

    trainer = HiggsLoraTrainer(model=wrapper, args=training_args, train_dataset=ds)
    trainer.train()  # every checkpoint-N gets a verified lora_adapters/
    ```
"""

from ._version import __version__ as __version__  # re-exported: higgs_trainer.__version__
from .convert import ConvertResult, convert_layout
from .discovery import LoraComponent, find_lora_model
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
from .extraction import ExtractedAdapter, extract_adapter
from .merging import MergeResult, merge_adapter
from .saving import SavedAdapter
from .trainer import HiggsLoraTrainer, LoraAdapterSavingMixin, save_lora_adapters
from .verification import AdapterSummary, inspect_adapter, inspect_path, verify_adapter

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
