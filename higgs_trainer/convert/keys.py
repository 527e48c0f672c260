"""The key table of the two Higgs Audio v2 layouts: boson_multimodal's ``HiggsAudioModel`` and transformers' ``HiggsAudioV2``.

One regex table maps a weight's key from one layout to the other (after transformers'
``convert_higgs_audio_v2_to_hf.py``, which goes one way and has no adapters); the same table
renames adapter keys (``base_model.model.<key>``) and the module names in ``adapter_config.json``
(`configs` converts the configs). Nothing here imports boson_multimodal.

| boson_multimodal (``higgs_audio``) | transformers (``higgs_audio_v2``) |
|---|---|
| ``layers.N.…``, ``embed_tokens``, ``norm`` | ``model.layers.N.…``, ``model.embed_tokens``, ``model.norm`` |
| ``audio_codebook_embeddings`` | ``model.embed_audio_tokens.embed_audio_tokens`` |
| ``audio_decoder_proj.audio_lm_head`` | ``audio_lm_head`` |
| ``audio_decoder_proj.text_lm_head`` | ``text_lm_head`` (built with ``use_text_head=True``) |
| ``audio_codebook_size`` (e.g. 1024) | ``codebook_size`` = that + the 2 stream tokens (1026) |

Examples:
    >>> convert_key("layers.0.self_attn.q_proj.weight", TRANSFORMERS)
    'model.layers.0.self_attn.q_proj.weight'
    >>> convert_key("audio_lm_head.weight", BOSON)
    'audio_decoder_proj.audio_lm_head.weight'
"""

from __future__ import annotations

import re

from ..errors import CheckpointError, listed

BOSON, TRANSFORMERS = "boson", "transformers"
LAYOUTS = (BOSON, TRANSFORMERS)
MODEL_TYPES = {BOSON: "higgs_audio", TRANSFORMERS: "higgs_audio_v2"}
ARCHITECTURES = {BOSON: "HiggsAudioModel", TRANSFORMERS: "HiggsAudioV2ForConditionalGeneration"}
MODEL_MODULES = {
    BOSON: "boson_multimodal.model.higgs_audio.modeling_higgs_audio",
    TRANSFORMERS: "transformers.models.higgs_audio_v2.modeling_higgs_audio_v2",
}
STREAM_TOKENS = 2  # audio_stream_bos_id and audio_stream_eos_id: boson counts them apart, transformers in codebook_size

# The table: (pattern, replacement) per target layout, the first that matches applies.
# fmt: off
KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    TRANSFORMERS: (
        (r"^audio_codebook_embeddings\.", "model.embed_audio_tokens.embed_audio_tokens."),
        (r"^(embed_tokens|layers|norm)\.", r"model.\1."),
        (r"^audio_decoder_proj\.(audio_lm_head|text_lm_head)\.", r"\1."),
    ),
    BOSON: (
        (r"^model\.embed_audio_tokens\.embed_audio_tokens\.", "audio_codebook_embeddings."),
        (r"^model\.(embed_tokens|layers|norm)\.", r"\1."),
        (r"^(audio_lm_head|text_lm_head)\.", r"audio_decoder_proj.\1."),
    ),
}
# fmt: on

# Every weight each layout's model holds (keys from the model's root).
_LAYER = (
    r"layers\.\d+\.(?:(?:self_attn\.[qkvo]_proj|(?:mlp|audio_mlp)\.(?:gate|up|down)_proj)\.(?:weight|bias)"
    r"|(?:input_layernorm|post_attention_layernorm|audio_input_layernorm|audio_post_attention_layernorm)\.weight)"
)
VALID_KEY = {
    BOSON: re.compile(
        rf"(?:embed_tokens|norm|audio_codebook_embeddings|audio_decoder_proj\.(?:audio|text)_lm_head)\.weight|{_LAYER}"
    ),
    TRANSFORMERS: re.compile(
        rf"model\.(?:(?:embed_tokens|norm|embed_audio_tokens\.embed_audio_tokens)\.weight|{_LAYER})"
        r"|(?:audio|text)_lm_head\.weight"
    ),
}

# boson weights that have no counterpart in transformers' HiggsAudioV2, and what they come from.
_NO_EQUIVALENT = (
    (r"^audio_tower\.|^audio_encoder_proj\.", "an audio tower's (Whisper encoder) weights; HiggsAudioV2 has none"),
    (r"\.audio_attn\.|\.audio_post_audio_attn_layer_norm\.", "audio self-attention (use_audio_out_self_attention)"),
    (r"^audio_out_embed_projector\.", "the audio-out embedding projector (use_audio_out_embed_projector)"),
    (r"^audio_decoder_proj\.(?!(?:audio|text)_lm_head\.)", "audio decoder layers (audio_decoder_proj_num_layers > 0)"),
)
# Buffers recomputed from the config, which transformers' converter skips too.
IGNORED_KEY = re.compile(r"(?:^|\.)rotary_emb\.(?:inv_freq|original_inv_freq)$|^audio_codebook_weights$")
# boson's PartiallyFrozenEmbedding / PartiallyFrozenLinear (freeze_embed_until_idx, freeze_text_head_until_idx):
# one weight stored as two row blocks, frozen rows first.
SPLIT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>embedding|linear)_(?P<part>frozen|trainable)\.weight$")


def other(layout: str) -> str:
    """The layout that is not ``layout``.

    Examples:
        >>> other("boson")
        'transformers'
    """
    return TRANSFORMERS if layout == BOSON else BOSON


def convert_key(key: str, to: str) -> str:
    """``key`` (a weight or module path from the model's root) in layout ``to``; unchanged when no rule applies.

    Examples:
        >>> convert_key("audio_codebook_embeddings.weight", "transformers")
        'model.embed_audio_tokens.embed_audio_tokens.weight'
    """
    for pattern, replacement in KEY_MAP[to]:
        new, count = re.subn(pattern, replacement, key, count=1)
        if count:
            return new
    return key


def why_no_equivalent(key: str) -> str | None:
    """What a boson weight that HiggsAudioV2 cannot hold comes from, or None.

    Examples:
        >>> why_no_equivalent("audio_tower.layers.0.fc1.weight")
        "an audio tower's (Whisper encoder) weights; HiggsAudioV2 has none"
    """
    for pattern, reason in _NO_EQUIVALENT:
        if re.search(pattern, key):
            return reason
    return None


def check_keys(keys: list[str], layout: str, where: str) -> None:
    """Refuse (`CheckpointError`) weight keys that are not part of a Higgs model in ``layout``.

    Examples:
        >>> check_keys(["layers.0.audio_attn.q_proj.weight"], "boson", "model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        higgs_trainer.errors.CheckpointError: model holds 1 weight(s) with no equivalent in ...
    """
    reasons: dict[str, list[str]] = {}
    unknown = []
    for key in keys:
        if VALID_KEY[layout].fullmatch(key):
            continue
        reason = why_no_equivalent(key) if layout == BOSON else None
        if reason:
            reasons.setdefault(reason, []).append(key)
        else:
            unknown.append(key)
    if reasons:
        reason, found = next(iter(reasons.items()))
        raise CheckpointError(
            f"{where} holds {len(found)} weight(s) with no equivalent in the {other(layout)} layout, from {reason}: "
            f"{listed(found)}; convert a model without them (nothing written)"
        )
    if unknown:
        raise CheckpointError(
            f"{where} holds {len(unknown)} weight(s) that are not part of a {layout}-layout Higgs Audio model: "
            f"{listed(unknown)}; is it the {other(layout)} layout or another model? (nothing written)"
        )


def check_dual_ffn_layers(keys: list[str], layout: str, where: str) -> None:
    """Refuse a full model whose ``audio_mlp`` (DualFFN) is not on every layer: HiggsAudioV2 has it on all.

    Examples:
        >>> check_dual_ffn_layers(["layers.0.mlp.up_proj.weight"], "boson", "model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        higgs_trainer.errors.CheckpointError: model has DualFFN (audio_mlp) on only some layers ...
    """
    prefix = r"(?:model\.)?" if layout == TRANSFORMERS else ""
    layers, dual = set(), set()
    for key in keys:
        found = re.match(rf"{prefix}layers\.(\d+)\.(mlp|audio_mlp)\.", key)
        if found:
            (dual if found.group(2) == "audio_mlp" else layers).add(int(found.group(1)))
    if layers != dual:
        raise CheckpointError(
            f"{where} has DualFFN (audio_mlp) on only some layers ({len(dual)} of {len(layers | dual)}: "
            f"{sorted(dual)}); transformers' HiggsAudioV2 has it on every layer, so this model has no equivalent"
        )


def layout_of_keys(keys: list[str]) -> str | None:
    """The layout weight keys (from the model's root) are in, from the names only one layout has; None if neither shows.

    Examples:
        >>> layout_of_keys(["model.layers.0.self_attn.q_proj.weight"])
        'transformers'
    """
    boson = any(
        re.match(r"(layers\.\d+|embed_tokens|norm|audio_codebook_embeddings|audio_decoder_proj)\.", k) for k in keys
    )
    hf = any(re.match(r"(model\.|audio_lm_head\.|text_lm_head\.)", k) for k in keys)
    if boson == hf:
        return None
    return BOSON if boson else TRANSFORMERS


# module names in adapter_config.json


# Module names peft matches by suffix that the key table cannot see (no root component to anchor on).
_NAME_MAP = {
    BOSON: ((r"^(?:model\.)?embed_audio_tokens(?:\.embed_audio_tokens)?$", "audio_codebook_embeddings"),),
    TRANSFORMERS: (),
}
_FIXED_MODULES = (  # (boson, transformers) module names that are not a plain prefix change
    ("audio_decoder_proj.audio_lm_head", "audio_lm_head"),
    ("audio_decoder_proj.text_lm_head", "text_lm_head"),
    ("audio_codebook_embeddings", "model.embed_audio_tokens.embed_audio_tokens"),
)


def convert_name(name: str, to: str) -> str:
    """A module name or suffix as ``target_modules`` / ``modules_to_save`` / ``rank_pattern`` hold it, in layout ``to``.

    Suffixes without a root component (``q_proj``, ``audio_mlp.up_proj``) are the same in both layouts.

    Examples:
        >>> convert_name("audio_decoder_proj.audio_lm_head", "transformers")
        'audio_lm_head'
        >>> convert_name("q_proj", "transformers")
        'q_proj'
    """
    for pattern, replacement in _NAME_MAP[to]:
        if re.fullmatch(pattern, name):
            return replacement
    return convert_key(name + ".", to)[:-1]


def convert_target_regex(pattern: str, to: str) -> str:
    """A ``target_modules`` regex (peft fullmatches it against module names) rewritten for layout ``to``.

    Towards transformers the result matches exactly the converted names of what ``pattern``
    matched; towards boson a leading ``model\\.`` is dropped, and `convert_adapter_config`'s caller
    checks the result against the adapter's modules.

    Examples:
        >>> import re
        >>> new = convert_target_regex(r"layers\\.\\d+\\.self_attn\\.(q_proj|v_proj)", "transformers")
        >>> bool(re.fullmatch(new, "model.layers.3.self_attn.q_proj"))
        True
    """
    fixed = [(b, t) if to == TRANSFORMERS else (t, b) for b, t in _FIXED_MODULES]
    extra = [re.escape(new) for old, new in fixed if re.fullmatch(pattern, old)]
    if to == TRANSFORMERS:
        inner = pattern[1:] if pattern.startswith("^") else pattern
        body = rf"model\.(?=(?:embed_tokens|layers|norm)(?:\.|$))(?:{inner})"
    else:
        body = re.sub(r"^\^?model\\\.", "", pattern)
    return "|".join([f"(?:{body})", *extra]) if extra else body


__all__ = [
    "ARCHITECTURES",
    "BOSON",
    "IGNORED_KEY",
    "KEY_MAP",
    "LAYOUTS",
    "MODEL_MODULES",
    "MODEL_TYPES",
    "SPLIT_KEY",
    "TRANSFORMERS",
    "check_dual_ffn_layers",
    "check_keys",
    "convert_key",
    "convert_name",
    "convert_target_regex",
    "layout_of_keys",
    "other",
]
