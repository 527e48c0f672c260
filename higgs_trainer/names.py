"""File, directory and key names of adapters and checkpoints, in one place.

Examples:
    >>> from higgs_trainer.names import ADAPTER_DIRNAME, CONFIG_NAME
    >>> f"checkpoint-500/{ADAPTER_DIRNAME}/{CONFIG_NAME}"
    'checkpoint-500/lora_adapters/adapter_config.json'
"""

from __future__ import annotations

# Where the trainer writes the adapter, inside every checkpoint-N and the final output directory.
ADAPTER_DIRNAME = "lora_adapters"

# Written into a checkpoint-N that holds the adapter but not the base weights (adapter_only_checkpoints=True).
ADAPTER_ONLY_MARKER = "adapter_only_checkpoint.json"

# What peft's save_pretrained writes (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME).
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Every key of a LoRA adapter that PeftModel.from_pretrained loads starts with this.
PEFT_KEY_PREFIX = "base_model.model."
# Each LoRA "A" matrix and the "B" matrix it pairs with.
LORA_PAIRS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}

# What Trainer writes for full weights (transformers' SAFE_WEIGHTS_NAME, WEIGHTS_NAME and their indexes).
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
FULL_WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX)
# Written last into every checkpoint-N by Trainer._save_checkpoint (transformers' TRAINER_STATE_NAME): a checkpoint
# without it was interrupted while saving.
TRAINER_STATE = "trainer_state.json"

# The dtypes `higgs-trainer merge --dtype` saves in (the command's parser reads them here, without importing torch).
DTYPE_NAMES = ("bf16", "fp16", "fp32")
