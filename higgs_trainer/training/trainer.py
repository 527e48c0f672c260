"""The trainer: ``transformers.Trainer`` that also writes a verified LoRA adapter with every save.

``Trainer`` saves a plain ``nn.Module`` wrapper as one state dict and never writes an adapter.
The mixin keeps that full checkpoint exactly as ``Trainer`` writes it and adds
``<checkpoint>/lora_adapters`` (``adapter_config.json`` + ``adapter_model.safetensors``), in every
``checkpoint-N`` and in the final ``save_model()``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PeftType
from transformers import PreTrainedModel, Trainer

from .._compat import (
    allow_missing_frozen_parameters,
    check_accelerate_can_unwrap,
    exclude_frozen_parameters_on_save,
    load_optimizer_and_scheduler_on_cpu,
    reregister_fsdp1_original_parameters,
    rng_state_safe_globals,
)
from ..errors import HiggsTrainerError, listed
from ..files.atomic import check_replaceable
from ..names import ADAPTER_DIRNAME, ADAPTER_ONLY_MARKER
from ..verification.untrained import LIKELY_CAUSES, check_lora_trainable
from .discovery import LoraComponent, canonical_name, find_lora_model, unwrap_model
from .gathering import gather_adapter_state_dict, is_sharded
from .resuming import checkpoint_to_resume, is_adapter_only_checkpoint, load_lora_adapters
from .saving import SavedAdapter, clone_shared_tensors, write_lora_adapters

logger = logging.getLogger(__name__)


def _component_of(trainer: Trainer, path: str | None = None) -> LoraComponent:
    """The PEFT component of ``trainer.model`` (DDP, DeepSpeed and ``torch.compile`` layers removed).

    Not ``trainer.accelerator.unwrap_model``: accelerate 1.9 (the Higgs stack) raises ``KeyError: '_orig_mod'``
    for a compiled submodule (see `discovery.unwrap_model`).
    """
    return find_lora_model(unwrap_model(trainer.model), path=path)


def fsdp_saves_full_state_dict(plugin: Any) -> bool:
    """True when accelerate's FSDP ``plugin`` gathers a full state dict, which ``Trainer.save_model`` hands ``_save``.

    Compared as torch's ``StateDictType`` enum, which accelerate turns every configured value into
    (``"FULL_STATE_DICT"``, ``"1"``, or unset: its default).

    Examples:
        >>> from accelerate import FullyShardedDataParallelPlugin
        >>> fsdp_saves_full_state_dict(FullyShardedDataParallelPlugin(state_dict_type="FULL_STATE_DICT"))
        True
        >>> fsdp_saves_full_state_dict(FullyShardedDataParallelPlugin(state_dict_type="SHARDED_STATE_DICT"))
        False
    """
    from torch.distributed.fsdp import StateDictType

    return plugin.state_dict_type == StateDictType.FULL_STATE_DICT


def _is_deepspeed_engine(trainer: Trainer, model: Any) -> bool:
    """True when ``model`` is DeepSpeed's engine (deepspeed is imported only where the trainer runs under it)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    import deepspeed

    return isinstance(model, deepspeed.DeepSpeedEngine)


class LoraAdapterSavingMixin:
    """Adds verified ``lora_adapters`` to every save of a ``transformers.Trainer`` subclass.

    Put it first in the bases: ``class MyTrainer(LoraAdapterSavingMixin, SomeTrainer)``. Every
    constructor argument is passed through to the trainer; three are added.

    Args:
        *args: passed through to the trainer class.
        lora_model_path: dotted path of the ``PeftModel`` to save (e.g. ``"model.text_model"``),
            needed only when the model holds more than one.
        save_embedding_layers: passed to peft's ``get_peft_model_state_dict`` (default ``False``;
            never ``"auto"``, which may query the Hub).
        adapter_only_checkpoints: when true, each ``checkpoint-N`` holds ``lora_adapters`` and
            the optimizer, scheduler, RNG and trainer state, but not the frozen base weights; resuming
            from it loads the adapter into the model. The final ``save_model()`` stays a full save.
            Single process, DDP and DeepSpeed (whose own checkpoint then leaves the frozen parameters
            out); not FSDP (default ``False``).
        **kwargs: passed through to the trainer class.

    The PEFT component is looked up when the trainer is created, so a model without one fails
    before training starts.

    Examples:
        >>> class HiggsAudioTrainer(LoraAdapterSavingMixin, Trainer):  # your trainer, its compute_loss unchanged
        ...     def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        ...         return super().compute_loss(model, inputs, return_outputs, **kwargs)
        >>> class MisorderedTrainer(Trainer, LoraAdapterSavingMixin):  # the mixin must come first
        ...     pass
        Traceback (most recent call last):
        TypeError: MisorderedTrainer: LoraAdapterSavingMixin must come before the Trainer class in the bases, ...

        Then train as before (the model holds a ``PeftModel`` somewhere inside):

        ```python
        trainer = HiggsAudioTrainer(model=wrapper, args=training_args, train_dataset=ds)
        trainer.train()  # every checkpoint-N/lora_adapters written and verified
        trainer.save_model()  # output_dir/lora_adapters
        ```
    """

    def __init__(
        self,
        *args: Any,
        lora_model_path: str | None = None,
        save_embedding_layers: bool = False,
        adapter_only_checkpoints: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__} uses LoraAdapterSavingMixin without a transformers.Trainer: combine them, "
                f"e.g. class {type(self).__name__}(LoraAdapterSavingMixin, Trainer)"
            )
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module):
            check_accelerate_can_unwrap(model)
        self.lora_model_path = lora_model_path
        self.save_embedding_layers = save_embedding_layers
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.last_saved_adapter: SavedAdapter | None = None
        self._saving_checkpoint = False  # True inside _save_checkpoint: what makes a save a checkpoint-N one
        for callback in kwargs.get("callbacks") or []:  # e.g. SpeechSamplesCallback: it samples at our saves
            if hasattr(callback, "bind_trainer"):
                callback.bind_trainer(self)
        super().__init__(*args, **kwargs)
        if adapter_only_checkpoints and self.is_fsdp_enabled:
            raise HiggsTrainerError(
                "adapter_only_checkpoints=True supports single-process, DDP and DeepSpeed training; under FSDP keep "
                "full checkpoints (each still gets a verified lora_adapters)."
            )
        if self.model is not None:  # with model_init the model exists only once train() starts
            component = self.lora_component()
            self._check_options(component)
            logger.info("LoRA adapters will be saved from the PeftModel at %s", component.display_path)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(LoraAdapterSavingMixin) > mro.index(Trainer):
            raise TypeError(
                f"{cls.__name__}: LoraAdapterSavingMixin must come before the Trainer class in the bases, or its "
                f"saving never runs: class {cls.__name__}(LoraAdapterSavingMixin, <your Trainer>)"
            )

    def _check_options(self, component: LoraComponent) -> None:
        """Refuse, before training, setups that could not be saved or resumed as promised."""
        not_lora = {name: config.peft_type for name, config in component.model.peft_config.items()}
        not_lora = {name: str(getattr(kind, "value", kind)) for name, kind in not_lora.items() if kind != PeftType.LORA}
        if not_lora:
            kinds = ", ".join(f"{name!r} is {kind}" for name, kind in not_lora.items())
            raise HiggsTrainerError(
                f"the PeftModel at {component.display_path} holds non-LoRA adapters ({kinds}); higgs_trainer saves and "
                "verifies LoRA adapters only: build it with peft.LoraConfig, or use plain transformers.Trainer"
            )
        if self.args.should_save:
            try:
                check_replaceable(Path(self.args.output_dir) / ADAPTER_DIRNAME)
            except NotADirectoryError as exc:
                raise HiggsTrainerError(f"cannot save the adapter there: {exc}") from exc
        if self.save_embedding_layers:
            try:
                component.model.get_input_embeddings()
            except (NotImplementedError, AttributeError) as exc:
                raise HiggsTrainerError(
                    f"save_embedding_layers=True needs a base model with get_input_embeddings(); "
                    f"{type(component.model.get_base_model()).__name__} has none: keep the default False"
                ) from exc
            if self._adapter_is_gathered():
                raise HiggsTrainerError(
                    "save_embedding_layers=True needs the full state dict at save time: set DeepSpeed's "
                    "stage3_gather_16bit_weights_on_model_save: true (or FSDP's FULL_STATE_DICT)"
                )
        if self.adapter_only_checkpoints:
            root = unwrap_model(self.model)
            inside = f"{component.path}." if component.path else ""
            trainable = [canonical_name(name) for name, param in root.named_parameters() if param.requires_grad]
            outside = [name for name in trainable if not name.startswith(inside)]
            if outside:
                raise HiggsTrainerError(
                    f"adapter_only_checkpoints=True keeps only the PeftModel at {component.display_path}, but "
                    f"{len(outside)} trainable parameter(s) lie outside it ({listed(outside)}): a resume would lose "
                    "their training. Make them part of the PeftModel (modules_to_save) or keep full checkpoints."
                )

    def _check_lora_trainable(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Refuse to train LoRA parameters that are frozen or, with ``optimizer``, absent from its param groups."""
        peft_model = self.lora_component().model
        adapters = getattr(peft_model, "active_adapters", None) or list(peft_model.peft_config)
        # FSDP flattens parameters into its own: the optimizer holds those, not the LoRA parameter objects.
        check_lora_trainable(peft_model, None if self.is_fsdp_enabled else optimizer, adapters)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        # Also returns an optimizer handed in through Trainer(optimizers=(optimizer, scheduler)): checked the same way.
        optimizer = super().create_optimizer(*args, **kwargs)
        self._check_lora_trainable(optimizer)
        return optimizer

    def _warn_if_untrained(self, saved: SavedAdapter | None) -> None:
        """One WARNING when the adapter just saved still equals peft's zero init after at least one optimizer step."""
        if saved is None or self.state.global_step < 1:
            return
        if saved.untrained:
            logger.warning(
                "The LoRA adapter saved to %s after %d optimizer step(s) never trained: every lora_B is still zero, "
                "peft's initialisation, so it changes nothing. Likely causes: %s.",
                ", ".join(saved.untrained),
                self.state.global_step,
                LIKELY_CAUSES,
            )

    def lora_component(self) -> LoraComponent:
        """The PEFT component that is saved, found in the unwrapped model.

        Examples:
            ```python
            trainer.lora_component().path  # 'model' for a community HiggsAudioModelWrapper
            ```
        """
        return _component_of(self, self.lora_model_path)

    def _adapter_is_gathered(self) -> bool:
        """True when ``_save`` gets no usable weights and the adapter is gathered in ``save_model`` instead.

        Decided from the configuration alone, so every rank takes the same branch: DeepSpeed
        ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` hands ``_save`` ``{}``;
        FSDP without ``FULL_STATE_DICT`` never calls ``_save``.
        """
        if self.is_deepspeed_enabled:
            zero = self.accelerator.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            return zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False)
        if self.is_fsdp_enabled:
            return not fsdp_saves_full_state_dict(self.accelerator.state.fsdp_plugin)
        return False

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        self._saving_checkpoint = True  # save_model's _internal_call is also set by push_to_hub: not enough
        try:
            return super()._save_checkpoint(*args, **kwargs)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.adapter_only_checkpoints and self._saving_checkpoint:  # checkpoint-N only
            self._save_adapter_only_checkpoint(output_dir if output_dir is not None else self.args.output_dir)
            return
        if self.is_fsdp_enabled:
            reregister_fsdp1_original_parameters(self.model_wrapped)  # one process only: see the shim
        super().save_model(output_dir, _internal_call)
        if self._adapter_is_gathered():  # collective: every rank gathers, only the writer writes
            self.last_saved_adapter = save_lora_adapters(self, output_dir)
            self._warn_if_untrained(self.last_saved_adapter)
        if not self._saving_checkpoint:  # the final save: checkpoint-N ones are heard in the callbacks' on_save
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "on_final_save"):
                    callback.on_final_save(self, output_dir)

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)
        if hasattr(callback, "bind_trainer") and not isinstance(callback, type):  # added after construction
            callback.bind_trainer(self)
            callback.on_init_end(
                self.args, self.state, self.control, model=self.model, processing_class=self.processing_class
            )

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        live = state_dict is None  # Trainer hands _save a state dict only where it gathered one (DeepSpeed, FSDP)
        if self.args.should_save and not isinstance(self.model, (PreTrainedModel, PeftModel)):
            # One state dict serves the full checkpoint and the adapter; tied tensors get their own storage.
            state_dict = clone_shared_tensors(self.model.state_dict() if state_dict is None else state_dict)
        super()._save(output_dir, state_dict=state_dict)
        # transformers 5.x calls _save on every rank, 4.46 only on the writer: only the writer writes.
        if self.args.should_save and not self._adapter_is_gathered():
            self.last_saved_adapter = write_lora_adapters(
                self.lora_component(),
                output_dir,
                state_dict=state_dict,
                save_embedding_layers=self.save_embedding_layers,
                state_dict_is_live=live and not (self.is_deepspeed_enabled or self.is_fsdp_enabled),
            )
            self._warn_if_untrained(self.last_saved_adapter)

    def _save_adapter_only_checkpoint(self, output_dir: str) -> None:
        """The model part of an adapter-only checkpoint: the adapter, training arguments and tokenizer, no base weights."""
        self.last_saved_adapter = save_lora_adapters(self, output_dir)  # gathers on every rank when sharded
        self._warn_if_untrained(self.last_saved_adapter)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # transformers' TRAINING_ARGS_NAME
        marker = {"adapter_dir": ADAPTER_DIRNAME, "component": self.last_saved_adapter.component_path}
        with open(os.path.join(output_dir, ADAPTER_ONLY_MARKER), "w") as handle:
            json.dump(marker, handle)

    # Trainer puts its DeepSpeed engine in `model_wrapped` right after accelerator.prepare and loads a checkpoint into
    # it from there (`deepspeed_load_checkpoint(self.model_wrapped, ...)`, on resume and for load_best_model_at_end);
    # with adapter-only checkpoints the engine must accept a module state without the frozen base weights. Hooked on
    # `model_wrapped`, the attribute Trainer itself works with, not on `self.deepspeed`, which Trainer sets only for
    # "backward compatibility".
    @property
    def model_wrapped(self) -> Any:
        return self.__dict__.get("_model_wrapped")

    @model_wrapped.setter
    def model_wrapped(self, model: Any) -> None:
        if getattr(self, "adapter_only_checkpoints", False) and _is_deepspeed_engine(self, model):
            allow_missing_frozen_parameters(model)
        self.__dict__["_model_wrapped"] = model

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not (self.adapter_only_checkpoints and self.is_deepspeed_enabled):
            return super()._save_optimizer_and_scheduler(output_dir)
        # Trainer passes exclude_frozen_parameters=True only for a top-level PeftModel (see the shim).
        with exclude_frozen_parameters_on_save(self.model_wrapped):
            super()._save_optimizer_and_scheduler(output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, after checking the LoRA parameters train; ``resume_from_checkpoint=True`` takes the newest
        *complete* ``checkpoint-N``.

        ``Trainer`` takes the highest-numbered one, which after a kill during a save is the
        partial one, and fails on its missing files; here an interrupted checkpoint is skipped with
        a warning (and naming one explicitly is refused with the name of the one to use).
        """
        if self.model is not None:  # with model_init the model exists only inside train(): create_optimizer checks
            self._check_lora_trainable()
        if resume_from_checkpoint:
            resume_from_checkpoint = checkpoint_to_resume(self.args.output_dir, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if is_adapter_only_checkpoint(resume_from_checkpoint):
            load_lora_adapters(self.lora_component(), os.path.join(resume_from_checkpoint, ADAPTER_DIRNAME))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        # Under DeepSpeed the parameters are partitioned: Trainer loads the engine's own checkpoint (frozen base left
        # out, allowed by the `model_wrapped` setter); loading the adapter into live partitioned parameters would not stick.
        if best is not None and is_adapter_only_checkpoint(best) and not self.is_deepspeed_enabled:
            logger.info("Loading best model from %s (adapter-only checkpoint)", best)
            load_lora_adapters(self.lora_component(), os.path.join(best, ADAPTER_DIRNAME))
            return
        super()._load_best_model()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and load_optimizer_and_scheduler_on_cpu(self, checkpoint):  # DDP on CPU, 4.46
            return
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with rng_state_safe_globals():
            super()._load_rng_state(checkpoint)


class HiggsLoraTrainer(LoraAdapterSavingMixin, Trainer):
    """``transformers.Trainer`` that writes a verified LoRA adapter into every checkpoint and the final save.

    A drop-in replacement: same constructor, plus the optional arguments of
    `LoraAdapterSavingMixin` (``lora_model_path``, ``save_embedding_layers``,
    ``adapter_only_checkpoints``).

    Args:
        *args: ``transformers.Trainer``'s arguments (``model``, ``args``, ``train_dataset``, ...).
        lora_model_path: dotted path of the ``PeftModel`` to save, when the model holds more than one.
        save_embedding_layers: save embedding layers with the adapter (default ``False``).
        adapter_only_checkpoints: ``checkpoint-N`` without the frozen base weights (see
            `LoraAdapterSavingMixin`).
        **kwargs: ``transformers.Trainer``'s keyword arguments.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from pathlib import Path
        >>> from transformers import TrainingArguments
        >>> class Wrapper(torch.nn.Module):  # like the community HiggsAudioModelWrapper: the model is its .model
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)})
        ...     def forward(self, x, y):
        ...         return {"loss": torch.nn.functional.mse_loss(self.model.q_proj(x), y)}
        >>> wrapper = Wrapper()
        >>> wrapper.model = get_peft_model(wrapper.model, LoraConfig(r=2, target_modules=["q_proj"]))
        >>> data = [{"x": torch.randn(8), "y": torch.randn(8)} for _ in range(8)]
        >>> args = TrainingArguments("out", max_steps=4, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
        >>> trainer = HiggsLoraTrainer(model=wrapper, args=args, train_dataset=data)
        >>> _ = trainer.train()  # prints the training metrics
        {'train_runtime': ...}
        >>> trainer.save_model()
        >>> sorted(str(p) for p in Path("out").glob("**/lora_adapters"))
        ['out/checkpoint-2/lora_adapters', 'out/checkpoint-4/lora_adapters', 'out/lora_adapters']
    """


def save_lora_adapters(
    trainer: Trainer, output_dir: str | os.PathLike | None = None, use_lora: bool = True
) -> SavedAdapter | None:
    """Save the LoRA adapter of ``trainer.model`` into ``output_dir/lora_adapters``, for scripts that keep their own Trainer.

    Call it on every process, after ``trainer.save_model()``; only the process that should save
    writes (others return ``None``). Returns what was written, or ``None`` when ``use_lora`` is
    false. Raises if no PEFT component is found or the save fails.

    Args:
        trainer: the ``transformers.Trainer`` (any subclass) whose model holds the ``PeftModel``.
        output_dir: the directory to write ``lora_adapters`` into; default ``trainer.args.output_dir``.
        use_lora: False skips the save (for scripts that train with or without LoRA).

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from transformers import Trainer, TrainingArguments
        >>> wrapper = torch.nn.Module()  # a community-style wrapper; its .model becomes the PeftModel
        >>> wrapper.model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"]))
        >>> trainer = Trainer(model=wrapper, args=TrainingArguments("out", report_to=[], use_cpu=True))
        >>> trainer.save_model()  # the wrapper's full state dict only
        >>> save_lora_adapters(trainer, trainer.args.output_dir, use_lora=True)
        SavedAdapter(path='out/lora_adapters', component_path='model', num_tensors=2, ...)
    """
    if not use_lora:
        logger.info("use_lora is false: no LoRA adapter saved")
        return None
    component = _component_of(trainer, getattr(trainer, "lora_model_path", None))
    state_dict = None
    if is_sharded(trainer.model_wrapped) or is_sharded(component.model):
        # Collective: every rank gathers the adapter's parameters, only the writer writes.
        state_dict = gather_adapter_state_dict(component, trainer.args.should_save, fsdp_root=trainer.model_wrapped)
    if not trainer.args.should_save:
        return None
    return write_lora_adapters(
        component,
        output_dir if output_dir is not None else trainer.args.output_dir,
        state_dict=state_dict,
        save_embedding_layers=getattr(trainer, "save_embedding_layers", False),
    )
