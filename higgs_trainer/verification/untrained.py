"""Catch LoRA adapters that never trained.

peft's default initialisation (``init_lora_weights=True``, and ``"gaussian"``) sets every
``lora_B`` (and, for embedding layers, every ``lora_embedding_A``) to zero, so an adapter that
saw no optimizer update is still all zero there: it loads, verifies and merges into a model
identical to the base. A custom ``training_step`` that never calls ``backward()`` (the community
``train_v2_ddp.py``), a learning rate of 0, or LoRA parameters missing from the optimizer all end
that way. Other initialisations (PiSSA, OLoRA, LoftQ, EVA, CorDA, orthogonal, ``False``, ...) do
not start from a zero matrix; nothing here judges them.

`untrained_problem` reads an adapter's config and tensors (used by ``higgs-trainer verify``,
``merge`` and the trainer's save-time warning); `check_lora_trainable` refuses, before training,
LoRA parameters that are frozen or absent from the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..errors import HiggsTrainerError, listed
from ..lora_keys import LORA_MATRICES, split_lora_key

# What peft initialises to zero under a zero-start init: the "B" of a linear pair, the "A" of an embedding pair.
_ZERO_AT_INIT = ("lora_B", "lora_embedding_A")
_ZERO_START_INITS = (True, "gaussian")  # peft LoraLayer.reset_lora_parameters: B (embedding: A) zeroed

LIKELY_CAUSES = (
    "a custom training_step that never calls backward() (or accelerator.backward(loss)), learning_rate=0, "
    "or LoRA parameters missing from the optimizer"
)


def starts_from_zero(config: Mapping) -> bool:
    """True when ``config``'s ``init_lora_weights`` starts every ``lora_B`` at zero (peft's default and ``"gaussian"``).

    Examples:
        >>> starts_from_zero({"init_lora_weights": True}), starts_from_zero({})
        (True, True)
        >>> starts_from_zero({"init_lora_weights": "pissa"}), starts_from_zero({"init_lora_weights": False})
        (False, False)
    """
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        init = init.lower()
    return any(init is start if isinstance(start, bool) else init == start for start in _ZERO_START_INITS)


def _is_zero_at_init(key: str) -> bool:
    lora = split_lora_key(key)
    return lora is not None and lora.part in _ZERO_AT_INIT


def untrained_problem(config: Mapping, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """A one-line problem when the adapter's LoRA tensors still equal peft's zero initialisation, else None.

    Only judged for a zero-start ``init_lora_weights`` (see `starts_from_zero`) and when the
    adapter holds LoRA tensors at all.

    Examples:
        >>> a, b = torch.ones(2, 4), torch.zeros(4, 2)
        >>> keys = ("base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight")
        >>> untrained_problem({"init_lora_weights": True}, dict(zip(keys, (a, b), strict=True)))[:37]
        'untrained: all 1 lora_B tensor(s) are'
        >>> untrained_problem({"init_lora_weights": True}, dict(zip(keys, (a, b + 1), strict=True))) is None
        True
    """
    if not starts_from_zero(config):
        return None
    zero_start = {key: tensor for key, tensor in tensors.items() if _is_zero_at_init(key)}
    if not zero_start or any(tensor.numel() == 0 or bool(tensor.any()) for tensor in zero_start.values()):
        return None
    return (
        f"untrained: all {len(zero_start)} lora_B tensor(s) are still zero, peft's initialisation "
        f"(init_lora_weights={config.get('init_lora_weights', True)!r}), so this adapter changes nothing; "
        f"likely causes: {LIKELY_CAUSES}"
    )


def lora_parameters(
    model: torch.nn.Module, adapters: Iterable[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """The LoRA matrices of ``model`` (``lora_A`` / ``lora_B`` / embedding pairs) with their names.

    With ``adapters``, only those of the adapters so named (peft freezes the inactive ones).

    Examples:
        >>> lora_parameters(torch.nn.Linear(2, 2))
        []
    """
    pieces = LORA_MATRICES
    wanted = None if adapters is None else set(adapters)
    found = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if pieces & set(parts) and (wanted is None or wanted & set(parts)):
            found.append((name, param))
    return found


def check_lora_trainable(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, adapters: Iterable[str] | None = None
) -> None:
    """Raise `HiggsTrainerError` when a LoRA parameter of ``model`` is frozen or (with ``optimizer``) not optimized.

    ``adapters`` limits the check to the adapters being trained (default: every LoRA parameter).

    An optimizer built before ``get_peft_model`` (or handed to ``Trainer(optimizers=...)`` from
    the base model's parameters) holds the frozen base weights and none of the LoRA matrices:
    training would run and save an adapter that never changes.

    Examples:
        >>> from peft import LoraConfig, get_peft_model
        >>> peft_model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> check_lora_trainable(peft_model, torch.optim.AdamW(p for p in peft_model.parameters() if p.requires_grad))
        >>> check_lora_trainable(peft_model, torch.optim.AdamW(peft_model.base_model.model.q_proj.base_layer.parameters()))
        Traceback (most recent call last):
        higgs_trainer.errors.HiggsTrainerError: 2 of 2 LoRA parameter(s) are not in the optimizer's param_groups, so they never train: ...
    """
    params = lora_parameters(model, adapters)
    frozen = [name for name, param in params if not param.requires_grad]
    if frozen:
        raise HiggsTrainerError(
            f"{len(frozen)} of {len(params)} LoRA parameter(s) are frozen (requires_grad=False), so they never train: "
            f"{listed(frozen)}. Do not freeze the model after get_peft_model (peft already froze the base); load a saved "
            "adapter for training with PeftModel.from_pretrained(base, path, is_trainable=True)."
        )
    # accelerate's DummyOptim (DeepSpeed builds the real optimizer from its config) has no param_groups
    groups = getattr(optimizer, "param_groups", None)
    if groups is None or not params:
        return
    optimized = {id(param) for group in groups for param in group["params"]}
    missing = [name for name, param in params if id(param) not in optimized]
    if missing:
        raise HiggsTrainerError(
            f"{len(missing)} of {len(params)} LoRA parameter(s) are not in the optimizer's param_groups, so they "
            f"never train: {listed(missing)}. Build the optimizer after get_peft_model, from the trainable "
            "parameters: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], ...)."
        )


__all__ = ["LIKELY_CAUSES", "check_lora_trainable", "lora_parameters", "starts_from_zero", "untrained_problem"]
