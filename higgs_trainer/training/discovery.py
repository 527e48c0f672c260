"""Find the PEFT component inside a (possibly wrapped) model.

Community Higgs Audio scripts put the ``PeftModel`` at ``wrapper.model`` or
``wrapper.model.text_model``; DDP, DeepSpeed and ``torch.compile`` add their own layers.
We unwrap the outside (DDP, DeepSpeed, torch.compile) and then search the module tree, so no attribute
chain is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel

from ..errors import AmbiguousLoraModelError, LoraModelNotFoundError

# Module-name segments added by wrappers, never by the user's own model; they also appear in
# state-dict keys of the wrapped model, so both sides are compared without them.
_WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def canonical_name(name: str) -> str:
    """Drop wrapper-only segments (``torch.compile``, FSDP1, activation checkpointing) from a dotted name.

    Examples:
        >>> canonical_name("model._orig_mod.base_model.model.lm_head.weight")
        'model.base_model.model.lm_head.weight'
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


@dataclass(frozen=True)
class LoraComponent:
    """A ``PeftModel`` found inside a model, and where.

    ``path`` is the dotted module path from the unwrapped model (``""`` when the model itself is
    the ``PeftModel``), without wrapper-only segments; it is also the prefix of the component's
    keys in the unwrapped model's state dict.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> wrapper = torch.nn.Module()  # a community-style wrapper; its .model becomes the PeftModel
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> component = find_lora_model(wrapper)
        >>> component.path, type(component.model).__name__
        ('model', 'PeftModel')
    """

    path: str
    model: PeftModel

    @property
    def display_path(self) -> str:
        """The path as shown in messages: ``<model>`` for the top level."""
        return self.path or "<model>"

    def slice_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the entries of a whole-model state dict that belong to this component, keys made relative to it.

        Examples:
            >>> import torch
            >>> from peft import LoraConfig, get_peft_model
            >>> wrapper = torch.nn.Module()  # a community-style wrapper; its .model becomes the PeftModel
            >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
            >>> sorted(find_lora_model(wrapper).slice_state_dict(wrapper.state_dict()))
            ['base_model.model.q_proj.base_layer.bias', 'base_model.model.q_proj.base_layer.weight', 'base_model.model.q_proj.lora_A.default.weight', 'base_model.model.q_proj.lora_B.default.weight']
        """
        if not self.path:
            return {canonical_name(key): value for key, value in state_dict.items()}
        prefix = self.path + "."
        sliced = {}
        for key, value in state_dict.items():
            key = canonical_name(key)
            if key.startswith(prefix):
                sliced[key[len(prefix) :]] = value
        return sliced


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the DDP / DataParallel / DeepSpeed / ``torch.compile`` layers around a model.

    The same unwrapping as accelerate's ``extract_model_from_parallel``, written out because
    accelerate releases before PR 3881 (1.9.0, on the Higgs stack, among them) raise ``KeyError: '_orig_mod'``
    when only a submodule is compiled (accelerate issues 3683, 3879). FSDP is left in place: the search below
    sees through it and drops its name segments.

    Examples:
        >>> unwrap_model(torch.nn.DataParallel(torch.nn.Linear(2, 2)))
        Linear(in_features=2, out_features=2, bias=True)
    """
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) or (
            type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), torch.nn.Module)
        ):
            model = model.module
        else:
            return model


def _peft_models(model: torch.nn.Module) -> list[LoraComponent]:
    """Every outermost ``PeftModel`` in the module tree (a module shared at two paths counts once)."""
    found: list[LoraComponent] = []
    for name, module in model.named_modules():
        if not isinstance(module, PeftModel):
            continue
        path = canonical_name(name)
        if any(path == f.path or path.startswith(f.path + ".") or not f.path for f in found):
            continue  # nested inside a PeftModel already found
        found.append(LoraComponent(path, module))
    return found


def find_lora_model(model: torch.nn.Module, path: str | None = None) -> LoraComponent:
    """Find the ``peft.PeftModel`` inside ``model`` and report where it is.

    ``model`` may be a ``PeftModel``, a plain ``nn.Module`` wrapper holding one at any depth, or
    either behind DDP, DataParallel, DeepSpeed or ``torch.compile``. Pass ``path`` (e.g.
    ``"model.text_model"``) to choose when the model holds more than one.

    Args:
        model: the model handed to the trainer: a ``PeftModel``, or a module holding one, possibly
            wrapped by DDP, DataParallel, DeepSpeed or ``torch.compile``.
        path: the dotted path of the ``PeftModel`` to take, when there are several.

    Raises:
        LoraModelNotFoundError: there is no ``PeftModel``, or none at ``path``.
        AmbiguousLoraModelError: there are several and ``path`` was not given.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> wrapper = torch.nn.Module()
        >>> wrapper.model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)})
        >>> wrapper.model = get_peft_model(wrapper.model, LoraConfig(r=2, target_modules=["q_proj"]))
        >>> find_lora_model(wrapper).path
        'model'
        >>> find_lora_model(torch.nn.DataParallel(wrapper)).path  # wrappers such as DDP are looked through
        'model'
    """
    model = unwrap_model(model)
    found = _peft_models(model)
    if path is not None:
        wanted = canonical_name(path)
        for component in found:
            if component.path == wanted:
                return component
        where = ", ".join(repr(c.display_path) for c in found) or "none"
        raise LoraModelNotFoundError(
            f"No PeftModel at {path!r} in {type(model).__name__}; PeftModel components found: {where}. "
            "Pass one of those paths (or None to search)."
        )
    if not found:
        raise LoraModelNotFoundError(
            f"No peft.PeftModel found anywhere inside {type(model).__name__} (searched every submodule). "
            "Apply LoRA before creating the trainer, e.g. `wrapper.model = peft.get_peft_model(wrapper.model, lora_config)`."
        )
    if len(found) > 1:
        where = ", ".join(repr(c.display_path) for c in found)
        raise AmbiguousLoraModelError(
            f"Found {len(found)} distinct PeftModel components in {type(model).__name__}: {where}. "
            "Name the one to save with lora_model_path=... (trainer argument) or path=..."
        )
    return found[0]
