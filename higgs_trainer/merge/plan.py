"""Which base tensor each tensor of a LoRA adapter changes, and how peft's merge changes it.

`plan_merge` matches the adapter's tensors to the base's (from the safetensors headers alone)
and refuses, before anything is read or written, what cannot be matched or what the streaming
merge does not reproduce bit for bit (DoRA, other LoRA variants, initialisations that change the
base, ...: `IN_MEMORY` names the path that goes through peft itself).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterVerificationError, MergeError, listed
from ..files.safetensors_files import StoredTensor
from ..lora_keys import split_lora_key
from ..names import PEFT_KEY_PREFIX
from ..verification.lora_config import configured_value
from ..verification.untrained import lora_init

IN_MEMORY = "merge in memory instead (`higgs-trainer merge --in-memory`, or merge_adapter(..., streaming=False))"


# LoRA config fields that change nothing this module computes (or that it reads itself), and their defaults
# need not be checked; every other field must be unset (falsy) for the streaming merge to accept the adapter.
_HANDLED_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "runtime_config", "lora_bias", "megatron_core", "qalora_group_size",
    # configs of initialisations, used only with their init_lora_weights (refused below)
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",
}  # fmt: skip


# Initialisations that leave the base weights alone (the others, e.g. PiSSA, OLoRA, LoftQ, CorDA, change them).
_PLAIN_INITS = (True, False, "gaussian")


@dataclass
class LoraDelta:
    """One LoRA pair and how peft merges it into the weight ``target``."""

    target: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None
    bias_target: str | None = None

    def delta(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``transpose(B @ A, fan_in_fan_out) * scaling`` in float32, as peft's ``get_delta_weight`` (into ``out``)."""
        product = self.b @ self.a if out is None else torch.mm(self.b, self.a, out=out)
        if self.embedding or self.fan_in_fan_out:
            product = product.T
        return product.mul_(self.scaling)  # in place: the same products as `* scaling`, without a second copy


@dataclass
class MergePlan:
    """What happens to which base tensor: ``replace`` (adapter's tensor, then any delta), ``deltas``, ``bias``."""

    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    bias: dict[str, LoraDelta] = field(default_factory=dict)

    @property
    def touched(self) -> set[str]:
        return set(self.replace) | set(self.deltas) | set(self.bias)


def check_streamable_config(config: Mapping, adapter_dir: Path) -> None:
    """Refuse (`MergeError`) an adapter config whose merge the streaming path does not reproduce exactly."""
    refused = []
    if config.get("use_dora"):
        refused.append("DoRA (use_dora)")
    init = lora_init(config)  # the casing peft accepts ("Gaussian"), read as verify reads it
    if not any(init is plain if isinstance(plain, bool) else init == plain for plain in _PLAIN_INITS):
        refused.append(f"init_lora_weights={init!r}")
    for name, value in config.items():
        if name not in _HANDLED_FIELDS and name != "use_dora" and value not in (None, False, 0, "", [], {}):
            refused.append(name)
    if refused:
        raise MergeError(
            f"the streaming merge does not reproduce the adapter at {adapter_dir}'s {', '.join(refused)} exactly; "
            + IN_MEMORY
        )


def lora_target_weights(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The base weights (and biases, for ``lora_bias``) the LoRA pairs of an adapter add a delta to.

    Examples:
        >>> sorted(lora_target_weights({"base_model.model.q.lora_A.weight": None, "base_model.model.q.lora_B.bias": None}))
        ['q.bias', 'q.weight']
    """
    targets = set()
    for key in tensors:
        lora = split_lora_key(key)
        if lora is not None and lora.is_matrix and lora.module.startswith(PEFT_KEY_PREFIX):
            module = lora.module[len(PEFT_KEY_PREFIX) :]
            targets.add(f"{module}.bias" if lora.rest[-1:] == ("bias",) else f"{module}.weight")
    return targets


def check_floating_targets(dtypes: Mapping[str, torch.dtype], targets: Iterable[str], base_dir: Path) -> None:
    """Refuse (`MergeError`) a LoRA delta on a base tensor of an integer dtype: it would be rounded to whole numbers.

    Both merge paths refuse it rather than merge in floating point: an integer weight under a LoRA is
    a quantized one (its scales live elsewhere) or a mistake, and either way adding a float delta to
    its raw values does not give the trained model.

    Examples:
        >>> check_floating_targets({"q.weight": torch.float16}, ["q.weight"], Path("base"))
        >>> check_floating_targets({"q.weight": torch.int8}, ["q.weight"], Path("base"))
        Traceback (most recent call last):
        ...
        higgs_trainer.errors.MergeError: cannot merge the adapter into base: its LoRA adds to q.weight is torch.int8, an integer dtype, where the delta would be rounded to whole numbers; merge into the floating-point original of the base (nothing written)
    """
    integer = [f"{t} is {dtypes[t]}" for t in sorted(targets) if t in dtypes and not dtypes[t].is_floating_point]
    if integer:
        more = f" and {len(integer) - 3} more" if len(integer) > 3 else ""
        raise MergeError(
            f"cannot merge the adapter into {base_dir}: its LoRA adds to {', '.join(integer[:3])}{more}, an integer "
            "dtype, where the delta would be rounded to whole numbers; merge into the floating-point original of the "
            "base (nothing written)"
        )


def _orientation(module: str, weight: StoredTensor, out_in: tuple[int, int]) -> bool | None:
    """Whether peft merges ``module`` transposed (a GPT-2 ``Conv1D``): from the shapes; None if only the config can say.

    peft decides by the layer's type (``Conv1D`` always ``fan_in_fan_out=True``, ``nn.Linear`` always
    False, whatever the config said); without the model the shapes tell, except for a square weight.
    """
    if weight.shape == out_in and weight.shape[::-1] != out_in:
        return False
    if weight.shape == out_in[::-1] and weight.shape != out_in:
        return True
    if weight.shape == out_in:
        return None
    raise AdapterVerificationError(
        f"the LoRA pair of {module!r} makes a {out_in} delta, which does not fit its weight {weight.shape} in the base"
    )


def plan_merge(
    config: Mapping, tensors: Mapping[str, torch.Tensor], stored: Mapping[str, StoredTensor], adapter_dir: Path
) -> MergePlan:
    """Match every adapter tensor to the base tensor it changes, and say how; refuse what cannot be matched.

    Examples:
        ```python
        plan = plan_merge(config, read_adapter_tensors(adapter), read_stored_tensors(base, files), adapter)
        sorted(plan.deltas)[0]  # 'layers.0.self_attn.q_proj.weight'
        ```
    """
    check_streamable_config(config, adapter_dir)
    plan = MergePlan()
    pairs = _lora_pairs(tensors, stored, plan, adapter_dir)
    configured_fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    ambiguous, contradicting = [], []
    for module, parts in pairs.items():
        delta, transposed = _lora_delta(module, parts, config, stored, adapter_dir)
        plan.deltas[delta.target] = delta
        if delta.bias_target is not None:
            plan.bias[delta.bias_target] = delta
        if delta.embedding:
            continue
        if transposed is None:
            ambiguous.append(delta)
        else:
            delta.fan_in_fan_out = transposed
            if transposed != configured_fan_in_fan_out:
                contradicting.append(module)
    if ambiguous and contradicting:
        raise MergeError(
            f"the adapter's fan_in_fan_out={configured_fan_in_fan_out} does not hold for {listed(contradicting)}, so "
            f"the layout of the square weight(s) {listed(d.target for d in ambiguous)} is unknown without the model; "
            + IN_MEMORY
        )
    for delta in ambiguous:
        delta.fan_in_fan_out = configured_fan_in_fan_out
    base_dir = next(iter(stored.values())).file.parent if stored else Path("the base")
    check_floating_targets({name: t.torch_dtype for name, t in stored.items()}, [*plan.deltas, *plan.bias], base_dir)
    return plan


def _lora_pairs(
    tensors: Mapping[str, torch.Tensor], stored: Mapping[str, StoredTensor], plan: MergePlan, adapter_dir: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's LoRA tensors by module (``lora_A``, ``lora_B``, ``lora_B.bias``, ...); other tensors go to ``plan.replace``.

    Refuses a tensor that matches no base tensor, one the streaming merge does not handle (DoRA, other
    LoRA variants) and a LoRA module whose weight is not in the base.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unmatched, unsupported = [], []
    for key, value in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            unmatched.append(key)
            continue
        lora = split_lora_key(key)
        if lora is None:  # modules_to_save, saved embedding layers (<module>.base_layer.weight), bias="all"
            target = key[len(PEFT_KEY_PREFIX) :].replace(".base_layer.", ".")
            if target not in stored:
                unmatched.append(key)
            elif tuple(value.shape) != stored[target].shape:
                raise AdapterVerificationError(
                    f"adapter tensor {key!r} has shape {tuple(value.shape)}, the base's {target!r} {stored[target].shape}"
                )
            else:
                plan.replace[target] = value
            continue
        module, part, param = lora.module[len(PEFT_KEY_PREFIX) :], lora.part, ".".join(lora.rest)
        embedding = part.startswith("lora_embedding")
        allowed = ("",) if embedding else ("weight", "bias") if part == "lora_B" else ("weight",)
        if not lora.is_matrix or param not in allowed:  # DoRA's lora_magnitude_vector, other LoRA variants
            unsupported.append(key)
            continue
        pairs.setdefault(module, {})[part if param in ("", "weight") else f"{part}.{param}"] = value
    if unmatched:
        raise AdapterVerificationError(
            f"{len(unmatched)} tensor(s) of the adapter at {adapter_dir} match no tensor of the base model "
            f"(a merge would drop them): {listed(unmatched)}"
        )
    if unsupported:
        raise MergeError(f"the streaming merge does not handle adapter tensor(s) {listed(unsupported)}; " + IN_MEMORY)
    absent = [module for module in pairs if f"{module}.weight" not in stored]
    if absent:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model: {len(absent)} LoRA module(s) are not in the "
            f"base model (no weight of that name in its safetensors): {listed(absent)}"
        )
    return pairs


def _lora_delta(
    module: str,
    parts: Mapping[str, torch.Tensor],
    config: Mapping,
    stored: Mapping[str, StoredTensor],
    adapter_dir: Path,
) -> tuple[LoraDelta, bool | None]:
    """The change one LoRA pair (and its ``lora_bias``) makes to ``module``'s weight, checked against the config and the base.

    With it, whether the base's weight shape says the pair merges transposed (`_orientation`; None
    for a square weight, and for an embedding): `plan_merge` settles ``fan_in_fan_out`` across modules.
    """
    embedding = "lora_embedding_A" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A")
    b = parts.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2:
        raise MergeError(
            f"the streaming merge handles 2-D LoRA pairs of linear and embedding layers; {module!r} is not one; "
            + IN_MEMORY
        )
    target = f"{module}.weight"
    r, alpha = configured_value(config, "r", module), configured_value(config, "lora_alpha", module)
    if not isinstance(r, int) or r <= 0 or a.shape[0] != r or b.shape[1] != r:
        raise AdapterVerificationError(
            f"the LoRA pair of {module!r} has rank {a.shape[0]}, the adapter config says r={r}"
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    # peft holds the adapter weights in float32 (PeftModel.from_pretrained's autocast_adapter_dtype upcasts
    # fp16/bf16 ones; its state-dict load copies the file's values into them).
    delta = LoraDelta(target, a.to(torch.float32), b.to(torch.float32), scaling, embedding=embedding)
    out_in = (int(b.shape[0]), int(a.shape[1]))
    if embedding and stored[target].shape != out_in[::-1]:
        raise AdapterVerificationError(
            f"the embedding LoRA of {module!r} makes a {out_in[::-1]} delta, its weight is {stored[target].shape}"
        )
    transposed = None if embedding else _orientation(module, stored[target], out_in)
    bias = parts.get("lora_B.bias")
    if bias is not None:
        bias_target = f"{module}.bias"
        if bias_target not in stored:
            raise MergeError(
                f"the adapter at {adapter_dir} has lora_bias for {module!r}, whose layer has no bias in the base"
            )
        delta.bias, delta.bias_target = bias.to(torch.float32), bias_target
    return delta, transposed
