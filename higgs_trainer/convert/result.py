"""What `convert_layout` wrote."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConvertResult:
    """What `convert_layout` wrote: ``kind`` is ``adapter``, ``adapters`` (a run or checkpoint) or ``model``.

    ``renamed`` counts the tensors whose key changed, ``concatenated`` the weights joined from
    boson's split halves, ``skipped`` the buffers left out (recomputed from the config), ``copied``
    the tokenizer/processor files; ``verified_on_base`` is True when peft loaded the adapters onto ``base``.

    Examples:
        ```python
        result = convert_layout("run", "transformers", "run-hf")
        result.kind, result.outputs  # ('adapters', ['run-hf/lora_adapters', 'run-hf/checkpoint-2/lora_adapters'])
        ```
    """

    source: str
    path: str
    to: str
    kind: str
    outputs: list[str]
    num_tensors: int
    renamed: int
    concatenated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    verified_on_base: bool = False
    seconds: float = 0.0


__all__ = ["ConvertResult"]
