"""Read and write safetensors files a tensor at a time: what the streaming merge needs beyond safetensors.

safetensors' ``save_file`` needs every tensor of a file in memory at once, and ``safe_open``
maps the file (the pages read stay resident while it is open) without saying where a tensor's
bytes are. Here the header is parsed by hand (8-byte little-endian length, then JSON with each
tensor's dtype, shape and ``data_offsets``), a tensor is read with ``pread`` into memory of its
own, and a file is written as its header followed by each tensor's bytes in turn, an unchanged
tensor copied byte for byte (``copy_file_range``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ..errors import CheckpointError, first_line, listed
from ..names import SAFE_INDEX, SAFE_WEIGHTS

# safetensors' dtype names and the torch dtypes they stand for: the one table (names written, names read).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on a header's size
_COPY_CHUNK = 64 * 2**20


class _Invalid(ValueError):
    """A header safetensors' own loader refuses too."""


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


# which files hold a model's weights


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``).

    `CheckpointError` unless it maps tensor names to file names in the index's own directory.

    Examples:
        >>> _ = Path("model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
        >>> read_weight_map(Path("model.safetensors.index.json"))
        {'a': 'model-1.safetensors'}
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map must map tensor names to shard files")
        if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in weight_map.values()):
            raise ValueError("weight_map values must be file names in the model directory")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{index} is not a valid shard index: {first_line(exc)}") from exc
    return weight_map


def weight_files(directory: Path, index_name: str = SAFE_INDEX, single_name: str = SAFE_WEIGHTS) -> list[Path] | None:
    """The weight files of a model directory: the shards its index names, else its single file; None without either.

    Examples:
        >>> weight_files(Path("/"))  # no model here
    """
    index = directory / index_name
    if index.is_file():
        names = sorted(set(read_weight_map(index).values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} shard(s) that are missing: {listed(missing)}")
        return [directory / n for n in names]
    if (directory / single_name).is_file():
        return [directory / single_name]
    return None


def safetensors_weight_files(base_dir: Path) -> list[Path] | None:
    """The safetensors files of a model directory (``model.safetensors`` or an index's shards); None when it has none.

    Examples:
        >>> safetensors_weight_files(Path("/"))  # no model here
    """
    return weight_files(base_dir, SAFE_INDEX, SAFE_WEIGHTS)


# reading headers, as strictly as safetensors' own loader


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Invalid(f"the header names tensor {next(k for k in keys if keys.count(k) > 1)!r} twice")
    return dict(pairs)


def _tensor_entries(header: object, start: int, file: Path) -> list[StoredTensor]:
    if not isinstance(header, dict):
        raise _Invalid("the header is not a JSON object")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _Invalid("__metadata__ is not a map of strings")
            continue
        if not isinstance(entry, dict):
            raise _Invalid(f"the entry of tensor {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _Invalid(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise _Invalid(f"tensor {name!r} has data_offsets {offsets!r}, not two byte offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {dtype!r}, which higgs-trainer does not read "
                f"(it reads {', '.join(SAFETENSORS_DTYPES)})"
            )
        tensors.append(StoredTensor(name, file, dtype, tuple(shape), start + offsets[0], start + offsets[1]))
    return tensors


def _check_layout(tensors: list[StoredTensor], start: int, size: int) -> None:
    """safetensors' rules: the tensors' bytes follow each other from the header on, without gap or overlap, each
    exactly shape x dtype long, and the last one ends where the file does."""
    position = start
    for tensor in tensors:
        if tensor.begin != position or tensor.end < tensor.begin:
            where = "overlap another tensor's" if tensor.begin < position else "leave a gap after the previous"
            raise _Invalid(f"the bytes of tensor {tensor.name!r} (offsets {tensor.begin - start}, "
                           f"{tensor.end - start}) {where}")  # fmt: skip
        if tensor.num_bytes != tensor.numel * tensor.torch_dtype.itemsize:
            raise _Invalid(
                f"tensor {tensor.name!r} of shape {tensor.shape} and dtype {tensor.dtype} needs "
                f"{tensor.numel * tensor.torch_dtype.itemsize} bytes, its offsets give it {tensor.num_bytes}"
            )
        position = tensor.end
    if position != size:
        raise _Invalid(f"the tensors end at byte {position} of a file of {size} bytes")


def read_safetensors_header(file: Path, what: str = "the model") -> list[StoredTensor]:
    """The tensors of one safetensors file in the order of their bytes, checked as safetensors' own loader does.

    Read by hand (8-byte length, JSON header) because ``safe_open`` does not tell where a tensor's
    bytes are, and the merge copies unchanged tensors byte for byte without loading them. What
    safetensors refuses is refused here (`CheckpointError` naming ``what``, the file and the
    reason): a header that is not a JSON object or names a tensor twice, offsets out of order,
    overlapping or leaving gaps, a size other than shape x dtype, bytes beyond the end of the file.

    Examples:
        >>> from safetensors.torch import save_file
        >>> save_file({"b": torch.zeros(2), "a": torch.ones(3, dtype=torch.int8)}, "t.safetensors")
        >>> [(t.name, t.dtype, t.shape, t.num_bytes) for t in read_safetensors_header(Path("t.safetensors"))]
        [('b', 'F32', (2,), 8), ('a', 'I8', (3,), 3)]
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(_HEADER_LIMIT, size - 8):
                raise _Invalid(f"header length {length} does not fit a file of {size} bytes")
            text = handle.read(length)
        if not text.startswith(b"{"):
            raise _Invalid("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
        tensors = sorted(_tensor_entries(header, 8 + length, file), key=lambda t: (t.begin, t.end))
        _check_layout(tensors, 8 + length, size)
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(
            f"cannot load {what} from {file.parent}: {file.name} is truncated or corrupt ({first_line(exc)})"
        ) from exc
    return tensors


def read_stored_tensors(directory: Path, files: Iterable[Path], what: str = "the model") -> dict[str, StoredTensor]:
    """Every tensor of a model's safetensors ``files``, by name, in file and byte order; each name stored once.

    `CheckpointError` for a header `read_safetensors_header` refuses, a tensor stored in two
    files (which copy is the model's?), or an index that maps a tensor to a file that lacks it.

    Examples:
        >>> from safetensors.torch import save_file
        >>> _ = Path("model").mkdir(), save_file({"w": torch.zeros(2)}, "model/model.safetensors")
        >>> list(read_stored_tensors(Path("model"), safetensors_weight_files(Path("model"))))
        ['w']
    """
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for tensor in read_safetensors_header(file, what):
            if tensor.name in tensors:
                raise CheckpointError(
                    f"cannot load {what} from {directory}: tensor {tensor.name!r} is stored twice "
                    f"({tensors[tensor.name].file.name} and {file.name}); keep one copy"
                )
            tensors[tensor.name] = tensor
    index = directory / SAFE_INDEX
    if index.is_file():
        weight_map = read_weight_map(index)
        wrong = [k for k, f in weight_map.items() if k not in tensors or tensors[k].file.name != f]
        if wrong:
            raise CheckpointError(f"{index} maps {len(wrong)} tensor(s) to shards that lack them: {listed(wrong)}")
    return tensors


def read_tensor(tensor: StoredTensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor's values, read with ``pread`` into memory of its own (or the uint8 buffer ``into``, of its size).

    The one way a tensor is read from a safetensors file here (merge, convert, extract), one at a time.

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


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """A safetensors header (length + JSON, padded to 8 bytes) for (name, dtype, shape, bytes) in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def copy_bytes(source: StoredTensor, out, begin: int, end: int) -> None:
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
    start_writeback(out, begin, end)


def write_all(out, data: memoryview) -> None:
    while data:
        data = data[os.write(out.fileno(), data) :]


def write_tensor(out, tensor: torch.Tensor, begin: int, end: int) -> None:
    write_all(out, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    start_writeback(out, begin, end)


def start_writeback(out, begin: int, end: int) -> None:
    """Start writing bytes ``begin:end`` of ``out`` to the disk now, so the disk writes while the merge goes on.

    ``posix_fadvise(DONTNEED)`` starts the write-back of a range's dirty pages without waiting for
    it (Linux). Left alone, the kernel would hold the whole output in the page cache until the
    background threshold or the final fsync, which then waits for all of it.
    """
    if hasattr(os, "posix_fadvise") and end > begin:
        os.posix_fadvise(out.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)
