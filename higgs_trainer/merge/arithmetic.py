"""The merged value of one base tensor, computed as peft's ``merge_and_unload`` computes it, bit for bit.

peft (0.16 and 0.21) holds the adapter weights in float32 (``autocast_adapter_dtype``); a linear
layer's delta ``transpose(B @ A, fan_in_fan_out) * scaling`` is computed in float32 and added in
place to the weight (``weight += delta``: the sum rounded once to the weight's dtype); an
embedding's delta is cast to the weight's dtype first (``weight += delta.to(dtype)``);
``lora_bias`` adds ``bias_B * scaling``; a ``modules_to_save`` weight is the adapter's, cast to
the weight's dtype. ``scaling`` is ``lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA), per module
(`plan`). The same operations on each element are done here faster: a linear weight a
block of rows at a time, and the mixed-dtype add in vectorised steps.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import MergeError
from ..files.safetensors_files import StoredTensor, read_tensor
from .plan import LoraDelta, MergePlan

logger = logging.getLogger(__name__)

_BLOCK_ROWS = 64  # rows of a linear weight merged at a time (see merge_linear)


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
    """``weight += delta`` for a float32 ``delta``: peft's in-place add, the same bits, faster on CPU.

    torch computes a bf16/fp16 ``weight += fp32`` in float32 and rounds the sum to the weight's
    dtype (round to nearest even), element by element in a slow mixed-dtype loop (benchmarks/README.md, "Measurements behind the code"). The same sum
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
    of passing through memory several times (benchmarks/README.md, "Measurements behind the code"). The operations on each element are the
    same either way.
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
