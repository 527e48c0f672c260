"""An adapter against its base model (built on the meta device, so no weights are loaded): modules that exist and fit.

Used by ``higgs-trainer verify --base-model`` and before a merge.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import listed
from ..lora_keys import split_lora_matrix_key
from ..names import LORA_PAIRS, PEFT_KEY_PREFIX


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(input size, output size) a LoRA pair on ``module`` must have, for the layer types that say so."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # transformers' GPT-2 layer
        return tuple(module.weight.shape)  # (in, out)
    return None


def check_adapter_modules(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Problems of an adapter's LoRA tensors against the modules of the base ``model`` (which may be on the meta device).

    Every LoRA module must exist in ``model`` (otherwise ``PeftModel.from_pretrained`` only warns
    and a merge changes nothing there) and its matrices must fit the layer's input and output sizes.

    Examples:
        >>> check_adapter_modules({"base_model.model.nope.lora_A.weight": torch.zeros(2, 4)}, torch.nn.Linear(4, 4))
        ["1 LoRA module(s) are not in the base model (PeftModel.from_pretrained would only warn; a merge would change nothing there): 'nope'"]
    """
    modules = dict(model.named_modules())
    absent, misfit = [], []
    absent_weights, misfit_weights = _full_weight_problems(tensors, model)
    for key, tensor in tensors.items():
        split = split_lora_matrix_key(key)
        if split is None or not split[0].startswith(PEFT_KEY_PREFIX[:-1]):
            continue
        module_path, part, rest = split
        module_path = module_path[len(PEFT_KEY_PREFIX) :]
        if rest and rest[0] == "bias":
            continue
        module = modules.get(module_path)
        if module is None:
            if module_path not in absent:
                absent.append(module_path)
            continue
        features = _features(module)
        if features is None or tensor.dim() < 2:
            continue
        if part in LORA_PAIRS and tensor.shape[1] != features[0]:
            misfit.append(f"{module_path} ({part} {tuple(tensor.shape)} vs input size {features[0]})")
        elif part not in LORA_PAIRS and tensor.shape[0] != features[1]:
            misfit.append(f"{module_path} ({part} {tuple(tensor.shape)} vs output size {features[1]})")
    problems = []
    if absent:
        problems.append(
            f"{len(absent)} LoRA module(s) are not in the base model (PeftModel.from_pretrained would only warn; "
            f"a merge would change nothing there): {listed(absent)}"
        )
    if misfit:
        problems.append(f"{len(misfit)} LoRA matrix(es) do not fit the base model's layers: {listed(misfit)}")
    if absent_weights:
        problems.append(
            f"{len(absent_weights)} full weight(s) (modules_to_save) are not in the base model: {listed(absent_weights)}"
        )
    if misfit_weights:
        problems.append(
            f"{len(misfit_weights)} full weight(s) (modules_to_save) do not fit the base model's: {listed(misfit_weights)}"
        )
    return problems


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _full_weight_problems(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Full weights of the adapter (``modules_to_save``, saved embeddings) absent from ``model``, and those of another shape."""
    params = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
    params.update({name: (tuple(b.shape), b.dtype) for name, b in model.named_buffers()})
    absent, misfit = [], []
    for key, tensor in sorted(tensors.items()):
        if not key.startswith(PEFT_KEY_PREFIX) or split_lora_matrix_key(key) is not None:
            continue
        # an embedding that is itself a LoRA layer saves its base weight as <module>.base_layer.weight
        name = key[len(PEFT_KEY_PREFIX) :].replace(".base_layer.", ".")
        if name not in params:
            absent.append(name)
        elif tuple(tensor.shape) != params[name][0]:
            misfit.append(f"{name} {tuple(tensor.shape)} vs {params[name][0]}")
        elif tensor.is_floating_point() != params[name][1].is_floating_point:
            misfit.append(f"{name} {_dtype_name(tensor.dtype)} vs {_dtype_name(params[name][1])}")
    return absent, misfit


__all__ = ["check_adapter_modules"]
