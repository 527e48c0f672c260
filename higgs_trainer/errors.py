"""Error types raised by higgs_trainer.

Every one subclasses `HiggsTrainerError`. Those for bad input also subclass ``ValueError`` and
those for a failed save ``RuntimeError``, so ``except ValueError`` keeps working. An unsupported
setup raises a bare `HiggsTrainerError`: ``adapter_only_checkpoints=True`` under FSDP or with a
DeepSpeed older than 0.18, or merging a ``higgs_audio`` model without ``boson_multimodal``.

Examples:
    >>> from higgs_trainer.errors import LoraModelNotFoundError
    >>> issubclass(LoraModelNotFoundError, ValueError)
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_MAX_LISTED = 3


class HiggsTrainerError(Exception):
    """Base class of every error this library raises on purpose.

    Examples:
        >>> import torch
        >>> from higgs_trainer import find_lora_model
        >>> try:
        ...     find_lora_model(torch.nn.Linear(2, 2))
        ... except HiggsTrainerError as error:  # one line: what is wrong and how to fix it
        ...     print(type(error).__name__)
        LoraModelNotFoundError
    """


class LoraModelNotFoundError(HiggsTrainerError, ValueError):
    """No ``peft.PeftModel`` was found inside the model (or not at the named path).

    Examples:
        >>> import torch
        >>> from higgs_trainer import find_lora_model
        >>> find_lora_model(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        higgs_trainer.errors.LoraModelNotFoundError: No peft.PeftModel found anywhere inside Linear (searched every submodule). ...
    """


class AmbiguousLoraModelError(HiggsTrainerError, ValueError):
    """Two or more distinct ``peft.PeftModel`` components were found; name one.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from higgs_trainer import find_lora_model
        >>> two_adapters = torch.nn.Module()
        >>> two_adapters.a = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> two_adapters.b = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> find_lora_model(two_adapters)
        Traceback (most recent call last):
        higgs_trainer.errors.AmbiguousLoraModelError: Found 2 distinct PeftModel components in Module: 'a', 'b'. ...
        >>> find_lora_model(two_adapters, path="b").path
        'b'
    """


class AdapterSaveError(HiggsTrainerError, RuntimeError):
    """Writing an adapter failed; the previous adapter directory, if any, is intact.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from higgs_trainer import find_lora_model
        >>> from higgs_trainer.training.saving import write_lora_adapters
        >>> wrapper = torch.nn.Module()
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> write_lora_adapters(find_lora_model(wrapper), "out", state_dict={})
        Traceback (most recent call last):
        higgs_trainer.errors.AdapterSaveError: the state dict passed for saving holds no tensors under 'model' (0 keys in all); ...
    """


class AdapterVerificationError(HiggsTrainerError, ValueError):
    """An adapter directory is missing, unreadable, empty or does not match its model.

    Examples:
        >>> from higgs_trainer import verify_adapter
        >>> verify_adapter("run/checkpoint-500/lora_adapters")
        Traceback (most recent call last):
        higgs_trainer.errors.AdapterVerificationError: adapter at run/checkpoint-500/lora_adapters failed verification: run/checkpoint-500/lora_adapters/adapter_config.json is missing: not an adapter directory
    """


class CheckpointError(HiggsTrainerError, ValueError):
    """A checkpoint (or a file given with it) is missing, unreadable, or holds no usable LoRA adapter.

    Examples:
        >>> from pathlib import Path
        >>> from higgs_trainer import extract_adapter
        >>> Path("run/checkpoint-500").mkdir(parents=True)
        >>> extract_adapter("run/checkpoint-500", "rescued", lora_alpha=32)
        Traceback (most recent call last):
        higgs_trainer.errors.CheckpointError: run/checkpoint-500 is not a checkpoint: none of model.safetensors, ...
    """


class SpeechScorerError(HiggsTrainerError, ValueError):
    """A speech scorer cannot be set up: its model does not load, a reference clip cannot be read, or a metric is
    asked for that no configured scorer produces.

    Examples:
        >>> from higgs_trainer.speech.error_rate import ErrorRateScorer
        >>> ErrorRateScorer("no/such/asr-model")
        Traceback (most recent call last):
        higgs_trainer.errors.SpeechScorerError: cannot load the ASR model 'no/such/asr-model': no such directory; ...
    """


class NoSpeechSamplesError(HiggsTrainerError, ValueError):
    """A run directory holds no speech samples to list or to put on a page.

    Examples:
        >>> from pathlib import Path
        >>> from higgs_trainer.speech.run_samples import read_run
        >>> Path("run/checkpoint-2").mkdir(parents=True)
        >>> read_run("run")
        Traceback (most recent call last):
        higgs_trainer.errors.NoSpeechSamplesError: run has no speech samples (no checkpoint-N/speech/speech.json): ...
    """


class UsageError(HiggsTrainerError, ValueError):
    """The request cannot be carried out as given; a different argument fixes it (the command exits with 2).

    Examples:
        >>> from higgs_trainer import extract_adapter
        >>> extract_adapter("run/checkpoint-500", "rescued", lora_alpha=32)
        Traceback (most recent call last):
        higgs_trainer.errors.UsageError: checkpoint run/checkpoint-500 does not exist
    """


class MissingExtraError(HiggsTrainerError, ImportError):
    """An optional part was used without its extra installed; the message names the ``pip install`` that fixes it.

    Examples:
        >>> raise MissingExtraError('speech samples need soundfile: pip install "higgs-trainer[speech]"')
        Traceback (most recent call last):
        higgs_trainer.errors.MissingExtraError: speech samples need soundfile: pip install "higgs-trainer[speech]"
    """


class MergeError(HiggsTrainerError, RuntimeError):
    """Merging or writing the merged model failed; nothing was written.

    Examples:
        ```python
        merge_adapter("base", "adapter", "merged")  # with the disk full
        # MergeError: writing the merged model to merged failed: [Errno 28] No space left on device (nothing written)
        ```
    """


# Exceptions that mean a bug in higgs_trainer, never bad input: the CLI reports them as "unexpected" with a hint to
# rerun with --debug, and no library function turns them into one of the errors above.
PROGRAMMING_ERRORS: tuple[type[Exception], ...] = (AssertionError, AttributeError, NameError, TypeError)


def listed(items: Iterable[str], limit: int = _MAX_LISTED) -> str:
    """The first ``limit`` items, quoted, and how many more: for one-line error messages.

    Examples:
        >>> listed(["a", "b", "c", "d", "e"])
        "'a', 'b', 'c' and 2 more"
    """
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def first_line(exc: BaseException) -> str:
    """The informative part of an exception's message, on one line (torch's unpickler refusal is ten lines).

    Examples:
        >>> first_line(ValueError("bad\\n  file"))
        'bad file'
    """
    text = str(exc)
    refusal = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?:\s|$)", text)
    if refusal:
        text = f"weights_only=True refused it: {refusal.group(1)}"
    return " ".join(text.split()) or type(exc).__name__
