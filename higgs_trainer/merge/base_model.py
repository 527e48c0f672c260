"""The base model of a merge: its class from ``config.json``, built empty, loaded in its own dtype, checked complete.

A ``higgs_audio`` config is built through ``boson_multimodal``'s ``HiggsAudioModel`` (imported only
then), every other config through transformers.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights

from .._compat import from_pretrained_kwargs
from ..errors import (
    CheckpointError,
    HiggsTrainerError,
    first_line,
    listed,
)
from ..files.checkpoint import CheckpointWeights
from ..files.paths import (
    read_json_object,
)

logger = logging.getLogger(__name__)

HIGGS_MODEL_TYPE = "higgs_audio"


def model_class_for(base_dir: str | os.PathLike) -> tuple[Any, type]:
    """``(config, model class)`` for the model saved in ``base_dir``, from its ``config.json`` alone.

    A ``higgs_audio`` config needs ``boson_multimodal`` (imported here, not before) for
    ``HiggsAudioModel``; other model types use the class named in ``architectures`` or, failing
    that, ``AutoModelForCausalLM`` / ``AutoModel``. Nothing is downloaded.

    Examples:
        >>> transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained("base")
        >>> config, cls = model_class_for("base")
        >>> cls.__name__
        'LlamaForCausalLM'
    """
    base_dir = Path(base_dir)
    path = base_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{base_dir} is not a model directory: no config.json")
    raw = read_json_object(path, CheckpointError)
    if raw.get("model_type") == HIGGS_MODEL_TYPE:
        try:
            from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
        except ImportError as exc:
            raise HiggsTrainerError(
                f"{base_dir} is a higgs_audio model, which loads only through boson_multimodal's HiggsAudioModel, "
                f"and boson_multimodal cannot be imported ({first_line(exc)}); install it, e.g. "
                "`pip install --no-deps boson-multimodal`"
            ) from exc
        return HiggsAudioConfig.from_pretrained(str(base_dir), local_files_only=True), HiggsAudioModel
    try:
        # Never run a model directory's own Python (config.json's auto_map), whatever the user answers to a prompt.
        config = transformers.AutoConfig.from_pretrained(str(base_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        if "auto_map" in raw:
            raise CheckpointError(
                f"{base_dir} needs its own Python code to load (auto_map in config.json, model_type "
                f"{raw.get('model_type')!r}), and higgs-trainer never runs code from a model directory; merge it "
                "with that code yourself"
            ) from exc
        raise CheckpointError(
            f"transformers {transformers.__version__} cannot read the config in {base_dir}: {first_line(exc)}"
        ) from exc
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return config, cls
    for mapping in (transformers.MODEL_FOR_CAUSAL_LM_MAPPING, transformers.MODEL_MAPPING):
        try:
            return config, mapping[type(config)]
        except KeyError:
            continue
    raise CheckpointError(f"no transformers model class for {type(config).__name__} in {base_dir}")


def empty_base_model(base_dir: str | os.PathLike) -> torch.nn.Module:
    """The base model built from its config on the meta device: module names and shapes, no weights.

    Examples:
        >>> transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained("base")
        >>> "model.layers.0.self_attn.q_proj" in dict(empty_base_model("base").named_modules())
        True
    """
    config, cls = model_class_for(base_dir)
    with init_empty_weights():
        return cls(config, **model_init_kwargs(base_dir, cls))


def model_init_kwargs(
    base_dir: str | os.PathLike, cls: type, weight_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Constructor arguments the model in ``base_dir`` needs beyond its config, read from its weights' keys.

    transformers' ``HiggsAudioV2ForConditionalGeneration`` builds ``text_lm_head`` only with
    ``use_text_head=True``, which its config does not record: built or loaded from the config alone,
    a base trained with a text head loses it (and a ``modules_to_save`` on it lands nowhere). Only
    the weight files' headers are read (not even those when the caller has ``weight_names``); a directory
    without weights gets ``{}``.

    Examples:
        >>> model_init_kwargs("no-such-dir", torch.nn.Linear)
        {}
    """
    if "use_text_head" not in inspect.signature(cls.__init__).parameters:
        return {}
    if weight_names is not None:
        return {"use_text_head": True} if "text_lm_head.weight" in weight_names else {}
    try:
        with CheckpointWeights(base_dir) as weights:
            return {"use_text_head": True} if "text_lm_head.weight" in weights.shapes else {}
    except CheckpointError:
        return {}


def load_base_model(base_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load the base model's weights, in the dtype it was saved in unless ``dtype`` says otherwise.

    Loads without first building randomly initialised weights, and refuses a checkpoint that
    leaves any weight of the model uninitialised.

    Examples:
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        >>> transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained("base")
        >>> load_base_model("base").dtype
        torch.bfloat16
    """
    config, cls = model_class_for(base_dir)
    kwargs = {
        "local_files_only": True,
        "trust_remote_code": False,  # never run a model directory's own code
        "output_loading_info": True,
        **from_pretrained_kwargs(dtype or "auto"),
    }
    try:
        model, info = cls.from_pretrained(str(base_dir), config=config, **kwargs, **model_init_kwargs(base_dir, cls))
    except Exception as exc:  # OSError for missing files, safetensors/RuntimeError for corrupt or mismatched ones
        raise CheckpointError(f"cannot load the base model from {base_dir}: {first_line(exc)}") from exc
    # transformers < 5 with low_cpu_mem_usage reports no missing keys for weights absent from the files: they stay
    # on the meta device and fail later with "cannot be called on meta tensors". Both are checked.
    missing = sorted(set(info.get("missing_keys") or []) | set(_meta_tensor_names(model)))
    if missing:
        raise CheckpointError(_incomplete_base(base_dir, cls.__name__, missing))
    model.eval()
    return model


def check_base_complete(base_dir: str | os.PathLike, stored: Iterable[str]) -> None:
    """Refuse a base whose weight files lack weights its model has (`CheckpointError` naming them).

    ``stored`` are the tensor names in the files. The model is built on the meta device (no
    weights); a weight tied to another (``lm_head`` to the embeddings) may be absent when its twin
    is there, as ``save_pretrained`` writes it. The streaming merge copies the files it finds: without
    this a shard lost or truncated before the merge would give a merged model missing those weights.
    A ``higgs_audio`` base where ``boson_multimodal`` cannot be imported (the streaming merge itself
    needs none) is not checked, with a warning saying so.

    Examples:
        >>> import transformers
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
        >>> transformers.LlamaForCausalLM(config).save_pretrained("base")
        >>> check_base_complete("base", ["model.embed_tokens.weight"])  # lm_head.weight is tied to it
        Traceback (most recent call last):
        higgs_trainer.errors.CheckpointError: the weights in base lack 10 weight(s) of LlamaForCausalLM: 'model.layers.0.input_layernorm.weight', 'model.layers.0.mlp.down_proj.weight', 'model.layers.0.mlp.gate_proj.weight' and 7 more; the base is incomplete (a shard missing or truncated?): not merging into missing weights
    """
    try:
        config, cls = model_class_for(base_dir)
    except HiggsTrainerError as exc:
        if type(exc) is not HiggsTrainerError:  # CheckpointError and the like: a broken base, reported as such
            raise
        logger.warning("not checking that %s holds every weight of its model: %s", base_dir, first_line(exc))
        return
    stored = set(stored)
    with torch.device("meta"):  # not accelerate's init_empty_weights, which re-creates parameters and unties them
        model = cls(config, **model_init_kwargs(base_dir, cls, stored))
    names_of: dict[int, list[str]] = {}  # one entry per distinct tensor: tied weights share one
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    missing = sorted(name for names in names_of.values() if not stored & set(names) for name in names)
    if missing:
        raise CheckpointError(_incomplete_base(base_dir, cls.__name__, missing))


def _incomplete_base(base_dir: str | os.PathLike, model_class: str, missing: list[str]) -> str:
    return (
        f"the weights in {base_dir} lack {len(missing)} weight(s) of {model_class}: {listed(missing)}; "
        "the base is incomplete (a shard missing or truncated?): not merging into missing weights"
    )


def _meta_tensor_names(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers of ``model`` still on the meta device, i.e. never loaded."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in tensors if tensor.is_meta]
