"""Check an adapter directory by its content, not by file names.

Used after every save (against the shapes the live model says it must have) and by
``higgs-trainer verify``. A check collects every problem it finds; the raising form joins
them into one message.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from peft.utils.other import get_pattern_key

from ..errors import AdapterVerificationError, first_line, listed
from ..files.paths import (
    read_adapter_config,
    read_adapter_tensors,
)
from ..files.runs import adapter_dirs_of, is_interrupted_checkpoint
from ..lora_keys import LoraKey, split_lora_key
from ..names import CONFIG_NAME, FULL_WEIGHT_FILES, LORA_PAIRS, PEFT_KEY_PREFIX, TRAINER_STATE
from .untrained import untrained_problem

logger = logging.getLogger(__name__)

_PARAM_SUFFIXES = {"weight", "bias"}


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


def _lora_matrix(key: str) -> LoraKey | None:
    """The parts of a LoRA matrix's key (or its bias's); None for every other key, DoRA's magnitude vectors included."""
    lora = split_lora_key(key)
    return lora if lora is not None and lora.is_matrix else None


def check_adapter_tensors(
    config: Mapping, tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[str]:
    """Return the problems of an adapter's config and tensors (empty list: it is sound).

    Checks: LoRA config; at least one tensor; keys in the layout ``PeftModel.from_pretrained``
    expects (``base_model.model.`` prefix, no adapter-name segment); every ``lora_A`` has its
    ``lora_B``; ranks agree with ``r`` and with each other; no empty tensor; finite values; and,
    when ``expected_shapes`` is given, exactly those keys with those shapes.

    Examples:
        >>> check_adapter_tensors({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, {})
        ['the adapter holds no tensors']
    """
    problems: list[str] = []
    peft_type = config.get("peft_type")
    is_lora = peft_type == "LORA"
    if not is_lora:
        problems.append(f"adapter_config.json has peft_type {peft_type!r}, not 'LORA'")
    config_problems = _lora_config_problems(config) if is_lora else []
    problems.extend(config_problems)
    if not tensors:
        problems.append("the adapter holds no tensors")
        return problems
    lora_config = _as_lora_config(config, problems) if is_lora and not config_problems else None
    problems.extend(_key_layout_problems(tensors))
    problems.extend(_content_problems(tensors))
    pieces = _lora_weights(tensors)
    problems.extend(_pairing_problems(tensors, pieces, lora_config))
    if lora_config is not None:
        problems.extend(_targeting_problems(pieces, lora_config))
    if expected_shapes is not None:
        problems.extend(_expected_shape_problems(tensors, expected_shapes))
    return problems


def _key_layout_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys outside the layout ``PeftModel.from_pretrained`` expects: no ``base_model.model.`` prefix, an adapter name."""
    misplaced = [key for key in tensors if not key.startswith(PEFT_KEY_PREFIX)]
    named = [
        key
        for key in tensors
        if (lora := _lora_matrix(key)) is not None and lora.rest and lora.rest[0] not in _PARAM_SUFFIXES
    ]
    problems = []
    if misplaced:
        problems.append(
            f"{len(misplaced)} key(s) lack the '{PEFT_KEY_PREFIX}' prefix that PeftModel.from_pretrained expects "
            f"(wrapper prefix?): {listed(misplaced)}"
        )
    if named:
        problems.append(f"{len(named)} key(s) keep an adapter-name segment such as '.default': {listed(named)}")
    return problems


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors that hold NaN or inf, in order.

    One sum per tensor screens them all: a NaN or inf anywhere makes the sum NaN or inf. A sum of
    large finite values can overflow by itself, so a tensor whose sum is not finite is then checked
    element by element. For an adapter's hundreds of small tensors this is faster than
    ``isfinite(t).all()`` on each, which allocates a mask per tensor (benchmarks/README.md, "Measurements behind the code").

    Examples:
        >>> nonfinite_tensors({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.full((2,), 6e4, dtype=torch.float16)})
        ['b']
    """
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            by_dtype.setdefault(tensor.dtype, []).append(key)
    suspects = set()
    for keys in by_dtype.values():
        sums = torch.stack([tensors[key].sum() for key in keys])
        suspects.update(keys[i] for i in (~torch.isfinite(sums)).nonzero().flatten().tolist())
    return [key for key in tensors if key in suspects and not bool(torch.isfinite(tensors[key]).all())]


def _content_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors that are empty or hold NaN/inf, and LoRA tensors that are not floating point."""
    empty, not_float = [], []
    nonfinite = nonfinite_tensors(tensors)
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            empty.append(f"{key} {tuple(tensor.shape)}")
        if _lora_matrix(key) is not None and not tensor.is_floating_point():
            not_float.append(f"{key} ({str(tensor.dtype).replace('torch.', '')})")
    problems = []
    if empty:
        problems.append(f"{len(empty)} tensor(s) are empty (the ZeRO-3 partitioned-save failure): {listed(empty)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or inf: {listed(nonfinite)}")
    if not_float:
        problems.append(f"{len(not_float)} LoRA tensor(s) are not floating point: {listed(not_float)}")
    return problems


def _is_weight(lora: LoraKey) -> bool:
    return not lora.rest or lora.rest[0] == "weight"


def _lora_weights(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """The LoRA matrices (not their biases) by (module, part), in the file's order."""
    return {
        (lora.module, lora.part): tensor
        for key, tensor in tensors.items()
        if (lora := _lora_matrix(key)) is not None and _is_weight(lora)
    }


def _pairing_problems(
    tensors: Mapping[str, torch.Tensor], pieces: Mapping[tuple[str, str], torch.Tensor], lora_config: LoraConfig | None
) -> list[str]:
    """LoRA tensors with the wrong number of dimensions, matrices without their partner, ranks that disagree."""
    bad_dims, unpaired, bad_rank = [], [], []
    for key, tensor in tensors.items():
        lora = _lora_matrix(key)
        if lora is None or not tensor.is_floating_point():
            continue
        if (tensor.dim() < 2) if _is_weight(lora) else (tensor.dim() != 1):
            bad_dims.append(f"{key} {tuple(tensor.shape)}")
    for (module, part), tensor in pieces.items():
        partner = pieces.get((module, LoraKey(module, part, ()).partner))
        if partner is None:
            unpaired.append(f"{module}.{part}")
        elif part in LORA_PAIRS and tensor.dim() != partner.dim():
            bad_dims.append(f"{module} (A {tuple(tensor.shape)}, B {tuple(partner.shape)})")
        elif part in LORA_PAIRS and tensor.numel() and partner.numel():
            rank_a, rank_b = tensor.shape[0], partner.shape[1] if partner.dim() > 1 else -1
            expected = configured_rank(lora_config, module) if lora_config is not None else rank_a
            if rank_a != rank_b or rank_a != expected:
                bad_rank.append(f"{module} (A {tuple(tensor.shape)}, B {tuple(partner.shape)}, config r={expected})")
    problems = []
    if bad_dims:
        problems.append(
            f"{len(bad_dims)} LoRA tensor(s) have the wrong number of dimensions (weights are matrices, A and B alike; "
            f"biases are vectors): {listed(bad_dims)}"
        )
    if unpaired:
        problems.append(f"{len(unpaired)} LoRA matrix(es) lack their partner: {listed(unpaired)}")
    if bad_rank:
        problems.append(
            f"{len(bad_rank)} LoRA pair(s) have ranks that disagree with the config (r, rank_pattern) or each other: "
            f"{listed(bad_rank)}"
        )
    return problems


def _targeting_problems(pieces: Mapping[tuple[str, str], torch.Tensor], lora_config: LoraConfig) -> list[str]:
    """LoRA modules of the file that the config's ``target_modules`` does not name (peft would skip them)."""
    if lora_config.target_modules in (None, "all-linear"):
        return []
    modules = sorted({module for module, _ in pieces if module.startswith(PEFT_KEY_PREFIX)})
    untargeted = [m for m in modules if not check_target_module_exists(lora_config, m[len(PEFT_KEY_PREFIX) :])]
    if not untargeted:
        return []
    return [
        f"{len(untargeted)} LoRA module(s) in the file are not in the config's target_modules, so "
        f"PeftModel.from_pretrained would skip them: {listed(untargeted)}"
    ]


def _expected_shape_problems(
    tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Tensors the model has and the file lacks, the other way round, and those of another shape."""
    missing = sorted(set(expected_shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_shapes))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(expected_shapes[k])}"
        for k in sorted(set(tensors) & set(expected_shapes))
        if tuple(tensors[k].shape) != tuple(expected_shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are missing from the file: {listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file are not in the model: {listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) have the wrong shape: {listed(wrong)}")
    return problems


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


def _full_weight_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The modules whose whole weights the adapter holds (``modules_to_save``, saved embedding layers), sorted."""
    return sorted(
        {
            key[len(PEFT_KEY_PREFIX) :].rsplit(".", 1)[0]
            for key in tensors
            if key.startswith(PEFT_KEY_PREFIX) and _lora_matrix(key) is None and "." in key[len(PEFT_KEY_PREFIX) :]
        }
    )


def _saved_ancestor(path: str, wanted: list[str]) -> str | None:
    """The outermost module on ``path`` (itself included) that a ``modules_to_save`` entry names, if any.

    peft wraps the module an entry names, whose weights may sit in submodules of it
    (``model.embed_audio_tokens.embed_audio_tokens.weight`` of HiggsAudioV2's audio embeddings).
    """
    parts = path.split(".")
    for end in range(1, len(parts) + 1):
        module = ".".join(parts[:end])
        if any(module == entry or module.endswith("." + entry) for entry in wanted):
            return module
    return None


# The entries peft itself adds to modules_to_save for a task type (PeftModelForSequenceClassification and the token
# classification model add "classifier" and "score", question answering "qa_outputs"); a model has only some of them.
_TASK_MODULES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _unlisted_weight_allowed(key: str, config: Mapping) -> bool:
    """True for a full weight peft saves beside the LoRA tensors without a ``modules_to_save`` entry.

    Those are biases (``bias`` ``"all"`` or ``"lora_only"``), embedding layers (``save_embedding_layers``:
    peft's ``EMBEDDING_LAYER_NAMES``, or a LoRA layer's ``base_layer``) and trainable-token deltas.
    """
    parts = key[len(PEFT_KEY_PREFIX) :].split(".")
    if parts[-1] == "bias" and config.get("bias", "none") != "none":
        return True
    return bool(set(parts) & {*EMBEDDING_LAYER_NAMES, "base_layer"}) or any("trainable_tokens" in p for p in parts)


def modules_to_save_problems(
    config: Mapping, tensors: Mapping[str, torch.Tensor], every_entry: bool = True
) -> list[str]:
    """The problems of an adapter's ``modules_to_save`` against its tensors, both ways, as LoRA pairs are checked.

    * an entry of the config with no tensor in the file: the trained head was lost (``every_entry``;
      entries peft adds for a task type are exempt; a config none of whose entries is there always fails);
    * a full weight in the file that no entry names (nor a bias, embedding or trainable-token save): peft
      would not load it, a merge that replaces tensors by name would;
    * a full weight (``.weight``/``.bias``) that is not floating point: a merge would cast it.

    Examples:
        >>> head = {"base_model.model.audio_lm_head.weight": torch.ones(2, 2)}
        >>> modules_to_save_problems({"modules_to_save": ["audio_lm_head"]}, head)
        []
        >>> modules_to_save_problems({"modules_to_save": ["audio_lm_head", "text_lm_head"]}, head)
        ["adapter_config.json lists modules_to_save ['text_lm_head'] but the file holds no tensor of them: the trained weights were lost"]
        >>> modules_to_save_problems({"modules_to_save": None}, head)[0][:75]
        "1 full weight(s) in the file belong to no module of the config's modules_to"
    """
    wanted = config.get("modules_to_save") or []
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        return []  # the config check reports the field itself
    full = [key for key in tensors if key.startswith(PEFT_KEY_PREFIX) and split_lora_key(key) is None]
    found = {key: _saved_ancestor(key[len(PEFT_KEY_PREFIX) :].rsplit(".", 1)[0], wanted) for key in full}
    problems = []
    present = {module for module in found.values() if module}
    if wanted and not present:
        problems.append(
            f"adapter_config.json lists modules_to_save {sorted(wanted)} but none of them is in the file: "
            "the trained weights were lost"
        )
    elif every_entry:
        exempt = _TASK_MODULES.get(str(config.get("task_type")), ())
        lost = [
            entry
            for entry in dict.fromkeys(wanted)
            if entry not in exempt and not any(m == entry or m.endswith("." + entry) for m in present)
        ]
        if lost:
            problems.append(
                f"adapter_config.json lists modules_to_save {sorted(lost)} but the file holds no tensor of them: "
                "the trained weights were lost"
            )
    unlisted = [key for key in full if not found[key] and not _unlisted_weight_allowed(key, config)]
    if unlisted:
        problems.append(
            f"{len(unlisted)} full weight(s) in the file belong to no module of the config's modules_to_save "
            f"{sorted(wanted)} (PeftModel.from_pretrained would not load them, a merge would): {listed(unlisted)}"
        )
    not_float = [
        f"{key} ({str(tensors[key].dtype).replace('torch.', '')})"
        for key in full
        if key.rsplit(".", 1)[-1] in _PARAM_SUFFIXES and not tensors[key].is_floating_point()
    ]
    if not_float:
        problems.append(
            f"{len(not_float)} full weight(s) (modules_to_save) are not floating point (a merge would cast them): "
            f"{listed(not_float)}"
        )
    return problems


def lost_modules_to_save(config: Mapping, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """``modules_to_save`` entries whose modules the base ``model`` has (it may be on the meta device) and the file lacks.

    Every weight of each module an entry names must be in the file; an entry that names no module of
    the base is reported too (peft would wrap nothing), except the ones peft adds for a task type.

    Examples:
        >>> lost_modules_to_save({"modules_to_save": ["1"]}, {"base_model.model.0.weight": torch.ones(2, 2)},
        ...                      torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
        ["1 modules_to_save entry(ies) name modules of the base model whose weights the file lacks (the trained weights were lost): '1' (1.bias, 1.weight)"]
    """
    wanted = config.get("modules_to_save") or []
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        return []
    exempt = _TASK_MODULES.get(str(config.get("task_type")), ())
    names = [name for name, _ in model.named_modules() if name]
    lost, nowhere = [], []
    for entry in dict.fromkeys(wanted):
        matches = [name for name in names if name == entry or name.endswith("." + entry)]
        if not matches:
            if entry not in exempt:
                nowhere.append(entry)
            continue
        missing = sorted(
            f"{name}.{param}"
            for name in matches
            for param, _ in model.get_submodule(name).named_parameters()
            if f"{PEFT_KEY_PREFIX}{name}.{param}" not in tensors
        )
        if missing:
            lost.append(f"{entry!r} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    problems = []
    if lost:
        problems.append(
            f"{len(lost)} modules_to_save entry(ies) name modules of the base model whose weights the file lacks "
            f"(the trained weights were lost): {', '.join(lost)}"
        )
    if nowhere:
        problems.append(
            f"{len(nowhere)} modules_to_save entry(ies) name no module of the base model (peft would save and load "
            f"nothing for them): {listed(nowhere)}"
        )
    return problems


def saved_modules(config: Mapping, tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], str | None]:
    """The adapter's ``modules_to_save`` modules found in its tensors, and its `modules_to_save_problems` in one line.

    peft matches a ``modules_to_save`` entry against the end of a module path, as here.

    Examples:
        >>> saved_modules({"modules_to_save": ["lm_head"]}, {"base_model.model.lm_head.weight": torch.ones(2, 2)})
        (['lm_head'], None)
        >>> saved_modules({"modules_to_save": ["model.embed_audio_tokens"]},
        ...               {"base_model.model.model.embed_audio_tokens.embed_audio_tokens.weight": torch.ones(2, 2)})
        (['model.embed_audio_tokens'], None)
        >>> saved_modules({"modules_to_save": ["lm_head"]}, {})[1]
        "adapter_config.json lists modules_to_save ['lm_head'] but none of them is in the file: the trained weights were lost"
    """
    wanted = config.get("modules_to_save") or []
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        return [], None
    found = sorted({module for path in _full_weight_modules(tensors) if (module := _saved_ancestor(path, wanted))})
    problems = modules_to_save_problems(config, tensors)
    return found, "; ".join(problems) or None


def _lora_config_problems(config: Mapping) -> list[str]:
    """Problems of the fields of a LoRA ``adapter_config.json`` that peft reads, each checked by type and value."""
    problems = []
    for name, (expected, is_valid) in _LORA_FIELDS.items():
        if name not in config and name not in _REQUIRED_FIELDS:
            continue
        value = config.get(name)
        if not is_valid(value):
            problems.append(f"adapter_config.json has {name}={value!r}, not {expected}")
    return problems


def _as_lora_config(config: Mapping, problems: list[str]) -> LoraConfig | None:
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
    if base_model is not None and tensors:
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


def human_size(num_bytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Examples:
        >>> human_size(1536)
        '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"  # pragma: no cover


# Added for `higgs-trainer verify`: a check of an adapter's modules against a base model (built on the meta
# device, so no weights are loaded).


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(input size, output size) a LoRA pair on ``module`` must have, for the layer types that say so."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # transformers' GPT-2 layer
        return tuple(module.weight.shape)  # (in, out)
    return None


def check_adapter_modules(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Problems of an adapter's LoRA tensors against the modules of the base ``model`` (which may be on the meta device).

    Every LoRA module must exist in ``model`` (otherwise ``PeftModel.from_pretrained`` only warns
    and a merge changes nothing there) and its matrices must fit the layer's input and output sizes.

    Examples:
        >>> check_adapter_modules({"base_model.model.nope.lora_A.weight": torch.zeros(2, 4)}, torch.nn.Linear(4, 4))
        ["1 LoRA module(s) are not in the base model (PeftModel.from_pretrained would only warn; a merge would change nothing there): 'nope'"]
    """
    modules = dict(model.named_modules())
    absent, misfit = [], []
    absent_weights, misfit_weights = _full_weight_problems(tensors, model)
    for key, tensor in tensors.items():
        split = _lora_matrix(key)
        if split is None or not split[0].startswith(PEFT_KEY_PREFIX[:-1]):
            continue
        module_path, part, rest = split
        module_path = module_path[len(PEFT_KEY_PREFIX) :]
        if rest and rest[0] == "bias":
            continue
        module = modules.get(module_path)
        if module is None:
            if module_path not in absent:
                absent.append(module_path)
            continue
        features = _features(module)
        if features is None or tensor.dim() < 2:
            continue
        if part in LORA_PAIRS and tensor.shape[1] != features[0]:
            misfit.append(f"{module_path} ({part} {tuple(tensor.shape)} vs input size {features[0]})")
        elif part not in LORA_PAIRS and tensor.shape[0] != features[1]:
            misfit.append(f"{module_path} ({part} {tuple(tensor.shape)} vs output size {features[1]})")
    problems = []
    if absent:
        problems.append(
            f"{len(absent)} LoRA module(s) are not in the base model (PeftModel.from_pretrained would only warn; "
            f"a merge would change nothing there): {listed(absent)}"
        )
    if misfit:
        problems.append(f"{len(misfit)} LoRA matrix(es) do not fit the base model's layers: {listed(misfit)}")
    if absent_weights:
        problems.append(
            f"{len(absent_weights)} full weight(s) (modules_to_save) are not in the base model: {listed(absent_weights)}"
        )
    if misfit_weights:
        problems.append(
            f"{len(misfit_weights)} full weight(s) (modules_to_save) do not fit the base model's: {listed(misfit_weights)}"
        )
    return problems


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _full_weight_problems(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Full weights of the adapter (``modules_to_save``, saved embeddings) absent from ``model``, and those of another shape."""
    params = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
    params.update({name: (tuple(b.shape), b.dtype) for name, b in model.named_buffers()})
    absent, misfit = [], []
    for key, tensor in sorted(tensors.items()):
        if not key.startswith(PEFT_KEY_PREFIX) or _lora_matrix(key) is not None:
            continue
        # an embedding that is itself a LoRA layer saves its base weight as <module>.base_layer.weight
        name = key[len(PEFT_KEY_PREFIX) :].replace(".base_layer.", ".")
        if name not in params:
            absent.append(name)
        elif tuple(tensor.shape) != params[name][0]:
            misfit.append(f"{name} {tuple(tensor.shape)} vs {params[name][0]}")
        elif tensor.is_floating_point() != params[name][1].is_floating_point:
            misfit.append(f"{name} {_dtype_name(tensor.dtype)} vs {_dtype_name(params[name][1])}")
    return absent, misfit


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


__all__ = [
    "AdapterSummary",
    "check_adapter_modules",
    "check_adapter_tensors",
    "configured_rank",
    "configured_value",
    "human_size",
    "inspect_adapter",
    "inspect_path",
    "is_valid_alpha",
    "lost_modules_to_save",
    "lora_config_from_dict",
    "modules_to_save_problems",
    "saved_modules",
    "verify_adapter",
]
