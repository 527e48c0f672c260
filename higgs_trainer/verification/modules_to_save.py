"""An adapter's ``modules_to_save``: the full weights its config lists, found (or lost) in its tensors and in a base model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.utils.constants import EMBEDDING_LAYER_NAMES

from ..errors import listed
from ..lora_keys import PARAM_SUFFIXES, split_lora_key, split_lora_matrix_key
from ..names import PEFT_KEY_PREFIX


def _full_weight_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The modules whose whole weights the adapter holds (``modules_to_save``, saved embedding layers), sorted."""
    return sorted(
        {
            key[len(PEFT_KEY_PREFIX) :].rsplit(".", 1)[0]
            for key in tensors
            if key.startswith(PEFT_KEY_PREFIX)
            and split_lora_matrix_key(key) is None
            and "." in key[len(PEFT_KEY_PREFIX) :]
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
        if key.rsplit(".", 1)[-1] in PARAM_SUFFIXES and not tensors[key].is_floating_point()
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


__all__ = ["lost_modules_to_save", "modules_to_save_problems", "saved_modules"]
