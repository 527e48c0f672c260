"""Split a LoRA tensor's key into its module, its LoRA part and what follows: the one parser every module uses.

peft names LoRA tensors ``<module>.<part>[.<adapter>][.weight|.bias]``: in a model's state dict
``q_proj.lora_A.default.weight``, in an adapter file ``base_model.model.q_proj.lora_A.weight``,
and an embedding's ``lora_embedding_A`` without ``.weight``. The part is the first segment that
starts with ``lora_``: a matrix of a pair (`LORA_MATRICES`) or another LoRA parameter such as
DoRA's ``lora_magnitude_vector``.

Examples:
    >>> split_lora_key("base_model.model.q_proj.lora_A.weight")
    LoraKey(module='base_model.model.q_proj', part='lora_A', rest=('weight',))
    >>> split_lora_key("base_model.model.lm_head.weight") is None
    True
"""

from __future__ import annotations

from typing import NamedTuple

from .names import LORA_PAIRS

# The last segment of a parameter's key.
PARAM_SUFFIXES = frozenset({"weight", "bias"})
# The matrices of a LoRA pair: each "A" of LORA_PAIRS and its "B".
LORA_MATRICES = frozenset(LORA_PAIRS) | frozenset(LORA_PAIRS.values())


class LoraKey(NamedTuple):
    """A LoRA tensor's key in parts: ``module`` (with any prefix), the LoRA ``part``, the segments after it.

    Examples:
        >>> key = split_lora_key("model.base_model.model.q.lora_B.default.bias")
        >>> key.module, key.part, key.rest, key.is_matrix, key.is_a, key.partner
        ('model.base_model.model.q', 'lora_B', ('default', 'bias'), True, False, 'lora_A')
    """

    module: str
    part: str
    rest: tuple[str, ...]

    @property
    def is_matrix(self) -> bool:
        """True for a matrix of a LoRA pair (or its bias), False for other LoRA parameters (DoRA's magnitude)."""
        return self.part in LORA_MATRICES

    @property
    def is_a(self) -> bool:
        """True for the "A" matrix of a pair (``lora_A``, ``lora_embedding_A``)."""
        return self.part in LORA_PAIRS

    @property
    def partner(self) -> str | None:
        """The other matrix of this one's pair; None for a part that is not a matrix."""
        if self.part in LORA_PAIRS:
            return LORA_PAIRS[self.part]
        return next((a for a, b in LORA_PAIRS.items() if b == self.part), None)


def split_lora_key(key: str) -> LoraKey | None:
    """``key`` split at its first segment that starts with ``lora_``; None for a key that has none.

    Examples:
        >>> split_lora_key("base_model.model.embed.lora_embedding_A")
        LoraKey(module='base_model.model.embed', part='lora_embedding_A', rest=())
        >>> split_lora_key("base_model.model.q.lora_magnitude_vector.weight").is_matrix
        False
    """
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            return LoraKey(".".join(parts[:i]), part, tuple(parts[i + 1 :]))
    return None


def split_lora_matrix_key(key: str) -> LoraKey | None:
    """`split_lora_key` for a LoRA pair's matrix (or its bias); None for every other key, DoRA's magnitude vectors included.

    Examples:
        >>> split_lora_matrix_key("base_model.model.q.lora_B.weight").part
        'lora_B'
        >>> split_lora_matrix_key("base_model.model.q.lora_magnitude_vector.weight") is None
        True
    """
    lora = split_lora_key(key)
    return lora if lora is not None and lora.is_matrix else None


__all__ = ["LORA_MATRICES", "PARAM_SUFFIXES", "LoraKey", "split_lora_key", "split_lora_matrix_key"]
