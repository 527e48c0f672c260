"""Merge a LoRA adapter into a safetensors base one tensor at a time (the default of ``higgs-trainer merge``).

The base model is never built: its ``config.json`` is copied (with the dtype recorded) and its
weights are read tensor by tensor from ``model.safetensors`` (or the shards an index names). A
weight with a LoRA pair gets peft's delta added (`arithmetic`, bit for bit peft's), a
``modules_to_save`` weight (or an embedding peft saved beside its LoRA) is replaced by the
adapter's, and every other tensor's bytes are copied unchanged (`plan` says which is
which). Reading, computing and writing overlap on three threads, so memory follows the largest
tensor, not the model, and time follows the disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import PROGRAMMING_ERRORS, CheckpointError, HiggsTrainerError, MergeError, first_line
from ..files.atomic import staged_directory
from ..files.checkpoint import progress_bar
from ..files.safetensors_files import (
    DTYPE_NAMES,
    StoredTensor,
    copy_bytes,
    default_max_shard_size,
    header_bytes,
    read_tensor,
    shard_plan,
    write_all,
    write_tensor,
)
from ..files.sizes import human_size, parse_size
from ..files.support_files import copy_support_files
from ..names import SAFE_INDEX, SAFE_WEIGHTS
from ..verification.modules_to_save import saved_modules
from .arithmetic import Scratch, merged_tensor, needs_base_values, output_dtype
from .compare import compare_outputs
from .plan import MergePlan, plan_merge
from .result import MergeResult, merge_info

logger = logging.getLogger(__name__)

_IN_FLIGHT = 2  # computed tensors waiting for the writer thread, at most
_READ_AHEAD = 2  # base tensors read ahead of the computation, at most
_PIPELINE_BYTES = 96 * 2**20  # bytes read ahead, or waiting to be written, at most (one larger tensor at a time)


@contextlib.contextmanager
def _one_compute_thread() -> Iterator[None]:
    """torch's intra-op threads set to one while merging, restored after.

    The arithmetic is a few memory-bound passes per weight and rank-r products, and the writer
    thread needs a core for the I/O; OpenMP workers spinning on a busy machine made the merge several
    times slower (benchmarks/README.md, "Measurements behind the code"). The results do not
    depend on it: elementwise kernels and the products' per-element sums are the same either way
    (the tests compare with peft's merge running on all threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ReadAhead:
    """The base's values of ``tensors``, in order, read by ``pool`` ahead of their use.

    At most ``_READ_AHEAD`` tensors and ``_PIPELINE_BYTES`` wait read; a tensor larger than that
    is read when it is asked for. Reading on a thread of its own lets the disk work while this
    thread computes: the kernel's readahead (``posix_fadvise(WILLNEED)``) was tried first and left
    the reads on the computing thread's path (benchmarks/README.md, "Measurements behind the code").

    The buffers read into are handed back (`give_back`) once written and reused for tensors of
    the same size. Freshly allocated for each tensor, they made the peak memory swing between
    identical runs (the allocator's per-thread heaps) and cost a page fault per page.
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
            entries = [(n, DTYPE_NAMES[output_dtype(stored[n], dtype)], stored[n].shape, sizes[n]) for n in names]
            header = header_bytes(entries)
            with (
                open(directory / file, "wb", buffering=0) as out,
                ThreadPoolExecutor(1, thread_name_prefix="merge-write") as writer,
            ):
                write_all(out, memoryview(header))
                writes = Writes(writer, lambda: bar.update(1))

                def write(tensor: torch.Tensor, buffer: torch.Tensor | None, begin: int, end: int) -> None:
                    write_tensor(out, tensor, begin, end)
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
                        writes.submit(0, copy_bytes, source, out, offset, end)
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
    (`safetensors_files.read_stored_tensors`), as that check read them. ``max_shard_size`` (bytes or a size like
    ``"5GB"``) defaults to that of the installed transformers' ``save_pretrained``. ``check`` (of the
    base, `base_model.check_base_complete`) runs on a thread while the merge streams (it imports and
    builds the model on the meta device) and must pass before anything is committed.

    Examples:
        ```python
        merge_adapter("base", "out/lora_adapters", "merged").method  # 'streaming' for a safetensors base
        ```
    """
    start = time.perf_counter()
    limit = parse_size(default_max_shard_size() if max_shard_size is None else max_shard_size)
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
            # The check builds its model under torch.device("meta"), a mode of its own thread only: the merge's
            # tensors on this thread stay on the CPU.
            checked = checker.submit(check) if check is not None else None
            num_bytes = write_merged_weights(stored, plan, staging, dtype, limit, checked)
            if checked is not None:
                checked.result()
            base_config = write_config(base_dir, staging, dtype_name)
            info["model_class"] = model_class_name(base_config)
            copied = copy_support_files(base_dir, staging)
            compare_failed = None
            if compare:  # a failed check never throws the finished merge away: it is reported after the commit
                try:
                    info["compare"] = compare_outputs(base_dir, adapter_dir, staging)
                except Exception as exc:
                    compare_failed = exc
            (staging / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    except (HiggsTrainerError, *PROGRAMMING_ERRORS):
        raise
    except OSError as exc:
        raise MergeError(f"writing the merged model to {output} failed: {first_line(exc)} (nothing written)") from exc
    except Exception as exc:  # torch's RuntimeError, MemoryError, ...: one line, nothing written
        raise MergeError(f"merging {adapter_dir} into {base_dir} failed: {first_line(exc)} (nothing written)") from exc
    if compare_failed is not None:
        raise MergeError(
            f"the merged model in {output} is complete (kept), but --compare failed: {type(compare_failed).__name__}: "
            f"{first_line(compare_failed)}"
        ) from compare_failed
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


__all__ = ["ReadAhead", "Writes", "stream_merge", "write_merged_weights"]
