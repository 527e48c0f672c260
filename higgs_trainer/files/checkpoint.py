"""Read a training checkpoint's full weights lazily, and find the LoRA adapter inside them.

``Trainer`` saves a plain ``nn.Module`` wrapper as its whole state dict (``model.safetensors``,
sharded ``model-*.safetensors`` with an index, or ``pytorch_model.bin``), with the LoRA tensors
under a wrapper prefix: ``model.base_model.model.<module>.lora_A.default.weight``. Only the
safetensors headers are read to find them (a pickle is memory-mapped, with ``weights_only=True``),
and only the LoRA tensors are copied out, so memory and time follow the adapter, not the checkpoint.

``lora_alpha`` is not in the weights: `find_lora_settings` takes it from the caller or from
files the run saved, and refuses rather than guess.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, UsageError, first_line, listed
from ..lora_keys import split_lora_key
from ..names import (
    ADAPTER_DIRNAME,
    LORA_PAIRS,
    PEFT_KEY_PREFIX,
    PICKLE_INDEX,
    PICKLE_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    SAFETENSORS_NAME,
)
from ..training.discovery import canonical_name
from .runs import checkpoint_like_dirs, holds_adapter_files
from .safetensors_files import StoredTensor, read_stored_tensors, read_tensor, weight_files

logger = logging.getLogger(__name__)


def progress_bar(total: int, desc: str, unit: str = "tensor") -> tqdm:
    """A tqdm progress bar on stderr that stays quiet when stderr is not a terminal.

    Examples:
        >>> with progress_bar(3, "reading") as bar:
        ...     _ = bar.update(3)
    """
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False)


# reading weights


class CheckpointWeights:
    """The tensors of a checkpoint's full weights, read only when asked for.

    Opens ``model.safetensors``, a sharded safetensors index, ``pytorch_model.bin`` or a sharded
    pickle index. Keys and shapes come from the safetensors headers; pickles are loaded with
    ``torch.load(weights_only=True, mmap=True)``, so nothing is copied until `read`.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from safetensors.torch import save_file
        >>> wrapper = torch.nn.Module()
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> Path("out/checkpoint-500").mkdir(parents=True)
        >>> save_file(wrapper.state_dict(), "out/checkpoint-500/model.safetensors")
        >>> with CheckpointWeights("out/checkpoint-500") as weights:
        ...     lora = weights.read([k for k in weights.shapes if ".lora_" in k])
        >>> sorted(lora)
        ['model.base_model.model.q_proj.lora_A.default.weight', 'model.base_model.model.q_proj.lora_B.default.weight']
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files = _weight_files(self.directory)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._file_of: dict[str, Path] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        safetensors = [f for f in self.files if f.suffix == ".safetensors"]  # all or none of them
        self._stored: dict[str, StoredTensor] = (
            read_stored_tensors(self.directory, safetensors, "the checkpoint") if safetensors else {}
        )
        for key, tensor in self._stored.items():
            self.shapes[key], self._file_of[key] = tensor.shape, tensor.file
        for file in self.files:
            if file.suffix == ".safetensors":
                continue
            self._pickles[file] = state = _load_pickle(file)
            for key, value in state.items():
                if key in self.shapes:
                    raise CheckpointError(
                        f"cannot load the checkpoint from {self.directory}: tensor {key!r} is stored twice "
                        f"({self._file_of[key].name} and {file.name}); keep one copy"
                    )
                self.shapes[key], self._file_of[key] = tuple(value.shape), file

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of each tensor as stored, from the headers (a pickle's from its memory map)."""
        dtypes = {key: tensor.torch_dtype for key, tensor in self._stored.items()}
        dtypes.update({key: value.dtype for state in self._pickles.values() for key, value in state.items()})
        return dtypes

    @property
    def num_bytes(self) -> int:
        """Bytes on disk of the weight files."""
        return sum(f.stat().st_size for f in self.files)

    def read(self, keys: Iterable[str], desc: str = "reading LoRA tensors") -> dict[str, torch.Tensor]:
        """Copies of the tensors under ``keys``, each file opened once.

        Examples:
            ```python
            weights.read(["model.base_model.model.lm_head.weight"])
            # {'model.base_model.model.lm_head.weight': tensor(...)}
            ```
        """
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self._file_of[key]].append(key)
        tensors: dict[str, torch.Tensor] = {}
        with progress_bar(sum(len(v) for v in by_file.values()), desc) as bar:
            for file, file_keys in by_file.items():
                if file in self._pickles:
                    for key in file_keys:
                        tensors[key] = self._pickles[file][key].clone()  # out of the memory map
                        bar.update()
                    continue
                for key in file_keys:
                    tensors[key] = read_tensor(self._stored[key])
                    bar.update()
        return tensors

    def close(self) -> None:
        """Release the memory maps of pickled weights."""
        self._pickles.clear()

    def __enter__(self) -> CheckpointWeights:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _weight_files(directory: Path) -> list[Path]:
    """The full-weight files of a checkpoint directory, or a clear error saying why there are none."""
    files = weight_files(directory, SAFE_INDEX, SAFE_WEIGHTS) or weight_files(directory, PICKLE_INDEX, PICKLE_WEIGHTS)
    if files:
        return files
    if holds_adapter_files(directory):
        raise CheckpointError(
            f"{directory} holds an adapter ({SAFETENSORS_NAME}), not full weights: nothing to extract; "
            "check it with `higgs-trainer verify`"
        )
    checkpoints = sorted(p.name for p in checkpoint_like_dirs(directory))
    if checkpoints:
        raise CheckpointError(
            f"{directory} is a run directory without full weights of its own; pass one of its checkpoints: "
            f"{listed(checkpoints)}"
        )
    if (directory / ADAPTER_DIRNAME).is_dir():
        raise CheckpointError(
            f"{directory} holds only {ADAPTER_DIRNAME}/ (an adapter-only checkpoint): nothing to extract; "
            f"use {directory / ADAPTER_DIRNAME}"
        )
    raise CheckpointError(
        f"{directory} is not a checkpoint: none of {SAFE_WEIGHTS}, {SAFE_INDEX}, {PICKLE_WEIGHTS}, {PICKLE_INDEX}"
    )


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped, with ``weights_only=True``: a malicious pickle runs nothing."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(f"cannot read {file} safely (or it is corrupt): {first_line(exc)}") from exc
        logger.warning("%s is in torch's legacy format, which cannot be memory-mapped: loading all of it", file)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc2:
            raise CheckpointError(f"cannot read {file} safely (or it is corrupt): {first_line(exc2)}") from exc2
    except Exception as exc:  # UnpicklingError for refused globals, EOFError/zip errors for truncated files
        raise CheckpointError(f"cannot read {file} safely (or it is corrupt): {first_line(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return state


# finding the adapter in the keys


@dataclass(frozen=True)
class LoraLayout:
    """Where a PEFT component's LoRA tensors sit in a full checkpoint, and what they imply.

    ``keys`` maps checkpoint keys to adapter-file keys (``base_model.model.<module>.lora_A.weight``);
    ``ranks`` gives each LoRA module's rank, ``r`` the most common one;
    ``target_modules`` reproduces exactly the LoRA modules found (leaf names when those are exact
    in this model, otherwise a full-match regex of the module paths).

    Examples:
        >>> layout = find_lora_layout({
        ...     "model.base_model.model.q_proj.lora_A.default.weight": (4, 8),
        ...     "model.base_model.model.q_proj.lora_B.default.weight": (8, 4),
        ... })
        >>> layout.prefix, layout.r, layout.target_modules
        ('model.', 4, ['q_proj'])
    """

    prefix: str
    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    other_modules: frozenset[str]
    ranks: dict[str, int]
    r: int
    target_modules: list[str] | str
    lora_bias: bool
    modules_to_save: tuple[str, ...] = ()  # modules whose whole trained copy (peft's modules_to_save) is in keys

    @property
    def modules(self) -> tuple[str, ...]:
        """The LoRA modules' paths in the base model, sorted."""
        return tuple(sorted(self.ranks))

    @property
    def rank_pattern(self) -> dict[str, int]:
        """peft's ``rank_pattern`` for the modules whose rank is not ``r``.

        Anchored: peft matches a key against the end of a module path (``(.*\\.)?(key)$``), so a bare
        ``layers.0.self_attn.q_proj`` would also set the rank of ``audio_tower.layers.0.self_attn.q_proj``.
        """
        return {"^" + re.escape(module): rank for module, rank in self.ranks.items() if rank != self.r}


def _module_of(path: str) -> str:
    """``layers.0.q_proj.base_layer.weight`` -> ``layers.0.q_proj``: the module a parameter of a LoRA model belongs to."""
    parts = path.split(".")[:-1]
    for i, part in enumerate(parts):
        if part in ("base_layer", "modules_to_save", "original_module") or part.startswith("lora_"):
            return ".".join(parts[:i])
    return ".".join(parts)


class _CheckpointLoraKey(NamedTuple):
    prefix: str  # the wrapper's, before base_model.model. ('model.')
    module: str  # the module's path in the base model
    part: str  # lora_A, lora_B, lora_embedding_A or lora_embedding_B
    adapter: str  # the adapter's name ('default')
    param: str  # '.weight', '.bias' or '' (an embedding's bare lora_embedding_A)


def _checkpoint_lora_key(name: str) -> _CheckpointLoraKey | None:
    """``<prefix>base_model.model.<module>.<lora matrix>.<adapter>[.weight|.bias]`` in parts; None for other keys."""
    lora = split_lora_key(name)
    if lora is None or not lora.is_matrix or not 1 <= len(lora.rest) <= 2:
        return None
    if len(lora.rest) == 2 and lora.rest[1] not in ("weight", "bias"):
        return None
    segments = lora.module.split(".")
    for i in range(len(segments) - 2):  # the first base_model.model. followed by a module
        if segments[i : i + 2] == ["base_model", "model"]:
            prefix = "".join(f"{s}." for s in segments[:i])
            param = f".{lora.rest[1]}" if len(lora.rest) == 2 else ""
            return _CheckpointLoraKey(prefix, ".".join(segments[i + 2 :]), lora.part, lora.rest[0], param)
    return None


def find_lora_layout(shapes: Mapping[str, tuple[int, ...]], prefix: str | None = None) -> LoraLayout:
    """Find the LoRA tensors among a checkpoint's keys and infer prefix, modules, ``r`` and targets from keys and shapes.

    ``prefix`` (e.g. ``"model.text_model."``) chooses when the checkpoint holds LoRA tensors of
    several PEFT components. Raises `CheckpointError` for checkpoints without LoRA tensors,
    unpaired or empty matrices and layouts extract does not handle (DoRA, trainable tokens). The
    trained copies of ``modules_to_save`` modules (``<module>.modules_to_save.<adapter>.weight``) are
    taken too, as ``base_model.model.<module>.weight``, the key peft saves them under.

    Examples:
        >>> find_lora_layout({
        ...     "model.base_model.model.q.lora_A.default.weight": (4, 8),
        ...     "model.base_model.model.q.lora_B.default.weight": (8, 4),
        ...     "model.base_model.model.q.base_layer.weight": (8, 8),
        ... }).keys
        {'model.base_model.model.q.lora_A.default.weight': 'base_model.model.q.lora_A.weight', 'model.base_model.model.q.lora_B.default.weight': 'base_model.model.q.lora_B.weight'}
    """
    names = {key: canonical_name(key) for key in shapes}  # once per key: checkpoints have thousands
    matches = _lora_keys_by_section(names, len(shapes))
    chosen, adapter = _choose_section(matches, prefix)
    section = chosen + PEFT_KEY_PREFIX
    keys, out_shapes, saved_modules = _modules_to_save(names, shapes, section, adapter)
    parts, lora_bias = _lora_tensors(matches[(chosen, adapter)], shapes, keys, out_shapes)
    ranks = _ranks(parts)
    r = sorted(Counter(ranks.values()).items(), key=lambda item: (-item[1], -item[0]))[0][0]
    target_modules, others = _target_modules(tuple(sorted(ranks)), names, section)
    return LoraLayout(
        prefix=chosen,
        keys=keys,
        shapes=out_shapes,
        other_modules=others,
        ranks=ranks,
        r=r,
        target_modules=target_modules,
        lora_bias=lora_bias,
        modules_to_save=tuple(sorted(saved_modules)),
    )


def _lora_keys_by_section(
    names: Mapping[str, str], num_keys: int
) -> dict[tuple[str, str], dict[str, _CheckpointLoraKey]]:
    """The checkpoint's LoRA keys by (wrapper prefix, adapter name); `CheckpointError` for LoRA variants or none at all."""
    matches: dict[tuple[str, str], dict[str, _CheckpointLoraKey]] = defaultdict(dict)
    odd = []
    for key, name in names.items():
        match = _checkpoint_lora_key(name)
        if match:
            matches[(match.prefix, match.adapter)][key] = match
        elif any(part.startswith(("lora_", "trainable_tokens_", "token_adapter")) for part in name.split(".")):
            odd.append(key)
    if odd:
        raise CheckpointError(
            f"{len(odd)} adapter key(s) that are not lora_A/lora_B weights (DoRA magnitude vectors, trainable "
            f"token deltas and other LoRA variants are not supported by extract): {listed(odd)}"
        )
    if not matches:
        raise CheckpointError(
            f"no LoRA tensors among the checkpoint's {num_keys} keys (no '...base_model.model.<module>.lora_A.<adapter>' "
            "key): it was not trained with LoRA, or the adapter was merged before saving"
        )
    return matches


def _choose_section(matches: Mapping[tuple[str, str], object], prefix: str | None) -> tuple[str, str]:
    """The one (prefix, adapter) to extract: ``prefix`` when given, else the only one there is."""
    prefixes = sorted({p for p, _ in matches})
    if prefix is not None:
        wanted = prefix if not prefix or prefix.endswith(".") else prefix + "."
        if wanted not in prefixes:
            raise UsageError(f"no LoRA tensors under prefix {wanted!r}; found under: {listed(prefixes)}")
        prefixes = [wanted]
    if len(prefixes) > 1:
        raise UsageError(f"LoRA tensors under {len(prefixes)} prefixes ({listed(prefixes)}); choose one with --prefix")
    chosen = prefixes[0]
    adapters = sorted(a for p, a in matches if p == chosen)
    if len(adapters) > 1:
        raise CheckpointError(
            f"{len(adapters)} adapters under prefix {chosen!r} ({listed(adapters)}); extract handles one"
        )
    return chosen, adapters[0]


def _modules_to_save(
    names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], section: str, adapter: str
) -> tuple[dict[str, str], dict[str, tuple[int, ...]], set[str]]:
    """``(keys, shapes, modules)`` of the trained ``modules_to_save`` copies under ``section``, keyed as peft saves them."""
    keys: dict[str, str] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    saved_modules, other_adapter, empty_saved = set(), [], []
    for key, name in names.items():
        if not name.startswith(section) or ".modules_to_save." not in name:
            continue
        module, rest = name[len(section) :].split(".modules_to_save.", 1)
        owner, _, param = rest.partition(".")
        if owner != adapter:
            other_adapter.append(key)
            continue
        keys[key] = f"{PEFT_KEY_PREFIX}{module}.{param}"
        out_shapes[keys[key]] = tuple(shapes[key])
        saved_modules.add(module)
        if 0 in shapes[key]:
            empty_saved.append(key)
    if other_adapter:
        raise CheckpointError(
            f"modules_to_save tensors of another adapter than {adapter!r} (extract handles one): {listed(other_adapter)}"
        )
    if empty_saved:
        raise CheckpointError(
            f"{len(empty_saved)} modules_to_save tensor(s) are empty (partitioned ZeRO-3 save?): {listed(empty_saved)}"
        )
    return keys, out_shapes, saved_modules


def _lora_tensors(
    matches: Mapping[str, _CheckpointLoraKey],
    shapes: Mapping[str, tuple[int, ...]],
    keys: dict[str, str],
    out_shapes: dict[str, tuple[int, ...]],
) -> tuple[dict[str, dict[str, tuple[int, ...]]], bool]:
    """Add the LoRA tensors' adapter keys and shapes to ``keys`` / ``out_shapes``; ``(matrix shapes by module, lora_bias)``."""
    parts: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    lora_bias = False
    for key, match in sorted(matches.items()):
        module, part, param = match.module, match.part, match.param
        target = f"{PEFT_KEY_PREFIX}{module}.{part}{param}"
        keys[key] = target
        out_shapes[target] = tuple(shapes[key])
        if param == ".bias":
            lora_bias = True
        else:
            parts[module][part] = tuple(shapes[key])
    return parts, lora_bias


def _ranks(parts: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, int]:
    """Each LoRA module's rank, from its pair's shapes; `CheckpointError` for unpaired, empty or disagreeing pairs."""
    unpaired, empty, bad_rank = [], [], []
    ranks: dict[str, int] = {}
    for module, found in sorted(parts.items()):
        for a_part, b_part in LORA_PAIRS.items():
            a, b = found.get(a_part), found.get(b_part)
            if a is None and b is None:
                continue
            if a is None or b is None:
                unpaired.append(f"{module}.{a_part if a is None else b_part}")
                continue
            if 0 in a or 0 in b:
                empty.append(f"{module} (A {a}, B {b})")
            elif len(b) < 2 or a[0] != b[1]:
                bad_rank.append(f"{module} (A {a}, B {b})")
            else:
                ranks[module] = a[0]
    if unpaired:
        raise CheckpointError(f"{len(unpaired)} LoRA matrix(es) are missing from the checkpoint: {listed(unpaired)}")
    if empty:
        raise CheckpointError(
            f"{len(empty)} LoRA pair(s) hold empty tensors (partitioned ZeRO-3 save?): {listed(empty)}"
        )
    if bad_rank:
        raise CheckpointError(f"{len(bad_rank)} LoRA pair(s) have ranks that disagree: {listed(bad_rank)}")
    return ranks


def _target_modules(
    modules: tuple[str, ...], names: Mapping[str, str], section: str
) -> tuple[list[str] | str, frozenset[str]]:
    """``(target_modules, the section's other modules)``: leaf names, or exact paths where a leaf also names others."""
    all_modules = {_module_of(name[len(section) :]) for name in names.values() if name.startswith(section)}
    others = frozenset(all_modules - set(modules))
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    if any(m.rsplit(".", 1)[-1] in leaves for m in others):
        # a leaf name also names modules without LoRA: only the exact paths reproduce the targets
        return "^(" + "|".join(re.escape(m) for m in modules) + ")$", others
    return sorted(leaves), others


__all__ = [
    "CheckpointWeights",
    "LoraLayout",
    "find_lora_layout",
    "progress_bar",
]
