"""An adapter's LoRA config: the fields peft reads, checked by type and value, and the rank and alpha it gives a module.

`configured_value` is the one place ``rank_pattern`` and ``alpha_pattern`` are resolved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig
from peft.utils.other import get_pattern_key

from ..errors import first_line
from ..names import PEFT_KEY_PREFIX


def is_valid_alpha(value: object) -> bool:
    """True for a usable ``lora_alpha``: a finite positive number (not a bool).

    Examples:
        >>> is_valid_alpha(32), is_valid_alpha(0), is_valid_alpha(True), is_valid_alpha(float("inf"))
        (True, False, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def lora_config_from_dict(config: Mapping) -> LoraConfig:
    """peft's ``LoraConfig`` for an ``adapter_config.json``'s contents, as peft builds it (unknown keys dropped).

    Raises ``TypeError`` or ``ValueError`` for a config peft rejects.

    Examples:
        >>> lora_config_from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}).r
        4
    """
    return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**config))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_ints(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


# The adapter_config.json fields peft reads when it loads or merges a LoRA adapter, and what each must be. peft
# itself does not check them: a wrong type fails deep inside from_pretrained, or loads silently changed
# (use_dora: "yes" is true). A field that is absent takes peft's default.
_LORA_FIELDS: dict[str, tuple[str, object]] = {
    "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a positive number", is_valid_alpha),
    "lora_dropout": (
        "a number from 0 to 1",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
    ),
    "bias": ("one of 'none', 'all', 'lora_only'", lambda v: v in ("none", "all", "lora_only")),
    **{
        name: ("true or false", lambda v: isinstance(v, bool))
        for name in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "inference_mode", "use_qalora")
    },
    "init_lora_weights": ("true, false or the name of an init", lambda v: isinstance(v, (bool, str))),
    **{
        name: ("a string or a list of strings", lambda v: v is None or isinstance(v, str) or _is_strings(v))
        for name in ("target_modules", "exclude_modules", "layers_pattern")
    },
    "modules_to_save": ("a list of module names", lambda v: v is None or _is_strings(v)),
    "layers_to_transform": ("a layer index or a list of them", lambda v: v is None or _is_int(v) or _is_ints(v)),
    "rank_pattern": (
        "a mapping of patterns to ranks",
        lambda v: v is None or (isinstance(v, dict) and all(_is_int(r) and r > 0 for r in v.values())),
    ),
    "alpha_pattern": (
        "a mapping of patterns to alphas",
        lambda v: v is None or (isinstance(v, dict) and all(is_valid_alpha(a) for a in v.values())),
    ),
    "trainable_token_indices": (
        "a list of token ids or a mapping of module names to them",
        lambda v: v is None or _is_ints(v) or (isinstance(v, dict) and all(_is_ints(i) for i in v.values())),
    ),
    **{
        name: ("a string", lambda v: v is None or isinstance(v, str))
        for name in ("task_type", "base_model_name_or_path")
    },
}
_REQUIRED_FIELDS = ("r", "lora_alpha")


def lora_config_problems(config: Mapping) -> list[str]:
    """Problems of the fields of a LoRA ``adapter_config.json`` that peft reads, each checked by type and value."""
    problems = []
    for name, (expected, is_valid) in _LORA_FIELDS.items():
        if name not in config and name not in _REQUIRED_FIELDS:
            continue
        value = config.get(name)
        if not is_valid(value):
            problems.append(f"adapter_config.json has {name}={value!r}, not {expected}")
    return problems


def as_lora_config(config: Mapping, problems: list[str]) -> LoraConfig | None:
    """``config`` as peft's ``LoraConfig`` (to match rank patterns and targets as peft does), or None with a problem."""
    try:
        return lora_config_from_dict(config)
    except (TypeError, ValueError) as exc:
        problems.append(f"adapter_config.json is not a valid LoraConfig for peft: {first_line(exc)}")
        return None


_PATTERNS = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}


def configured_value(config: Mapping | LoraConfig, name: str, module: str) -> Any:
    """The ``r`` or ``lora_alpha`` (``name``) that ``config`` gives ``module``: the one place ``rank_pattern`` and ``alpha_pattern`` are resolved.

    ``config`` is an ``adapter_config.json`` dict or a ``LoraConfig``; ``module`` a path in the base
    model or an adapter key's module. A pattern entry matches as peft matches it (peft's own
    ``get_pattern_key``); otherwise the config's ``r`` / ``lora_alpha`` applies.

    Examples:
        >>> configured_value({"r": 8, "rank_pattern": {r"^layers\\.0\\.q_proj": 4}}, "r", "layers.0.q_proj")
        4
        >>> configured_value({"lora_alpha": 16, "alpha_pattern": {"q_proj": 32}}, "lora_alpha", "base_model.model.v_proj")
        16
    """
    get = config.get if isinstance(config, Mapping) else functools.partial(getattr, config)
    patterns = get(_PATTERNS[name]) or {}
    module = module.removeprefix(PEFT_KEY_PREFIX)
    return patterns.get(get_pattern_key(patterns.keys(), module), get(name))


def configured_rank(config: LoraConfig, module: str) -> int:
    """The rank ``config`` gives ``module`` (`configured_value` of ``r``).

    Examples:
        >>> configured_rank(LoraConfig(r=8, rank_pattern={r"^layers\\.0\\.q_proj": 4}), "layers.0.q_proj")
        4
        >>> configured_rank(LoraConfig(r=8, rank_pattern={r"^layers\\.0\\.q_proj": 4}), "tower.layers.0.q_proj")
        8
    """
    return configured_value(config, "r", module)


__all__ = [
    "as_lora_config",
    "configured_rank",
    "configured_value",
    "is_valid_alpha",
    "lora_config_from_dict",
    "lora_config_problems",
]
