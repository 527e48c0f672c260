"""Merge a LoRA adapter into a safetensors base one tensor at a time (the default of ``higgs-trainer merge``).

The base model is never built: its ``config.json`` is copied (with the dtype recorded) and its
weights are read tensor by tensor from ``model.safetensors`` (or the shards an index names). A
weight with a LoRA pair gets peft's delta added, a ``modules_to_save`` weight (or an embedding
peft saved beside its LoRA) is replaced by the adapter's, and every other tensor's bytes are
copied unchanged. Memory follows the largest tensor, not the model; time follows the disk.

The arithmetic is peft's ``merge_and_unload`` after ``PeftModel.from_pretrained`` (peft 0.16 and
0.21): the adapter weights are held in float32 (``autocast_adapter_dtype``), a linear layer's
delta ``transpose(B @ A, fan_in_fan_out) * scaling`` is computed in float32 and added in place to
the weight (``weight += delta``: the sum rounded once to the weight's dtype), an embedding's delta
is cast to the weight's dtype first (``weight += delta.to(dtype)``), and ``lora_bias`` adds
``bias_B * scaling``. ``scaling`` is ``lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA) with ``r`` and
``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` through peft's own ``get_pattern_key``.
Options whose merge this module does not reproduce exactly (DoRA, other LoRA variants, weight
initialisations that change the base, trainable tokens, ...) are refused with an error naming the
in-memory merge, which goes through peft itself.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft.utils.other import get_pattern_key
from transformers.utils.hub import convert_file_size_to_int

from .atomic import staged_directory
from .checkpoint import progress_bar
from .errors import AdapterVerificationError, CheckpointError, HiggsTrainerError, MergeError, first_line, listed
from .lora_keys import split_lora_key
from .merge_compare import compare_outputs
from .names import PEFT_KEY_PREFIX, SAFE_INDEX, SAFE_WEIGHTS

logger = logging.getLogger(__name__)

IN_MEMORY = "merge in memory instead (`higgs-trainer merge --in-memory`, or merge_adapter(..., streaming=False))"
# safetensors' dtype names and the torch dtypes they stand for.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES_OF_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on a header's size
_COPY_CHUNK = 64 * 2**20
_IN_FLIGHT = 2  # computed tensors waiting for the writer thread, at most
_READ_AHEAD = 2  # base tensors read ahead of the computation, at most
_BLOCK_ROWS = 64  # rows of a linear weight merged at a time (see merge_linear)
_PIPELINE_BYTES = 96 * 2**20  # bytes read ahead, or waiting to be written, at most (one larger tensor at a time)
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


# the base's weights


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are (absolute offsets) and what they hold.

    Examples:
        >>> t = StoredTensor("lm_head.weight", Path("model.safetensors"), "BF16", (8, 4), 128, 192)
        >>> t.num_bytes, t.torch_dtype
        (64, torch.bfloat16)
    """

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def safetensors_weight_files(base_dir: Path) -> list[Path] | None:
    """The safetensors files of a model directory (``model.safetensors`` or an index's shards); None when it has none.

    Examples:
        >>> safetensors_weight_files(Path("/"))  # no model here
    """
    index = base_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map[key] for key in weight_map))  # first-seen order
            if not all(isinstance(n, str) and n and "/" not in n for n in names):
                raise ValueError("weight_map values must be file names in the model directory")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index: {first_line(exc)}") from exc
        missing = [n for n in names if not (base_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} shard(s) that are missing: {listed(missing)}")
        return [base_dir / n for n in sorted(names)]
    if (base_dir / SAFE_WEIGHTS).is_file():
        return [base_dir / SAFE_WEIGHTS]
    return None


def read_safetensors_header(file: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file in the order of their bytes, checked against the file's size.

    Read by hand (8-byte length, JSON header): ``safe_open`` does not tell where a tensor's bytes
    are, and the merge copies unchanged tensors byte for byte without loading them.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
        start = 8 + length
        tensors = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (start + int(offset) for offset in entry["data_offsets"])
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which this merge does not handle")
            shape = tuple(int(d) for d in entry["shape"])
            if end > size or end - begin != math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize:
                raise ValueError(f"tensor {name!r} lies beyond the end of the file")
            tensors.append(StoredTensor(name, file, entry["dtype"], shape, begin, end))
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(
            f"cannot load the base model from {file.parent}: {file.name} is truncated or corrupt ({first_line(exc)})"
        ) from exc
    return sorted(tensors, key=lambda t: t.begin)


def read_base_tensors(base_dir: Path, files: Iterable[Path]) -> dict[str, StoredTensor]:
    """Every tensor of the base's safetensors files, by name, in file and byte order."""
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for tensor in read_safetensors_header(file):
            if tensor.name in tensors:
                raise CheckpointError(f"tensor {tensor.name!r} is stored twice in {base_dir}")
            tensors[tensor.name] = tensor
    index = base_dir / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = [k for k, f in weight_map.items() if k not in tensors or tensors[k].file.name != f]
        if wrong:
            raise CheckpointError(f"{index} maps {len(wrong)} tensor(s) to shards that lack them: {listed(wrong)}")
    return tensors


def read_tensor(tensor: StoredTensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor's values, read with ``pread`` into memory of its own (or the uint8 buffer ``into``, of its size).

    Not ``safe_open(...).get_tensor``: that maps the file, and the pages of every tensor read stay
    in the process's resident memory while the file is open, so memory would grow with the model.
    """
    buffer = torch.empty(tensor.num_bytes, dtype=torch.uint8) if into is None else into  # bytearray would zero it
    view = memoryview(buffer.numpy())
    with open(tensor.file, "rb", buffering=0) as handle:
        done = 0
        while done < tensor.num_bytes:
            count = os.preadv(handle.fileno(), [view[done:]], tensor.begin + done)
            if count <= 0:
                raise CheckpointError(f"{tensor.file} ended inside tensor {tensor.name!r} (truncated?)")
            done += count
    return buffer.view(tensor.torch_dtype).reshape(tensor.shape)


# the adapter


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
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        refused.append(f"init_lora_weights={init!r}")
    for name, value in config.items():
        if name not in _HANDLED_FIELDS and name != "use_dora" and value not in (None, False, 0, "", [], {}):
            refused.append(name)
    if refused:
        raise MergeError(
            f"the streaming merge does not reproduce the adapter at {adapter_dir}'s {', '.join(refused)} exactly; "
            + IN_MEMORY
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
        plan = plan_merge(config, read_adapter_tensors(adapter), read_base_tensors(base, files), adapter)
        sorted(plan.deltas)[0]  # 'layers.0.self_attn.q_proj.weight'
        ```
    """
    check_streamable_config(config, adapter_dir)
    plan = MergePlan()
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

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    configured_fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    absent = [module for module in pairs if f"{module}.weight" not in stored]
    if absent:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model: {len(absent)} LoRA module(s) are not in the "
            f"base model (no weight of that name in its safetensors): {listed(absent)}"
        )
    ambiguous, contradicting = [], []
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            raise MergeError(
                f"the streaming merge handles 2-D LoRA pairs of linear and embedding layers; {module!r} is not one; "
                + IN_MEMORY
            )
        target = f"{module}.weight"
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r"))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha"))
        if not isinstance(r, int) or r <= 0 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterVerificationError(
                f"the LoRA pair of {module!r} has rank {a.shape[0]}, the adapter config says r={r}"
            )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # peft holds the adapter weights in float32 (PeftModel.from_pretrained's autocast_adapter_dtype upcasts
        # fp16/bf16 ones; its state-dict load copies the file's values into them).
        delta = LoraDelta(target, a.to(torch.float32), b.to(torch.float32), scaling, embedding=embedding)
        out_in = (int(b.shape[0]), int(a.shape[1]))
        if embedding:
            if stored[target].shape != out_in[::-1]:
                raise AdapterVerificationError(
                    f"the embedding LoRA of {module!r} makes a {out_in[::-1]} delta, its weight is {stored[target].shape}"
                )
        else:
            transposed = _orientation(module, stored[target], out_in)
            if transposed is None:
                ambiguous.append(delta)
            else:
                delta.fan_in_fan_out = transposed
                if transposed != configured_fan_in_fan_out:
                    contradicting.append(module)
        bias = parts.get("lora_B.bias")
        if bias is not None:
            bias_target = f"{module}.bias"
            if bias_target not in stored:
                raise MergeError(
                    f"the adapter at {adapter_dir} has lora_bias for {module!r}, whose layer has no bias in the base"
                )
            delta.bias, delta.bias_target = bias.to(torch.float32), bias_target
            plan.bias[bias_target] = delta
        plan.deltas[target] = delta
    if ambiguous and contradicting:
        raise MergeError(
            f"the adapter's fan_in_fan_out={configured_fan_in_fan_out} does not hold for {listed(contradicting)}, so "
            f"the layout of the square weight(s) {listed(d.target for d in ambiguous)} is unknown without the model; "
            + IN_MEMORY
        )
    for delta in ambiguous:
        delta.fan_in_fan_out = configured_fan_in_fan_out
    return plan


class Scratch:
    """Reusable float32 buffers, grown to the largest merged weight: fresh multi-MB tensors cost page faults.

    It also remembers, per shape of LoRA pair, whether `merge_linear` may compute the product a
    block of rows at a time (`blocks_reproduce`).
    """

    def __init__(self) -> None:
        self._buffers = [torch.empty(0), torch.empty(0)]
        self.blocks_exact: dict[tuple[int, int, int], bool] = {}

    def get(self, which: int, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape)
        if self._buffers[which].numel() < size:
            self._buffers[which] = torch.empty(size)
        return self._buffers[which][:size].view(shape)


def add_float32(weight: torch.Tensor, delta: torch.Tensor, wide: torch.Tensor | None = None) -> None:
    """``weight += delta`` for a float32 ``delta``: peft's in-place add, the same bits, three times faster on CPU.

    torch computes a bf16/fp16 ``weight += fp32`` in float32 and rounds the sum to the weight's
    dtype (round to nearest even), element by element in a slow mixed-dtype loop. The same sum
    is computed here in vectorised steps: the weight widened to float32 (exact) into ``wide``
    (a float32 buffer of the weight's shape), ``+ delta``, and the result rounded back by ``copy_``
    (also round to nearest even).

    Examples:
        >>> weight = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
        >>> add_float32(weight, torch.tensor([0.00390625, 0.5]))
        >>> weight.tolist()  # 1 + 2**-8 rounds to the even 1.0 in bf16, as torch's mixed add does
        [1.0, 2.5]
    """
    if weight.dtype == torch.float32:
        weight += delta
        return
    wide = torch.empty(weight.shape) if wide is None else wide
    wide.copy_(weight)
    wide += delta
    weight.copy_(wide)


def row_blocks(rows: int, size: int = _BLOCK_ROWS) -> list[tuple[int, int]]:
    """``[begin, end)`` row ranges of ``size`` rows covering ``rows``; the last one takes the remainder (never fewer).

    Examples:
        >>> row_blocks(200, 64)
        [(0, 64), (64, 128), (128, 200)]
    """
    starts = list(range(0, rows, size))
    if len(starts) > 1 and rows - starts[-1] < size:
        starts.pop()
    return list(zip(starts, [*starts[1:], rows], strict=True))


def blocks_reproduce(delta: LoraDelta, scratch: Scratch) -> bool:
    """Whether ``B @ A`` computed in `row_blocks` gives the bits of the whole product for this shape; probed once.

    The rows of a matrix product do not depend on one another, and the BLAS (MKL in torch's CPU
    wheels) computes each element of a block of 64 rows or more with the same kernel as the whole
    product (a single row does differ: it goes to a matrix-vector kernel). That is an implementation
    property, not a guarantee, so it is checked on each shape's first pair: if the blocks differ
    from the whole product in any bit, that shape is merged whole (peft's way, only slower).
    """
    shape = (delta.b.shape[0], delta.a.shape[1], delta.a.shape[0])
    if shape not in scratch.blocks_exact:
        whole = delta.b @ delta.a
        blocks = torch.empty_like(whole)
        for begin, end in row_blocks(shape[0]):
            torch.mm(delta.b[begin:end], delta.a, out=blocks[begin:end])
        scratch.blocks_exact[shape] = torch.equal(whole, blocks)
        if not scratch.blocks_exact[shape]:
            logger.info("LoRA products of shape %s are merged whole (blocks of rows differ in the last bit)", shape)
    return scratch.blocks_exact[shape]


def merge_linear(weight: torch.Tensor, delta: LoraDelta, scratch: Scratch) -> None:
    """peft's ``Linear.merge``: ``weight += transpose(B @ A, fan_in_fan_out) * scaling`` (float32, rounded once).

    Computed a block of `_BLOCK_ROWS` rows at a time where that gives the same bits
    (`blocks_reproduce`), so the float32 product and sum of a block stay in the CPU's cache instead
    of passing through memory several times: 40% less time for a 5632x2048 bf16 weight on this
    project's benchmark machine. The operations on each element are the same either way.
    """
    rows = weight.shape[0]
    if delta.fan_in_fan_out or rows < 2 * _BLOCK_ROWS or not blocks_reproduce(delta, scratch):
        product = delta.delta(scratch.get(0, (delta.b.shape[0], delta.a.shape[1])))
        add_float32(weight, product, scratch.get(1, tuple(weight.shape)))
        return
    columns = weight.shape[1]
    for begin, end in row_blocks(rows):
        product = torch.mm(delta.b[begin:end], delta.a, out=scratch.get(0, (end - begin, columns)))
        product.mul_(delta.scaling)  # `* scaling` in place: the same products
        add_float32(weight[begin:end], product, scratch.get(1, (end - begin, columns)))


def output_dtype(stored: StoredTensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``stored`` is written in: ``dtype`` for floating-point tensors when given, else its own."""
    return dtype if dtype is not None and stored.torch_dtype.is_floating_point else stored.torch_dtype


def needs_base_values(name: str, plan: MergePlan) -> bool:
    """Whether merging ``name`` reads the base's values (a replaced weight is the adapter's, whatever the base held)."""
    return name not in plan.replace


def merged_tensor(
    name: str,
    stored: StoredTensor,
    plan: MergePlan,
    dtype: torch.dtype | None,
    scratch: Scratch | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged value of base tensor ``name``, computed as peft's merge computes it.

    ``base`` is the tensor's value as stored, when already read (`read_tensor`); it is changed in place.
    """
    wanted = output_dtype(stored, dtype)
    if name in plan.replace:  # the module's weight loaded from the adapter file (copy_ casts to the weight's dtype)
        tensor = torch.empty(stored.shape, dtype=wanted).copy_(plan.replace[name])
    else:
        tensor = (read_tensor(stored) if base is None else base).to(wanted)
    delta = plan.deltas.get(name)
    if delta is not None:
        with torch.no_grad():
            if delta.embedding:  # peft's Embedding.merge: weight += delta.to(weight dtype)
                tensor += delta.delta().to(tensor.dtype)
            else:  # peft's Linear.merge: weight += delta (float32; rounded once into the weight's dtype)
                merge_linear(tensor, delta, Scratch() if scratch is None else scratch)
    bias = plan.bias.get(name)
    if bias is not None:
        with torch.no_grad():
            tensor += bias.bias * bias.scaling
    if (name in plan.deltas or name in plan.bias) and not _is_finite(tensor):
        raise MergeError(f"the merged {name!r} holds NaN or inf (adapter too large for the dtype?)")
    return tensor


def _is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``: its min and max (which propagate NaN) are finite; a single fast pass."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


# writing


def default_max_shard_size() -> str | int:
    """The ``max_shard_size`` default of the installed transformers' ``save_pretrained`` ("5GB" in 4.46, "50GB" in 5.x)."""
    return inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def shard_plan(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_size`` bytes, in order (a larger tensor alone).

    Examples:
        >>> shard_plan({"a": 4, "b": 4, "c": 9, "d": 1}, 8)
        [['a', 'b'], ['c'], ['d']]
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return [s for s in shards if s] or [[]]


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """A safetensors header (length + JSON, padded to 8 bytes) for (name, dtype, shape, bytes) in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _copy_bytes(source: StoredTensor, out, begin: int, end: int) -> None:
    """Append the tensor's bytes to ``out`` without holding them: ``copy_file_range``, else chunked ``pread``."""
    with open(source.file, "rb", buffering=0) as handle:
        position, left = source.begin, source.num_bytes
        while left:
            try:
                count = os.copy_file_range(handle.fileno(), out.fileno(), min(left, _COPY_CHUNK), position)
            except (AttributeError, OSError):  # no copy_file_range here (another OS, or across file systems)
                data = os.pread(handle.fileno(), min(left, _COPY_CHUNK), position)
                count = os.write(out.fileno(), data) if data else 0
            if count <= 0:
                raise CheckpointError(f"{source.file} ended inside tensor {source.name!r} (truncated?)")
            position += count
            left -= count
    _start_writeback(out, begin, end)


@contextlib.contextmanager
def _one_compute_thread() -> Iterator[None]:
    """torch's intra-op threads set to one while merging, restored after.

    The arithmetic is a few memory-bound passes per weight and rank-r products, and the writer
    thread needs a core for the I/O; OpenMP workers spinning on a busy machine made the merge three
    times slower (2.1 s vs 6.7 s on 2 shared cores, ``benchmarks/README.md``). The results do not
    depend on it: elementwise kernels and the products' per-element sums are the same either way
    (the tests compare with peft's merge running on all threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_all(out, data: memoryview) -> None:
    while data:
        data = data[os.write(out.fileno(), data) :]


def _write_tensor(out, tensor: torch.Tensor, begin: int, end: int) -> None:
    _write_all(out, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    _start_writeback(out, begin, end)


class ReadAhead:
    """The base's values of ``tensors``, in order, read by ``pool`` ahead of their use.

    At most ``_READ_AHEAD`` tensors and ``_PIPELINE_BYTES`` wait read; a tensor larger than that
    is read when it is asked for. Reading on a thread of its own lets the disk work while this
    thread computes: the kernel's readahead (``posix_fadvise(WILLNEED)``) was tried first and left
    the reads on the computing thread's path (2.2 s of 7.5 s at 2.9 GiB, ``benchmarks/README.md``).

    The buffers read into are handed back (`give_back`) once written and reused for tensors of
    the same size. Freshly allocated for each tensor, they made the peak memory swing by 120 MiB
    between identical runs (the allocator's per-thread heaps) and cost a page fault per 4 KiB.
    """

    def __init__(self, tensors: Iterable[StoredTensor], pool: ThreadPoolExecutor) -> None:
        self._waiting = deque(tensors)
        self._reading: deque[tuple[StoredTensor, torch.Tensor, Future]] = deque()
        self._bytes = 0
        self._pool = pool
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def _buffer(self, num_bytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(num_bytes)
            if free:
                self._free_bytes -= num_bytes
                return free.pop()
        return torch.empty(num_bytes, dtype=torch.uint8)

    def give_back(self, buffer: torch.Tensor) -> None:
        """Keep ``buffer`` (from `take`) for a later read, unless twice ``_PIPELINE_BYTES`` are kept already."""
        with self._lock:
            if self._free_bytes + buffer.numel() <= 2 * _PIPELINE_BYTES:
                self._free.setdefault(buffer.numel(), []).append(buffer)
                self._free_bytes += buffer.numel()

    def _fill(self) -> None:
        while (
            self._waiting
            and len(self._reading) < _READ_AHEAD
            and self._bytes + self._waiting[0].num_bytes <= _PIPELINE_BYTES
        ):
            tensor = self._waiting.popleft()
            buffer = self._buffer(tensor.num_bytes)
            self._reading.append((tensor, buffer, self._pool.submit(read_tensor, tensor, buffer)))
            self._bytes += tensor.num_bytes

    def take(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of ``name``, the next of the tensors in order, and the buffer holding them."""
        self._fill()
        if self._reading:
            tensor, buffer, future = self._reading.popleft()
            self._bytes -= tensor.num_bytes
            value = future.result()
        else:
            tensor = self._waiting.popleft()
            buffer = self._buffer(tensor.num_bytes)
            value = read_tensor(tensor, buffer)
        if tensor.name != name:
            raise RuntimeError(f"read {tensor.name!r} where {name!r} was next")  # a bug in the merge's ordering
        self._fill()
        return value, buffer


class Writes:
    """Writes queued for one writer thread, at most ``_IN_FLIGHT`` of them and ``_PIPELINE_BYTES`` (past one) waiting."""

    def __init__(self, pool: ThreadPoolExecutor, done: Callable[[], None]) -> None:
        self._pending: deque[tuple[Future, int]] = deque()
        self._bytes = 0
        self._pool = pool
        self._done = done

    def submit(self, num_bytes: int, write: Callable, *args) -> None:
        while self._pending and (
            len(self._pending) >= _IN_FLIGHT or self._bytes + num_bytes > _PIPELINE_BYTES or self._pending[0][0].done()
        ):
            self._finish_one()
        self._pending.append((self._pool.submit(write, *args), num_bytes))
        self._bytes += num_bytes

    def _finish_one(self) -> None:
        future, num_bytes = self._pending.popleft()
        future.result()
        self._bytes -= num_bytes
        self._done()

    def finish(self) -> None:
        while self._pending:
            self._finish_one()


def _start_writeback(out, begin: int, end: int) -> None:
    """Start writing bytes ``begin:end`` of ``out`` to the disk now, so the disk writes while the merge goes on.

    ``posix_fadvise(DONTNEED)`` starts the write-back of a range's dirty pages without waiting for
    it (Linux). Left alone, the kernel would hold the whole output in the page cache until the
    background threshold or the final fsync, which then waits for all of it.
    """
    if hasattr(os, "posix_fadvise") and end > begin:
        os.posix_fadvise(out.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)


def write_merged_weights(
    stored: Mapping[str, StoredTensor],
    plan: MergePlan,
    directory: Path,
    dtype: torch.dtype | None,
    max_shard_size: int,
    check: Future | None = None,
) -> int:
    """Write the merged tensors into ``directory`` as transformers shards them; return the bytes of tensor data.

    Each file's header is written first (every tensor's shape and dtype are known from the base),
    then each tensor's bytes in turn, so only the few tensors being read, computed or written are in
    memory: safetensors' ``save_file`` needs every tensor of a file in memory at once. A reader
    thread reads the base tensors to be merged ahead, this thread computes, a writer thread appends
    to the file in order. ``check`` (a running check of the base) stops the merge as soon as it fails.
    """
    sizes = {name: t.numel * output_dtype(t, dtype).itemsize for name, t in stored.items()}
    shards = shard_plan(sizes, max_shard_size)
    computed = {n for n, t in stored.items() if n in plan.touched or output_dtype(t, dtype) != t.torch_dtype}
    weight_map, total = {}, 0
    scratch = Scratch()
    order = [name for names in shards for name in names]
    with (
        progress_bar(len(stored), "merging") as bar,
        _one_compute_thread(),
        ThreadPoolExecutor(1, thread_name_prefix="merge-read") as reader,
    ):
        reads = ReadAhead((stored[n] for n in order if n in computed and needs_base_values(n, plan)), reader)
        for number, names in enumerate(shards, 1):
            file = SAFE_WEIGHTS if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            entries = [(n, _NAMES_OF_DTYPES[output_dtype(stored[n], dtype)], stored[n].shape, sizes[n]) for n in names]
            header = _header_bytes(entries)
            with (
                open(directory / file, "wb", buffering=0) as out,
                ThreadPoolExecutor(1, thread_name_prefix="merge-write") as writer,
            ):
                _write_all(out, memoryview(header))
                writes = Writes(writer, lambda: bar.update(1))

                def write(tensor: torch.Tensor, buffer: torch.Tensor | None, begin: int, end: int) -> None:
                    _write_tensor(out, tensor, begin, end)
                    if buffer is not None:
                        reads.give_back(buffer)

                offset = len(header)
                for name in names:
                    if check is not None and check.done():
                        check.result()  # raises the check's error
                    source = stored[name]
                    end = offset + sizes[name]
                    if name in computed:
                        base, buffer = reads.take(name) if needs_base_values(name, plan) else (None, None)
                        tensor = merged_tensor(name, source, plan, dtype, scratch, base).contiguous()
                        writes.submit(sizes[name], write, tensor, buffer, offset, end)
                        del tensor, base, buffer
                    else:
                        writes.submit(0, _copy_bytes, source, out, offset, end)
                    offset = end
                    weight_map[name] = file
                    total += sizes[name]
                writes.finish()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _dtype_of(stored: Mapping[str, StoredTensor], dtype: torch.dtype | None) -> torch.dtype | None:
    """The output's dtype: ``dtype``, else the floating dtype holding most of the base's parameters."""
    if dtype is not None:
        return dtype
    counts: dict[torch.dtype, int] = {}
    for t in stored.values():
        if t.torch_dtype.is_floating_point:
            counts[t.torch_dtype] = counts.get(t.torch_dtype, 0) + t.numel
    return max(counts, key=counts.get) if counts else None


def write_config(base_dir: Path, directory: Path, dtype_name: str) -> dict:
    """The base's ``config.json`` with the merged weights' dtype recorded (``torch_dtype``, and ``dtype`` if present)."""
    path = base_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    config["torch_dtype"] = dtype_name  # read by transformers 4.x and, as an alias of dtype, by 5.x
    if "dtype" in config:
        config["dtype"] = dtype_name
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def model_class_name(config: Mapping) -> str:
    """The class the config names (``architectures[0]``), else its ``model_type``."""
    architectures = config.get("architectures") or []
    return str(architectures[0]) if architectures else str(config.get("model_type", "unknown"))


# the merge


def stream_merge(
    base_dir: Path,
    adapter_dir: Path,
    output: Path,
    files: list[Path],
    *,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    stored: Mapping[str, StoredTensor],
    dtype: torch.dtype | None = None,
    compare: bool = False,
    max_shard_size: int | str | None = None,
    check: Callable[[], None] | None = None,
):
    """Merge the adapter at ``adapter_dir`` into the safetensors ``files`` of ``base_dir`` and write ``output``.

    Called by `merging.merge_adapter` after it checked the paths and the adapter; returns its
    `MergeResult`. ``config`` and ``tensors`` are the adapter's, ``stored`` the base's tensors
    (`read_base_tensors`), as that check read them. ``max_shard_size`` (bytes or a size like
    ``"5GB"``) defaults to that of the installed transformers' ``save_pretrained``. ``check`` (of the
    base, `merging.check_base_complete`) runs on a thread while the merge streams (it imports and
    builds the model on the meta device, about a second) and must pass before anything is committed.

    Examples:
        ```python
        merge_adapter("base", "out/lora_adapters", "merged").method  # 'streaming' for a safetensors base
        ```
    """
    from .merging import MergeResult, copy_support_files, merge_info
    from .verification import human_size, saved_modules

    start = time.perf_counter()
    limit = convert_file_size_to_int(default_max_shard_size() if max_shard_size is None else max_shard_size)
    plan = plan_merge(config, tensors, stored, adapter_dir)
    saved, _ = saved_modules(config, tensors)  # modules_to_save: their weights are among plan.replace
    out_dtype = _dtype_of(stored, dtype)
    dtype_name = str(out_dtype).replace("torch.", "") if out_dtype is not None else "unknown"
    merged_modules = len(plan.deltas)
    num_parameters = sum(t.numel for t in stored.values())
    logger.info(
        "Streaming merge: %d LoRA module(s), %d replaced tensor(s), %d tensors of %s in %d file(s)",
        merged_modules,
        len(plan.replace),
        len(stored),
        base_dir,
        len(files),
    )
    info = merge_info(base_dir, adapter_dir, config, "streaming", None, dtype_name, merged_modules, saved)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="merge-check") as checker, staged_directory(output) as staging:
            checked = checker.submit(check) if check is not None else None
            num_bytes = write_merged_weights(stored, plan, staging, dtype, limit, checked)
            if checked is not None:
                checked.result()
            base_config = write_config(base_dir, staging, dtype_name)
            info["model_class"] = model_class_name(base_config)
            copied = copy_support_files(base_dir, staging)
            if compare:
                info["compare"] = compare_outputs(base_dir, adapter_dir, staging)
            (staging / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    except HiggsTrainerError:
        raise
    except OSError as exc:
        raise MergeError(f"writing the merged model to {output} failed: {first_line(exc)} (nothing written)") from exc
    result = MergeResult(
        path=str(output),
        base=str(base_dir),
        adapter=str(adapter_dir),
        model_class=info["model_class"],
        dtype=dtype_name,
        merged_modules=merged_modules,
        num_parameters=num_parameters,
        num_bytes=num_bytes,
        copied_files=copied,
        seconds=time.perf_counter() - start,
        compare=info["compare"],
        modules_to_save=saved,
        method="streaming",
    )
    logger.info("Merged model written to %s (%s, streamed)", output, human_size(num_bytes))
    return result


__all__ = [
    "IN_MEMORY",
    "MergePlan",
    "StoredTensor",
    "check_streamable_config",
    "default_max_shard_size",
    "plan_merge",
    "read_base_tensors",
    "read_safetensors_header",
    "safetensors_weight_files",
    "shard_plan",
    "stream_merge",
]
