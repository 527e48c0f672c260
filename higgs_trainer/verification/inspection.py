"""Check an adapter directory by its content, not by file names: every check of this package together.

Used after every save (against the shapes the live model says it must have) and by
``higgs-trainer verify``. A check collects every problem it finds; the raising form joins
them into one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterVerificationError
from ..files.paths import read_adapter_config, read_adapter_tensors
from ..files.runs import adapter_dirs_of, is_interrupted_checkpoint
from ..names import CONFIG_NAME, FULL_WEIGHT_FILES, TRAINER_STATE
from .base_model import check_adapter_modules
from .modules_to_save import lost_modules_to_save, modules_to_save_problems, saved_modules
from .tensors import check_adapter_tensors
from .untrained import untrained_problem


@dataclass
class AdapterSummary:
    """What an adapter directory holds, and what is wrong with it (``problems`` empty when it passed).

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
        >>> summary = inspect_adapter("out/lora_adapters")
        >>> summary.ok, summary.num_tensors, summary.r
        (True, 2, 2)
    """

    path: str
    problems: list[str] = field(default_factory=list)
    peft_type: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    num_tensors: int = 0
    num_parameters: int = 0
    num_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def inspect_adapter(
    directory: str | Path,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    base_model: torch.nn.Module | None = None,
    check_trained: bool = False,
) -> AdapterSummary:
    """Read an adapter directory and report what it holds and every problem found; never raises for bad content.

    With ``base_model`` (which may be on the meta device), also `check_adapter_modules` against it.
    With ``check_trained``, an adapter still at peft's zero init is a problem (`untrained.untrained_problem`).

    Args:
        directory: the adapter directory (``adapter_config.json`` and the adapter's weights).
        expected_shapes: the keys and shapes the adapter file must hold exactly (a save passes
            what the live model says); None checks the file against its own config only.
        base_model: a model (may be on the meta device) the adapter's modules must exist in,
            with matching sizes.
        check_trained: count an adapter whose ``lora_B`` are all still at peft's zero init as a problem.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
        >>> summary = inspect_adapter("out/lora_adapters")
        >>> summary.ok or summary.problems
        True
        >>> inspect_adapter("out").problems  # not an adapter directory: reported, not raised
        ['out/adapter_config.json is missing: not an adapter directory']
    """
    directory = Path(directory)
    summary = AdapterSummary(path=str(directory))
    try:
        config = read_adapter_config(directory)
        tensors = read_adapter_tensors(directory)
    except AdapterVerificationError as exc:
        summary.problems.append(str(exc))
        return summary
    summary.peft_type = config.get("peft_type")
    summary.r = config.get("r")
    summary.lora_alpha = config.get("lora_alpha")
    targets = config.get("target_modules") or []
    summary.target_modules = sorted(targets) if isinstance(targets, list) else [str(targets)]
    summary.num_tensors = len(tensors)
    summary.num_parameters = sum(t.numel() for t in tensors.values())
    summary.num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    summary.problems.extend(check_adapter_tensors(config, tensors, expected_shapes))
    summary.modules_to_save, _ = saved_modules(config, tensors)
    # The live model's shapes (expected_shapes), or the base model, say which entries must be there.
    every_entry = expected_shapes is None and base_model is None
    summary.problems.extend(modules_to_save_problems(config, tensors, every_entry=every_entry))
    if base_model is not None and tensors:
        summary.problems.extend(lost_modules_to_save(config, tensors, base_model))
        summary.problems.extend(check_adapter_modules(tensors, base_model))
    if check_trained and summary.peft_type == "LORA":
        untrained = untrained_problem(config, tensors)
        if untrained is not None:
            summary.problems.append(untrained)
    return summary


def verify_adapter(
    directory: str | Path, expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> AdapterSummary:
    """Like `inspect_adapter`, but raise `AdapterVerificationError` listing every problem.

    Args:
        directory: the adapter directory.
        expected_shapes: the keys and shapes the adapter file must hold exactly; None checks the
            file against its own config only.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
        >>> verify_adapter("out/lora_adapters").num_tensors
        2
    """
    summary = inspect_adapter(directory, expected_shapes)
    if summary.problems:
        raise AdapterVerificationError(f"adapter at {directory} failed verification: " + "; ".join(summary.problems))
    return summary


def inspect_path(
    path: str | Path, base_model: torch.nn.Module | None = None, check_trained: bool = True
) -> list[AdapterSummary]:
    """`inspect_adapter` on every adapter directory ``path`` stands for (see `adapter_dirs_of`).

    With ``base_model`` (built on the meta device from the base's config), also checks that the
    adapter's modules exist in it with matching sizes. With ``check_trained`` (the default), an
    adapter whose ``lora_B`` are all still zero under a zero-start init fails as untrained.
    Never raises for bad content: each problem is in a summary.

    Args:
        path: an adapter directory, a ``checkpoint-N`` (its ``lora_adapters``) or a run directory
            (its final ``lora_adapters`` and every ``checkpoint-*``).
        base_model: a model (built on the meta device) the adapters' modules must exist in.
        check_trained: fail adapters whose ``lora_B`` are all still at peft's zero init.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> peft_model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> _ = torch.nn.init.normal_(peft_model.base_model.model.q_proj.lora_B.default.weight)  # as training does
        >>> for directory in ("out/checkpoint-2", "out"):
        ...     peft_model.save_pretrained(f"{directory}/lora_adapters")
        >>> [(s.path, s.ok) for s in inspect_path("out", base_model=torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}))]
        [('out/lora_adapters', True), ('out/checkpoint-2/lora_adapters', True)]
    """
    try:
        directories = adapter_dirs_of(path)
    except AdapterVerificationError as exc:
        return [AdapterSummary(path=str(path), problems=[str(exc)])]
    summaries = []
    for directory in directories:
        if not directory.exists():
            checkpoint = directory.parent
            if is_interrupted_checkpoint(checkpoint):
                problem = (
                    f"{checkpoint} was interrupted while saving (no {TRAINER_STATE}, no {directory.name}/): it holds "
                    "nothing usable; resume from an earlier checkpoint or delete it"
                )
            elif any((checkpoint / name).is_file() for name in FULL_WEIGHT_FILES):
                problem = (
                    f"{checkpoint} has full weights but no {directory.name}/ (saved without an adapter); "
                    f"rescue it with `higgs-trainer extract {checkpoint} --output DIR`"
                )
            else:
                problem = f"{checkpoint} holds no adapter: no {directory.name}/, no {CONFIG_NAME}, no model weights"
            summaries.append(AdapterSummary(path=str(directory), problems=[problem]))
            continue
        summaries.append(inspect_adapter(directory, base_model=base_model, check_trained=check_trained))
    return summaries


__all__ = ["AdapterSummary", "inspect_adapter", "inspect_path", "verify_adapter"]
