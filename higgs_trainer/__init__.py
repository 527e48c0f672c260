"""Save LoRA adapters correctly when fine-tuning Higgs Audio v2 (or any wrapped PEFT model) with ``transformers.Trainer``.

Examples:
    >>> from higgs_trainer import HiggsLoraTrainer
    >>> trainer = HiggsLoraTrainer(model=wrapper, args=training_args, train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()  # every checkpoint-N gets a verified lora_adapters/  # doctest: +SKIP
"""

from .discovery import LoraComponent, find_lora_model
from .errors import (
    AdapterSaveError,
    AdapterVerificationError,
    AmbiguousLoraModelError,
    HiggsTrainerError,
    LoraModelNotFoundError,
)
from .saving import SavedAdapter
from .trainer import HiggsLoraTrainer, LoraAdapterSavingMixin, save_lora_adapters
from .verification import AdapterSummary, inspect_adapter, verify_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterSaveError",
    "AdapterSummary",
    "AdapterVerificationError",
    "AmbiguousLoraModelError",
    "HiggsLoraTrainer",
    "HiggsTrainerError",
    "LoraAdapterSavingMixin",
    "LoraComponent",
    "LoraModelNotFoundError",
    "SavedAdapter",
    "find_lora_model",
    "inspect_adapter",
    "save_lora_adapters",
    "verify_adapter",
]
