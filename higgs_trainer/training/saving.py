"""Write a PEFT component's adapter atomically and verify it.

The adapter is written as the component's own ``save_pretrained`` writes it (peft's
``get_peft_model_state_dict`` strips the wrapper prefix and the ``.default`` adapter name;
shared tensors get their own storage; peft's config machinery writes the config), without
its model card, into a staging directory beside the target (``atomic.staged_directory``), verified against the shapes the
live model says it must have, and only then renamed into place.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .._compat import peft_save_is_mirrored
from ..errors import AdapterSaveError, AdapterVerificationError
from ..files.atomic import staged_directory
from ..files.sizes import human_size
from ..lora_keys import split_lora_key
from ..names import ADAPTER_DIRNAME, SAFETENSORS_NAME
from ..verification.inspection import verify_adapter
from ..verification.untrained import untrained_problem
from .discovery import LoraComponent
from .gathering import has_fsdp1_units

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedAdapter:
    """What one adapter save wrote.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> wrapper = torch.nn.Module()  # a community-style wrapper; its .model becomes the PeftModel
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> from higgs_trainer import find_lora_model
        >>> saved = write_lora_adapters(find_lora_model(wrapper), "out")
        >>> saved.path, saved.num_tensors
        ('out/lora_adapters', 2)
    """

    path: str
    component_path: str
    num_tensors: int
    num_bytes: int
    seconds: float
    untrained: tuple[str, ...] = ()  # the adapter directories whose LoRA tensors still equal peft's zero init


AdapterStates = dict[str, dict[str, torch.Tensor]]  # adapter name -> its adapter state dict (peft's keys)


def _what_to_write(
    peft_model: PeftModel,
    component_state: dict[str, torch.Tensor] | None,
    state_dict_is_live: bool,
    save_embedding_layers: bool,
) -> tuple[AdapterStates, dict[str, dict[str, tuple[int, ...]]]]:
    """``(to_write, expected_shapes)``: each adapter's state dict to write, and the full shapes its file must have.

    What is written comes from the component's part of a passed state dict when there is one (the
    gathered dict DeepSpeed or FSDP hand to ``_save``), else from the live model. The expected shapes
    always come from the live model (DeepSpeed's ``ds_shape`` where partitioned), so a wrong gathered
    dict cannot vouch for itself; a passed state dict of the live tensors themselves
    (``state_dict_is_live``) serves as both, rather than asking the live model for them again.
    """
    names = list(peft_model.peft_config)
    passed = None
    if component_state is not None:
        passed = {name: _adapter_state(peft_model, name, save_embedding_layers, component_state) for name in names}
    if passed is not None and state_dict_is_live:
        live = passed
    else:
        live = {name: _live_adapter_state(peft_model, name, save_embedding_layers, component_state) for name in names}
    expected_shapes = {
        name: {key: tuple(getattr(value, "ds_shape", value.shape)) for key, value in state.items()}
        for name, state in live.items()
    }
    return (live if passed is None else passed), expected_shapes


def _adapter_state(
    peft_model: PeftModel, adapter_name: str, save_embedding_layers: bool, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """peft's adapter state dict (``get_peft_model_state_dict``) of one adapter, from ``state_dict``."""
    return get_peft_model_state_dict(
        peft_model, state_dict=state_dict, adapter_name=adapter_name, save_embedding_layers=save_embedding_layers
    )


def _live_adapter_state(
    peft_model: PeftModel, adapter_name: str, save_embedding_layers: bool, gathered: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """One adapter's state dict from the live model, or from ``gathered`` inside FSDP1 units.

    Inside FSDP1 units the live ``state_dict()`` is a collective, which the one writing process must
    not start: there ``gathered``, the component's part of the state dict gathered for saving, stands in.
    """
    live = gathered if gathered is not None and has_fsdp1_units(peft_model) else peft_model.state_dict(keep_vars=True)
    return _adapter_state(peft_model, adapter_name, save_embedding_layers, live)


def _save_adapter_files(
    peft_model: PeftModel,
    adapter_name: str,
    state: dict[str, torch.Tensor],
    directory: Path,
    *,
    source_state: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: bool = False,
) -> None:
    """Write one adapter's files as ``PeftModel.save_pretrained`` does: our copy where it mirrors peft, else peft's own.

    ``state`` is the adapter state dict already built; ``source_state`` the (component's) state
    dict it was built from, None for the live model, which peft's own method needs. Which one runs
    is `_compat.peft_save_is_mirrored`'s answer for the installed peft.
    """
    if peft_save_is_mirrored():
        _write_adapter_files(peft_model, adapter_name, state, directory)
    else:
        _save_with_peft(peft_model, adapter_name, directory, source_state, save_embedding_layers)


def _save_with_peft(
    peft_model: PeftModel,
    adapter_name: str,
    directory: Path,
    source_state: dict[str, torch.Tensor] | None,
    save_embedding_layers: bool,
) -> None:
    """peft's own ``save_pretrained`` of one adapter into ``directory`` (its model card removed, as our copy writes none)."""
    root = directory if adapter_name == "default" else directory.parent
    peft_model.save_pretrained(
        str(root),
        selected_adapters=[adapter_name],
        save_embedding_layers=save_embedding_layers,
        state_dict=source_state,
        safe_serialization=True,
    )
    (root / "README.md").unlink(missing_ok=True)  # peft writes its model card into the directory it was given


def _write_adapter_files(
    peft_model: PeftModel, adapter_name: str, state: dict[str, torch.Tensor], directory: Path
) -> None:
    """What ``PeftModel.save_pretrained`` writes for one adapter (peft 0.16 to 0.21), from a state dict already built.

    Written here rather than by ``save_pretrained`` because that one renders a model card (README.md)
    with a freshly compiled jinja template on every call and builds the state dict again, a large part
    of a checkpoint's adapter save (benchmarks/README.md, "Measurements behind the code"). The files are peft's own: its state dict, its safetensors layout
    (shared tensors cloned, contiguous, ``{"format": "pt"}``) and its config, saved by
    ``PeftConfig.save_pretrained`` with the same ``inference_mode`` and ``auto_mapping`` it sets.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in clone_shared_tensors(state).items()}
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    config = peft_model.peft_config[adapter_name]
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = peft_model.base_model.model.__dict__.get("name_or_path", None)
    auto_mapping = None
    if config.task_type is None:
        base_class = type(peft_model.base_model.model)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    inference_mode, config.inference_mode = config.inference_mode, True
    try:
        config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
    finally:
        config.inference_mode = inference_mode


def clone_shared_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every key its own storage, so ``safetensors.torch.save_file`` accepts tied weights.

    ``Trainer._save`` writes a plain ``nn.Module`` wrapper with ``save_file``, which refuses
    tensors that share memory (tied embeddings, overlapping views; transformers issue
    33807). Only the second and later tensors on a storage are copied.

    Examples:
        >>> w = torch.ones(2)
        >>> d = clone_shared_tensors({"a": w, "b": w})
        >>> d["a"].data_ptr() != d["b"].data_ptr()
        True
    """
    seen: set[int] = set()  # storages, not views: safetensors refuses any two tensors on one storage
    result = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            storage = value.untyped_storage().data_ptr()
            if storage in seen:
                value = value.clone()
            else:
                seen.add(storage)
        result[key] = value
    return result


def _check_every_lora_layer_selected(
    peft_model: PeftModel, adapter_name: str, shapes: dict[str, tuple[int, ...]], target: Path
) -> None:
    """Raise when peft's selection of adapter keys misses LoRA layers the model has.

    The expected keys come from peft's own ``get_peft_model_state_dict``; where peft selects by
    module names a wrapper changed (FSDP1 units under peft 0.21), it drops LoRA keys from both the
    file and the expectation, and an adapter of ``modules_to_save`` weights alone would pass.
    Counted here from the modules themselves.
    """
    layers = [
        path
        for path, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and (adapter_name in module.lora_A or adapter_name in module.lora_embedding_A)
    ]
    selected = {lora.module for lora in map(split_lora_key, shapes) if lora is not None and lora.is_a}
    if len(selected) != len(layers):
        raise AdapterVerificationError(
            f"peft selected the LoRA tensors of {len(selected)} of the {len(layers)} LoRA layers of adapter "
            f"{adapter_name!r} for saving; refusing to write an incomplete adapter to {target} (FSDP1 units with "
            "peft >= 0.21 do this: see docs/distributed.md)"
        )


def write_lora_adapters(
    component: LoraComponent,
    output_dir: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: bool = False,
    dirname: str = ADAPTER_DIRNAME,
    state_dict_is_live: bool = False,
) -> SavedAdapter:
    """Save ``component``'s adapter(s) into ``output_dir/lora_adapters`` atomically, then verify.

    ``state_dict`` is the whole (unwrapped) model's state dict when the caller has one (the
    gathered dict DeepSpeed or FSDP hand to ``Trainer._save``); the component's part is sliced
    out by its path. Without it the live parameters are saved. ``state_dict_is_live`` says the
    state dict holds the live tensors themselves (``model.state_dict()`` of an unsharded model, as
    `HiggsLoraTrainer._save` builds it without DeepSpeed or FSDP): the shapes the file must have
    are then read from it, instead of from the live model a second time. Call on one process only.

    Args:
        component: the PEFT component to save (`find_lora_model`).
        output_dir: the directory to write ``dirname`` into (a ``checkpoint-N`` or the run's output).
        state_dict: the whole (unwrapped) model's state dict, when the caller has one.
        save_embedding_layers: passed to peft's ``get_peft_model_state_dict``.
        dirname: the adapter directory's name inside ``output_dir``.
        state_dict_is_live: ``state_dict`` holds the live tensors themselves.

    Raises:
        AdapterSaveError: writing failed (previous adapter left intact).
        AdapterVerificationError: what was written does not match the model (nothing replaced).

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> wrapper = torch.nn.Module()  # a community-style wrapper; its .model becomes the PeftModel
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> from higgs_trainer import find_lora_model
        >>> write_lora_adapters(find_lora_model(wrapper), "out/checkpoint-2")
        SavedAdapter(path='out/checkpoint-2/lora_adapters', component_path='model', num_tensors=2, ...)
    """
    start = time.perf_counter()
    peft_model = component.model
    target = Path(output_dir) / dirname
    component_state = None
    if state_dict is not None:
        component_state = component.slice_state_dict(state_dict)
        if not component_state:
            raise AdapterSaveError(
                f"the state dict passed for saving holds no tensors under {component.display_path!r} "
                f"({len(state_dict)} keys in all); refusing to write an empty adapter to {target}. "
                "Under DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true."
            )
    to_write, expected_shapes = _what_to_write(peft_model, component_state, state_dict_is_live, save_embedding_layers)
    for name, shapes in expected_shapes.items():
        _check_every_lora_layer_selected(peft_model, name, shapes, target)
    try:
        with staged_directory(target) as staging:
            try:
                for name, state in to_write.items():
                    directory = staging if name == "default" else staging / name
                    _save_adapter_files(
                        peft_model,
                        name,
                        state,
                        directory,
                        source_state=component_state,
                        save_embedding_layers=save_embedding_layers,
                    )
            except Exception as exc:
                raise AdapterSaveError(
                    f"writing the LoRA adapter of {component.display_path!r} to {target} failed: {exc} "
                    "(the previous adapter, if any, is intact)"
                ) from exc
            summaries = [
                verify_adapter(staging if name == "default" else staging / name, shapes)
                for name, shapes in expected_shapes.items()
            ]
    except AdapterVerificationError as exc:
        raise AdapterVerificationError(f"{exc} (nothing written to {target}; the previous adapter is intact)") from exc
    except OSError as exc:
        raise AdapterSaveError(
            f"writing the LoRA adapter into {target} failed: {exc} (the previous adapter, if any, is intact)"
        ) from exc
    untrained = tuple(  # judged on the tensors just written, as verify judges the files
        str(target if name == "default" else target / name)
        for name, state in to_write.items()
        if untrained_problem(peft_model.peft_config[name].to_dict(), state) is not None
    )
    saved = SavedAdapter(
        path=str(target),
        component_path=component.display_path,
        num_tensors=sum(s.num_tensors for s in summaries),
        num_bytes=sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
        seconds=time.perf_counter() - start,
        untrained=untrained,
    )
    logger.info(
        "Saved LoRA adapter to %s (component %s, %d tensors, %s, %.2f s)",
        saved.path,
        saved.component_path,
        saved.num_tensors,
        human_size(saved.num_bytes),
        saved.seconds,
    )
    return saved
