"""The configs of the two Higgs Audio v2 layouts: ``adapter_config.json`` and ``config.json``, converted as plain dicts.

Each library's defaults are one table here (a saved ``config.json`` omits the values equal to
them), and `expected_shapes` derives every weight of a model from its config without building it.
Nothing here imports boson_multimodal.

Examples:
    >>> convert_model_config({"model_type": "higgs_audio_v2", "num_hidden_layers": 2}, "boson")["model_type"]
    'higgs_audio'
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from ..errors import CheckpointError
from .keys import (
    ARCHITECTURES,
    BOSON,
    MODEL_MODULES,
    MODEL_TYPES,
    STREAM_TOKENS,
    TRANSFORMERS,
    convert_key,
    convert_name,
    convert_target_regex,
)


def _convert_names(value, to: str):
    if isinstance(value, str):
        return value
    return None if value is None else [convert_name(v, to) for v in value]


def convert_adapter_config(config: Mapping, to: str) -> dict:
    """An ``adapter_config.json`` dict for layout ``to``: module names, regexes and pattern keys rewritten.

    ``base_model_name_or_path`` is left as given. Towards boson, ``task_type`` becomes None:
    ``HiggsAudioModel.forward`` takes no ``labels``, which peft's task models pass.

    Examples:
        >>> convert_adapter_config({"target_modules": ["q_proj"], "modules_to_save": ["audio_decoder_proj.audio_lm_head"]},
        ...                        "transformers")["modules_to_save"]
        ['audio_lm_head']
    """
    new = copy.deepcopy(dict(config))
    for field in ("target_modules", "exclude_modules"):
        value = new.get(field)
        new[field] = convert_target_regex(value, to) if isinstance(value, str) else _convert_names(value, to)
        if value is None and field not in config:
            del new[field]
    if new.get("modules_to_save") is not None:
        new["modules_to_save"] = [convert_name(m, to) for m in new["modules_to_save"]]
    for field in ("rank_pattern", "alpha_pattern"):
        if new.get(field):
            new[field] = {convert_name(k, to): v for k, v in new[field].items()}
    if new.get("auto_mapping"):  # what AutoPeftModel imports: the model class of this layout
        new["auto_mapping"] = {"base_model_class": ARCHITECTURES[to], "parent_library": MODEL_MODULES[to]}
    if to == BOSON and new.get("task_type") is not None:
        new["task_type"] = None
    return new


# model configs


_BOSON_DEFAULTS = dict(  # HiggsAudioConfig's defaults: a saved config.json omits the values equal to them
    audio_adapter_type="stack", audio_num_codebooks=12, audio_codebook_size=1024, audio_stream_bos_id=1024,
    audio_stream_eos_id=1025, audio_out_token_idx=128016, audio_out_bos_token_id=128013, pad_token_id=128001,
    audio_dual_ffn_layers=None, skip_audio_tower=False, audio_embed_avg=False, use_audio_out_self_attention=False,
    use_audio_out_embed_projector=False, audio_decoder_proj_num_layers=0, use_rq_transformer=False,
)  # fmt: skip
_LLAMA_DEFAULTS = dict(  # transformers' LlamaConfig defaults, for the same reason
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, pretraining_tp=1, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
    attention_dropout=0.0, mlp_bias=False, head_dim=None, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# The text settings both configs hold under the same names (boson's under text_config).
_SHARED_TEXT = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pretraining_tp", "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "bos_token_id", "eos_token_id",
)  # fmt: skip
# (boson top-level field, transformers field)
_SHARED_AUDIO = (
    ("audio_num_codebooks", "num_codebooks"),
    ("audio_stream_bos_id", "audio_stream_bos_id"),
    ("audio_stream_eos_id", "audio_stream_eos_id"),
    ("audio_out_token_idx", "audio_token_id"),
    ("audio_out_bos_token_id", "audio_bos_token_id"),
    ("pad_token_id", "pad_token_id"),
)
# Where a transformers config keeps the boson settings it has no field for, so that converting back restores them.
BOSON_SETTINGS = "higgs_trainer_boson_config"
# transformers' HiggsAudioV2Config defaults (a saved config.json omits the values equal to them); boson has no
# audio_delay_token_id field.
_HIGGS_V2_DEFAULTS = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-5, pretraining_tp=1, attention_bias=False, attention_dropout=0.0, mlp_bias=False, head_dim=128,
    bos_token_id=1, eos_token_id=128009, pad_token_id=128001, num_codebooks=8, codebook_size=1024,
    audio_token_id=128016, audio_bos_token_id=128013, audio_stream_bos_id=1024, audio_stream_eos_id=1025,
    audio_delay_token_id=128014,
    rope_parameters={"rope_type": "llama3", "factor": 32.0, "rope_theta": 500000.0, "high_freq_factor": 0.5,
                     "low_freq_factor": 0.125, "original_max_position_embeddings": 1024},
)  # fmt: skip


def _refuse_config(config: Mapping, where: str) -> None:
    value = {k: config.get(k, d) for k, d in _BOSON_DEFAULTS.items()}
    layers = config.get("text_config", {}).get("num_hidden_layers", _LLAMA_DEFAULTS["num_hidden_layers"])
    if value["audio_adapter_type"] not in ("dual_ffn", "dual_ffn_fast_forward"):
        raise CheckpointError(
            f"{where} has audio_adapter_type={value['audio_adapter_type']!r}; transformers' HiggsAudioV2 has DualFFN "
            "(audio_mlp) on every layer, so only a dual_ffn model converts"
        )
    dual = sorted(value["audio_dual_ffn_layers"] or [])
    if dual != list(range(layers)):
        raise CheckpointError(
            f"{where} has DualFFN on only some layers (audio_dual_ffn_layers={dual} of {layers}); transformers' "
            "HiggsAudioV2 has it on every layer, so this model has no equivalent"
        )
    for field, reason in (
        ("use_audio_out_self_attention", "audio self-attention"),
        ("use_audio_out_embed_projector", "an audio-out embedding projector"),
        ("audio_embed_avg", "averaged (not summed) codebook embeddings"),
        ("use_rq_transformer", "an RQ-Transformer audio head"),
        ("audio_decoder_proj_num_layers", "audio decoder layers"),
    ):
        if value[field]:
            raise CheckpointError(
                f"{where} uses {reason} ({field}={value[field]!r}), which transformers' HiggsAudioV2 does not have"
            )
    model_type = config.get("text_config", {}).get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{where} has a {model_type!r} text model; HiggsAudioV2 is Llama-based")


def _rope_to_transformers(text: Mapping) -> dict:
    scaling = dict(text.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    return {**scaling, "rope_theta": text.get("rope_theta", _LLAMA_DEFAULTS["rope_theta"])}


def boson_config_to_transformers(config: Mapping, where: str = "the model") -> dict:
    """A ``higgs_audio`` config.json dict as a ``HiggsAudioV2Config`` one; `CheckpointError` where it has no equivalent.

    Examples:
        >>> cfg = {"model_type": "higgs_audio", "audio_adapter_type": "dual_ffn", "audio_dual_ffn_layers": [0, 1],
        ...        "audio_codebook_size": 32, "text_config": {"num_hidden_layers": 2}}
        >>> boson_config_to_transformers(cfg)["codebook_size"]
        34
    """
    _refuse_config(config, where)
    text = {**_LLAMA_DEFAULTS, **config.get("text_config", {})}
    top = {**_BOSON_DEFAULTS, **config}
    new = {"architectures": [ARCHITECTURES[TRANSFORMERS]], "model_type": MODEL_TYPES[TRANSFORMERS]}
    new.update({name: text[name] for name in _SHARED_TEXT})
    if new["num_key_value_heads"] is None:
        new["num_key_value_heads"] = new["num_attention_heads"]
    if new["head_dim"] is None:
        new["head_dim"] = new["hidden_size"] // new["num_attention_heads"]
    new["rope_parameters"] = _rope_to_transformers(text)
    new["tie_word_embeddings"] = False  # text_lm_head is its own weight in both
    new.update({hf: top[boson] for boson, hf in _SHARED_AUDIO})
    new["codebook_size"] = top["audio_codebook_size"] + STREAM_TOKENS
    new["audio_delay_token_id"] = top.get("audio_delay_token_id", _HIGGS_V2_DEFAULTS["audio_delay_token_id"])
    dtype = config.get("torch_dtype") or text.get("torch_dtype")
    if dtype:
        new["dtype"] = dtype
    mapped = {
        "text_config",
        "audio_encoder_config",
        "audio_codebook_size",
        "torch_dtype",
        *(b for b, _ in _SHARED_AUDIO),
    }
    new[BOSON_SETTINGS] = {k: copy.deepcopy(v) for k, v in config.items() if k not in mapped}
    return new


def transformers_config_to_boson(config: Mapping, where: str = "the model") -> dict:
    """A ``higgs_audio_v2`` config.json dict as a ``HiggsAudioConfig`` one (dual_ffn on every layer, no audio tower).

    Settings the transformers config has no field for come back from the boson config it was
    converted from, when it was (`BOSON_SETTINGS`).

    Examples:
        >>> cfg = {"model_type": "higgs_audio_v2", "num_hidden_layers": 2, "codebook_size": 34}
        >>> boson_config_to_transformers(transformers_config_to_boson(cfg))["codebook_size"]
        34
    """
    if config.get("model_type") != MODEL_TYPES[TRANSFORMERS]:
        raise CheckpointError(
            f"{where} is not a {MODEL_TYPES[TRANSFORMERS]} config (model_type {config.get('model_type')!r})"
        )
    value = {**_HIGGS_V2_DEFAULTS, **config}
    new = copy.deepcopy(dict(config.get(BOSON_SETTINGS) or {}))
    text = dict(new.get("text_config") or {}, model_type="llama")
    text.update({name: value[name] for name in _SHARED_TEXT})
    rope = dict(value.get("rope_parameters") or _HIGGS_V2_DEFAULTS["rope_parameters"])
    text["rope_theta"] = rope.pop("rope_theta", 10000.0)
    text["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    text["pad_token_id"] = value["pad_token_id"]
    text["tie_word_embeddings"] = False
    new.update({"architectures": [ARCHITECTURES[BOSON]], "model_type": MODEL_TYPES[BOSON], "text_config": text})
    new.update({boson: value[hf] for boson, hf in _SHARED_AUDIO})
    new["audio_codebook_size"] = value["codebook_size"] - STREAM_TOKENS
    new["audio_delay_token_id"] = value["audio_delay_token_id"]
    layers = list(range(value["num_hidden_layers"]))
    if new.get("audio_adapter_type") not in ("dual_ffn", "dual_ffn_fast_forward"):
        new["audio_adapter_type"] = "dual_ffn"
    new["audio_dual_ffn_layers"] = layers
    new.setdefault("skip_audio_tower", True)
    new.setdefault("encode_audio_in_tokens", True)  # HiggsAudioV2 embeds every audio token of the prompt
    new.setdefault("use_delay_pattern", True)  # and generates with the delay pattern
    new.setdefault("audio_ffn_hidden_size", value["hidden_size"])
    new.setdefault("audio_ffn_intermediate_size", value["intermediate_size"])
    if value.get("dtype"):
        new["torch_dtype"] = value["dtype"]
    return new


def convert_model_config(config: Mapping, to: str, where: str = "the model") -> dict:
    """A Higgs config.json dict converted to layout ``to``.

    Examples:
        >>> convert_model_config({"model_type": "higgs_audio_v2", "num_hidden_layers": 2}, "boson")["model_type"]
        'higgs_audio'
    """
    return (
        boson_config_to_transformers(config, where)
        if to == TRANSFORMERS
        else transformers_config_to_boson(config, where)
    )


def expected_shapes(config: Mapping, layout: str, text_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every weight a model of ``config`` (a config.json dict of ``layout``) holds, with its shape.

    Used to check a converted model has zero missing and zero unexpected weights without building it.

    Examples:
        >>> cfg = {"model_type": "higgs_audio_v2", "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
        ...        "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 16, "vocab_size": 10}
        >>> expected_shapes(cfg, "transformers")["model.layers.0.self_attn.k_proj.weight"]
        (4, 8)
    """
    hf = boson_config_to_transformers(config) if layout == BOSON else {**config}
    d = {**_HIGGS_V2_DEFAULTS, **hf}
    h, heads, kv = d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"] or d["num_attention_heads"]
    head_dim = d["head_dim"] or h // heads
    audio = d["num_codebooks"] * d["codebook_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (d["vocab_size"], h),
        "model.norm.weight": (h,),
        "model.embed_audio_tokens.embed_audio_tokens.weight": (audio, h),
        "audio_lm_head.weight": (audio, h),
    }
    if text_head:
        shapes["text_lm_head.weight"] = (d["vocab_size"], h)
    projections = {"q_proj": (heads * head_dim, h), "k_proj": (kv * head_dim, h), "v_proj": (kv * head_dim, h),
                   "o_proj": (h, heads * head_dim)}  # fmt: skip
    mlp = {"gate_proj": (d["intermediate_size"], h), "up_proj": (d["intermediate_size"], h),
           "down_proj": (h, d["intermediate_size"])}  # fmt: skip
    for i in range(d["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        for name, shape in projections.items():
            shapes[f"{layer}self_attn.{name}.weight"] = shape
            if d["attention_bias"]:
                shapes[f"{layer}self_attn.{name}.bias"] = shape[:1]
        for block in ("mlp", "audio_mlp"):
            for name, shape in mlp.items():
                shapes[f"{layer}{block}.{name}.weight"] = shape
                if d["mlp_bias"]:
                    shapes[f"{layer}{block}.{name}.bias"] = shape[:1]
        for norm in ("input_layernorm", "post_attention_layernorm", "audio_input_layernorm",
                     "audio_post_attention_layernorm"):  # fmt: skip
            shapes[f"{layer}{norm}.weight"] = (h,)
    if layout == BOSON:
        return {convert_key(k, BOSON): v for k, v in shapes.items()}
    return shapes


__all__ = ["BOSON_SETTINGS", "convert_adapter_config", "convert_model_config", "expected_shapes"]
