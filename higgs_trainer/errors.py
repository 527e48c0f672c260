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
        >>> try:
        ...     trainer.save_model()  # doctest: +SKIP
        ... except HiggsTrainerError as error:
        ...     print(error)  # one line: what is wrong and how to fix it
    """


class LoraModelNotFoundError(HiggsTrainerError, ValueError):
    """No ``peft.PeftModel`` was found inside the model (or not at the named path).

    Examples:
        >>> find_lora_model(torch.nn.Linear(2, 2))  # doctest: +SKIP
        Traceback (most recent call last):
        LoraModelNotFoundError: No peft.PeftModel found anywhere inside Linear (searched every submodule). ...
    """


class AmbiguousLoraModelError(HiggsTrainerError, ValueError):
    """Two or more distinct ``peft.PeftModel`` components were found; name one.

    Examples:
        >>> find_lora_model(two_adapters)  # doctest: +SKIP
        Traceback (most recent call last):
        AmbiguousLoraModelError: Found 2 distinct PeftModel components in TwoComponents: 'a', 'b'. ...
        >>> find_lora_model(two_adapters, path="b").path  # doctest: +SKIP
        'b'
    """


class AdapterSaveError(HiggsTrainerError, RuntimeError):
    """Writing an adapter failed; the previous adapter directory, if any, is intact.

    Examples:
        >>> write_lora_adapters(component, "out", state_dict={})  # doctest: +SKIP
        Traceback (most recent call last):
        AdapterSaveError: the state dict passed for saving holds no tensors under 'model' (0 keys in all); ...
    """


class AdapterVerificationError(HiggsTrainerError, ValueError):
    """An adapter directory is missing, unreadable, empty or does not match its model.

    Examples:
        >>> verify_adapter("run/checkpoint-500/lora_adapters")  # doctest: +SKIP
        Traceback (most recent call last):
        AdapterVerificationError: adapter at run/checkpoint-500/lora_adapters failed verification: 8 tensor(s) are empty ...
    """


class CheckpointError(HiggsTrainerError, ValueError):
    """A checkpoint (or a file given with it) is missing, unreadable, or holds no usable LoRA adapter.

    Examples:
        >>> extract_adapter("run/checkpoint-500", "rescued", lora_alpha=32)  # doctest: +SKIP
        Traceback (most recent call last):
        CheckpointError: run/checkpoint-500 is not a checkpoint: none of model.safetensors, ...
    """


class UsageError(HiggsTrainerError, ValueError):
    """The request cannot be carried out as given; a different argument fixes it (the command exits with 2).

    Examples:
        >>> extract_adapter("run/checkpoint-500", "rescued")  # doctest: +SKIP
        Traceback (most recent call last):
        UsageError: lora_alpha cannot be inferred from the weights and the run did not record it ...
    """


class MergeError(HiggsTrainerError, RuntimeError):
    """Merging or writing the merged model failed; nothing was written.

    Examples:
        >>> merge_adapter("base", "adapter", "merged")  # doctest: +SKIP
        Traceback (most recent call last):
        MergeError: writing the merged model to merged failed: [Errno 28] No space left on device (nothing written)
    """


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
