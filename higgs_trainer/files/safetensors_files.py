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
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on a header's size
_COPY_CHUNK = 64 * 2**20


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
