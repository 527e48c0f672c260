"""Load a saved adapter back into the live PEFT component: resuming from adapter-only checkpoints.

An adapter-only checkpoint (``HiggsLoraTrainer(adapter_only_checkpoints=True)``) holds
``lora_adapters/`` and the optimizer, scheduler, RNG and trainer state, but not the frozen base
weights: the base is already in memory, so only the adapter is loaded (with peft's own
``set_peft_model_state_dict``), and every adapter tensor must match a module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from peft.utils import set_peft_model_state_dict

from ..errors import AdapterVerificationError, HiggsTrainerError
from ..files.atomic import find_directory
from ..files.paths import read_adapter_tensors
from ..files.runs import checkpoints_of, is_complete_checkpoint, is_interrupted_checkpoint, own_adapter_dir
from ..names import ADAPTER_ONLY_MARKER, TRAINER_STATE
from .discovery import LoraComponent

logger = logging.getLogger(__name__)


def checkpoint_to_resume(output_dir: str | os.PathLike, requested: str | os.PathLike | bool) -> str | bool:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=requested)`` should load, never an interrupted one.

    ``True``: the newest complete ``checkpoint-N`` of ``output_dir`` (newer, interrupted ones are
    skipped with a warning); ``True`` is returned unchanged when there is no checkpoint at all, so
    ``Trainer`` reports that as usual. A path to an interrupted ``checkpoint-N`` is refused.

    Raises:
        HiggsTrainerError: the requested checkpoint, or every checkpoint of the run, is interrupted.

    Examples:
        >>> for name in ("checkpoint-2", "checkpoint-4"):
        ...     Path("out", name).mkdir(parents=True)
        >>> _ = Path("out/checkpoint-2/trainer_state.json").write_text("{}")  # checkpoint-4: killed while saving
        >>> checkpoint_to_resume("out", True)
        'out/checkpoint-2'
    """
    if requested is True:
        checkpoints = checkpoints_of(output_dir)
        if not checkpoints:
            return True
        complete = [c for c in checkpoints if is_complete_checkpoint(c)]
        if not complete:
            raise HiggsTrainerError(
                f"no complete checkpoint to resume from in {output_dir}: {', '.join(c.name for c in checkpoints)} "
                f"lack {TRAINER_STATE} (their saves were interrupted); delete them to start over, or train without "
                "resume_from_checkpoint"
            )
        interrupted = [c.name for c in checkpoints[checkpoints.index(complete[-1]) + 1 :]]
        if interrupted:
            logger.warning(
                "Skipping %s in %s: interrupted while saving (no %s); resuming from %s",
                ", ".join(interrupted),
                output_dir,
                TRAINER_STATE,
                complete[-1].name,
            )
        return str(complete[-1])
    checkpoint = Path(requested)
    if is_interrupted_checkpoint(checkpoint):
        complete = [c for c in checkpoints_of(checkpoint.parent) if is_complete_checkpoint(c)]
        instead = f"resume from {complete[-1]}" if complete else "no complete checkpoint is left in that run"
        raise HiggsTrainerError(
            f"{checkpoint} was interrupted while saving (no {TRAINER_STATE}) and cannot be resumed from; {instead}"
        )
    return str(requested)


def is_adapter_only_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """True when ``checkpoint`` was written with ``adapter_only_checkpoints=True``: ``lora_adapters/`` and no base weights.

    Recognised by the marker file the trainer writes there (``adapter_only_checkpoint.json``), not
    by missing weight files: FSDP's sharded checkpoints and peft's own saves have no
    ``model.safetensors`` either.

    Examples:
        ```python
        is_adapter_only_checkpoint("out/checkpoint-500")  # True for a checkpoint of adapter_only_checkpoints=True
        ```
    """
    checkpoint = Path(checkpoint)
    return (checkpoint / ADAPTER_ONLY_MARKER).is_file() and own_adapter_dir(checkpoint).is_dir()


def load_lora_adapters(component: LoraComponent, adapter_dir: str | os.PathLike) -> None:
    """Load the adapter(s) saved in ``adapter_dir`` into ``component`` in place, refusing any key that does not fit.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> wrapper = torch.nn.Module()  # a community-style wrapper; its .model becomes the PeftModel
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> from higgs_trainer import find_lora_model
        >>> from higgs_trainer.training.saving import write_lora_adapters
        >>> component = find_lora_model(wrapper)
        >>> _ = write_lora_adapters(component, "out/checkpoint-2")
        >>> with torch.no_grad():
        ...     _ = component.model.base_model.model.q_proj.lora_A.default.weight.zero_()
        >>> load_lora_adapters(component, "out/checkpoint-2/lora_adapters")  # the saved values are back
        >>> bool(component.model.base_model.model.q_proj.lora_A.default.weight.any())
        True
    """
    adapter_dir = find_directory(adapter_dir)
    for name in component.model.peft_config:
        directory = adapter_dir if name == "default" else adapter_dir / name
        tensors = read_adapter_tensors(directory)
        try:
            result = set_peft_model_state_dict(component.model, tensors, adapter_name=name)
        except KeyError as exc:  # peft looks up each modules_to_save weight of the model in the file
            raise AdapterVerificationError(
                f"cannot resume from {directory}: the adapter lacks {exc.args[0]!r}, a trained weight of the "
                f"PeftModel at {component.display_path} (a modules_to_save head lost from the file); "
                f"`higgs-trainer verify {directory}` lists what is wrong"
            ) from exc
        unexpected = list(result.unexpected_keys)
        missing = [
            key for key in result.missing_keys if ("lora_" in key or ".modules_to_save." in key) and f".{name}." in key
        ]
        if unexpected or missing:
            raise AdapterVerificationError(
                f"the adapter at {directory} does not fit the PeftModel at {component.display_path}: "
                f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(missing)} missing key(s) {missing[:3]}"
            )
        logger.info("Loaded LoRA adapter %r from %s into %s", name, directory, component.display_path)
