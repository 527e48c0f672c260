"""Error types raised by higgs_trainer.

Each also subclasses the builtin a caller would naturally catch (``ValueError`` for bad
input, ``RuntimeError`` for a failed save), so ``except ValueError`` keeps working.

Examples:
    >>> from higgs_trainer.errors import LoraModelNotFoundError
    >>> issubclass(LoraModelNotFoundError, ValueError)
    True
"""

from __future__ import annotations


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
