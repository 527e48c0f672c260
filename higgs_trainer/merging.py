"""Merge a LoRA adapter into its base model and save the result (``higgs-trainer merge``).

What the community ``merger.py`` does, done safely: the base loads in its own dtype (no float32
upcast), through ``boson_multimodal``'s ``HiggsAudioModel`` for a ``higgs_audio`` config (imported
only then) and through transformers otherwise; the adapter is checked against the base's modules
before any weight is loaded and after it is applied (every adapter key must have landed);
``merge_and_unload`` merges in place, so peak memory stays near one copy of the model; the result
is written in safetensors into a staging directory and renamed into place with the base's
tokenizer and generation config files and a ``merge_info.json``.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from ._compat import from_pretrained_kwargs, save_pretrained_safetensors
from .atomic import staged_directory
from .checkpoint import CheckpointWeights
from .errors import (
    PROGRAMMING_ERRORS,
    AdapterVerificationError,
    CheckpointError,
    HiggsTrainerError,
    MergeError,
    UsageError,
    first_line,
    listed,
)
from .lora_keys import split_lora_key
from .merge_plan import IN_MEMORY, check_floating_targets, lora_target_weights
from .names import PEFT_KEY_PREFIX
from .paths import (
    existing_directory,
    output_directory,
    read_adapter_config,
    read_adapter_tensors,
    read_json_object,
    resolve_adapter_dir,
)
from .safetensors_files import StoredTensor, parse_size, read_stored_tensors, safetensors_weight_files
from .streaming_merge import stream_merge
from .support_files import copy_support_files
from .untrained import untrained_problem
from .verification import (
    check_adapter_modules,
    human_size,
    saved_modules,
    verify_adapter,
)

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIGGS_MODEL_TYPE = "higgs_audio"
PROBE_TOKENS = 16


@dataclass
class MergeResult:
    """What `merge_adapter` wrote.

    Examples:
        ```python
        result = merge_adapter("higgs-audio-v2-base", "out/lora_adapters", "merged")
        result.model_class, result.dtype, result.merged_modules  # ('HiggsAudioModel', 'bfloat16', 196)
        ```
    """

    path: str
    base: str
    adapter: str
    model_class: str
    dtype: str
    merged_modules: int
    num_parameters: int
    num_bytes: int
    copied_files: list[str]
    seconds: float
    compare: dict | None = None
    modules_to_save: list[str] = field(default_factory=list)  # modules replaced by their trained copies
    method: str = "in-memory"


# the base model


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


def _stored_dtypes(base_dir: Path, stored: Mapping[str, StoredTensor] | None) -> dict[str, torch.dtype]:
    """The dtype of each tensor in the base's weight files, as saved (before any loader casts it); {} without weights."""
    if stored is not None:
        return {name: tensor.torch_dtype for name, tensor in stored.items()}
    try:
        with CheckpointWeights(base_dir) as weights:  # a pickle is memory-mapped: nothing is copied
            return weights.dtypes
    except CheckpointError:  # no weights: loading the base says so
        return {}


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


# checks


def _check_applied(peft_model: PeftModel, tensors: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Every tensor of the adapter file landed in a LoRA module, and every LoRA module got one.

    Embedding weights that peft saves beside the LoRA tensors (``save_embedding_layers``, for a
    targeted or resized embedding) are loaded into the base too, so they count as landed.
    """
    applied = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    try:
        embeddings = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True)) - applied
    except (NotImplementedError, AttributeError, ValueError):  # a model without get_input_embeddings (HiggsAudioModel)
        embeddings = set()
    unexpected, missing = sorted(set(tensors) - applied - embeddings), sorted(applied - set(tensors))
    if unexpected or missing:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model: {len(unexpected)} adapter tensor(s) matched no "
            f"module {unexpected[:3]}, {len(missing)} LoRA module(s) got no tensor {missing[:3]}"
        )


def _check_finite(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The merged weights hold no NaN or inf (what peft's safe_merge checks, without its copy of every weight)."""
    names = {lora.module[len(PEFT_KEY_PREFIX) :] for lora in map(split_lora_key, tensors) if lora is not None}
    modules = dict(model.named_modules())
    broken = [n for n in sorted(names) if n in modules and not bool(torch.isfinite(modules[n].weight).all())]
    if broken:
        raise MergeError(
            f"merged weights of {len(broken)} module(s) hold NaN or inf (adapter too large for the dtype?): {broken[:3]}"
        )


# comparing logits


def probe_inputs(config: Any, length: int = PROBE_TOKENS) -> dict[str, torch.Tensor]:
    """A fixed batch of one random text sequence, avoiding the config's special (e.g. audio) token ids.

    Examples:
        >>> probe_inputs(transformers.LlamaConfig(vocab_size=100))["input_ids"].shape
        torch.Size([1, 16])
    """
    text_config = getattr(config, "text_config", None) or config
    vocab = int(getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", 2))
    special = set()
    for cfg in (config, text_config):
        for name, value in vars(cfg).items():
            if "token" in name and isinstance(value, int) and not isinstance(value, bool):
                special.add(value)
    allowed = torch.tensor([i for i in range(1, min(vocab, 32000)) if i not in special] or [0])
    generator = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(len(allowed), (1, length), generator=generator)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def _logits(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**probe)
    logits = output["logits"] if isinstance(output, dict) else output.logits
    return logits[:, : probe["input_ids"].shape[1]].float()


def _difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    delta = (a - b).abs()
    return {"max_abs": float(delta.max()), "mean_abs": float(delta.mean())}


# writing


def _dtype_name(model: torch.nn.Module) -> str:
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return str(max(counts, key=counts.get)).replace("torch.", "") if counts else "unknown"


def merge_info(
    base_dir: Path,
    adapter_dir: Path,
    config: dict,
    method: str,
    model_class: str | None,
    dtype_name: str,
    merged_modules: int,
    modules_to_save: list[str],
) -> dict:
    """What ``merge_info.json`` records of a merge (``compare`` is filled in when the outputs were compared).

    Examples:
        >>> merge_info(Path("base"), Path("adapter"), {"r": 4}, "streaming", None, "bfloat16", 2, [])["adapter_config"]
        {'r': 4, 'lora_alpha': None, 'target_modules': None, 'use_rslora': None}
    """
    return {
        "base": str(base_dir.resolve()),
        "adapter": str(adapter_dir.resolve()),
        "model_class": model_class,
        "dtype": dtype_name,
        "method": method,
        "adapter_config": {k: config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora")},
        "merged_modules": merged_modules,
        "modules_to_save": modules_to_save,
        "merged_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "compare": None,
    }


def _versions() -> dict[str, str]:
    import peft

    from . import __version__

    return {
        "higgs_trainer": __version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
    }


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    compare: bool = False,
    overwrite: bool = False,
    allow_untrained: bool = False,
    streaming: bool | None = None,
    max_shard_size: int | str | None = None,
) -> MergeResult:
    """Merge the LoRA adapter at ``adapter`` into the model at ``base`` and save the merged model at ``output``.

    ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``) overrides the dtype the base
    was saved in. With ``compare``, the logits of base, adapter and merged model on a probe input
    are compared and recorded in ``merge_info.json``. An adapter that never trained (every ``lora_B`` still
    at peft's zero init, `untrained.untrained_problem`) is refused unless ``allow_untrained``.

    A safetensors base is merged tensor by tensor without building the model
    (`streaming_merge.stream_merge`) unless ``streaming=False``; a ``pytorch_model.bin`` base, or
    ``streaming=False``, loads the model and merges with peft's ``merge_and_unload`` in memory.
    Either way the output's weight files hold at most ``max_shard_size`` bytes each (a byte count or
    a size such as ``"5GB"``, `safetensors_files.parse_size`; default: transformers' ``save_pretrained``'s).

    Raises:
        UsageError: a path does not exist, ``output`` is not empty (without ``overwrite``), ``dtype``
            is not one of ``bf16``, ``fp16``, ``fp32``, or ``max_shard_size`` is not a size.
        HiggsTrainerError: the base is a ``higgs_audio`` model and ``boson_multimodal`` cannot be imported.
        AdapterVerificationError: the adapter is broken or does not fit the base model.
        CheckpointError: the base model cannot be read or loaded.
        MergeError: merging or writing failed; nothing was written.

    Examples:
        >>> import transformers
        >>> from peft import LoraConfig, get_peft_model
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> transformers.LlamaForCausalLM(config).save_pretrained("base")
        >>> lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # as if trained
        >>> get_peft_model(transformers.LlamaForCausalLM(config), lora).save_pretrained("out/lora_adapters")
        >>> result = merge_adapter("base", "out/lora_adapters", "merged", compare=True)
        >>> result.model_class, result.dtype, result.merged_modules
        ('LlamaForCausalLM', 'float32', 2)
        >>> result.compare["adapter_vs_merged"]["max_abs"] < 1e-4 < result.compare["base_vs_merged"]["max_abs"]
        True
    """
    start = time.perf_counter()
    base_dir = existing_directory(base, "base model")
    adapter_dir = resolve_adapter_dir(adapter)
    output = output_directory(output, overwrite, inputs=[base_dir, adapter_dir])
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]

    verify_adapter(adapter_dir)
    config, tensors = read_adapter_config(adapter_dir), read_adapter_tensors(adapter_dir)
    untrained = untrained_problem(config, tensors)  # both paths refuse it
    if untrained is not None:
        if not allow_untrained:
            raise AdapterVerificationError(
                f"refusing to merge the adapter at {adapter_dir}: {untrained}. Pass --allow-untrained "
                "(allow_untrained=True) to merge it anyway."
            )
        logger.warning("merging the adapter at %s anyway (allow_untrained): %s", adapter_dir, untrained)
    # A safetensors base's headers are checked on both paths (what safetensors' loader refuses, a tensor stored twice).
    files = safetensors_weight_files(base_dir)
    stored = read_stored_tensors(base_dir, files, "the base model") if files else None
    if stored is not None and streaming is not False:
        return stream_merge(
            base_dir,
            adapter_dir,
            output,
            files,
            config=config,
            tensors=tensors,
            stored=stored,
            dtype=dtype,
            compare=compare,
            max_shard_size=shard_bytes,
            check=functools.partial(check_base_complete, base_dir, list(stored)),
        )
    if streaming:
        raise UsageError(f"{base_dir} has no safetensors weights, which the streaming merge reads; {IN_MEMORY}")
    logger.info("Merging in memory (%s)", "asked for" if streaming is False else "the base has no safetensors weights")
    problems = check_adapter_modules(tensors, empty_base_model(base_dir))
    if problems:
        raise AdapterVerificationError(
            f"the adapter at {adapter_dir} does not fit the base model at {base_dir}: " + "; ".join(problems)
        )

    check_floating_targets(_stored_dtypes(base_dir, stored), lora_target_weights(tensors), base_dir)
    logger.info("Loading the base model from %s", base_dir)
    model = load_base_model(base_dir, dtype)
    model_class = type(model).__name__
    probe = probe_inputs(model.config) if compare else None
    logits: dict[str, torch.Tensor] = {}
    try:
        if probe is not None:
            logits["base"] = _logits(model, probe)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, targets not found
            raise AdapterVerificationError(
                f"the adapter at {adapter_dir} does not fit the base model at {base_dir}: {first_line(exc)}"
            ) from exc
        _check_applied(peft_model, tensors, adapter_dir)
        merged_modules = sum(1 for lora in map(split_lora_key, tensors) if lora is not None and lora.is_a)
        saved, _ = saved_modules(config, tensors)
        if probe is not None:
            logits["adapter"] = _logits(peft_model, probe)
        # In place (safe_merge=False): safe_merge clones every merged weight, a second copy of most of the model.
        merged = peft_model.merge_and_unload(progressbar=sys.stderr.isatty(), safe_merge=False)
        _check_finite(merged, tensors)
        if probe is not None:
            logits["merged"] = _logits(merged, probe)
    except HiggsTrainerError:
        raise
    except Exception as exc:
        raise MergeError(f"merging the adapter at {adapter_dir} into {base_dir} failed: {first_line(exc)}") from exc
    del model, peft_model

    comparison = None
    if logits:
        comparison = {
            "probe_tokens": probe["input_ids"].shape[1],
            "base_vs_merged": _difference(logits["base"], logits["merged"]),
            "adapter_vs_merged": _difference(logits["adapter"], logits["merged"]),
        }
    dtype_name = _dtype_name(merged)
    num_parameters = sum(p.numel() for p in merged.parameters())
    info = merge_info(base_dir, adapter_dir, config, "in-memory", model_class, dtype_name, merged_modules, saved)
    info["compare"] = comparison
    logger.info("Writing the merged model (%s, %s) to %s", model_class, dtype_name, output)
    try:
        with staged_directory(output) as staging:
            save_pretrained_safetensors(merged, staging, shard_bytes)
            copied = copy_support_files(base_dir, staging)
            (staging / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
            num_bytes = sum(f.stat().st_size for f in staging.iterdir() if f.suffix == ".safetensors")
    except (HiggsTrainerError, *PROGRAMMING_ERRORS):
        raise
    except Exception as exc:  # OSError (a full disk), safetensors' and torch's errors
        raise MergeError(f"writing the merged model to {output} failed: {first_line(exc)} (nothing written)") from exc
    result = MergeResult(
        path=str(output),
        base=str(base_dir),
        adapter=str(adapter_dir),
        model_class=model_class,
        dtype=dtype_name,
        merged_modules=merged_modules,
        num_parameters=num_parameters,
        num_bytes=num_bytes,
        copied_files=copied,
        seconds=time.perf_counter() - start,
        compare=comparison,
        modules_to_save=saved,
    )
    logger.info("Merged model written to %s (%s)", output, human_size(num_bytes))
    return result


__all__ = [
    "DTYPES",
    "MergeResult",
    "empty_base_model",
    "load_base_model",
    "merge_adapter",
    "model_class_for",
    "probe_inputs",
    "resolve_adapter_dir",
]
