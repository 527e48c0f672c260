"""``merge --compare``: the outputs of the base, the base with the adapter, and the merged model, on fixed probes.

A text probe for every model and, for a Higgs model, an audio-out probe. The models are loaded in
memory one after another; only ``--compare`` does this.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..errors import AdapterVerificationError, first_line
from .base_model import load_base_model

PROBE_TOKENS = 16

logger = logging.getLogger(__name__)

AUDIO_PROBE_FRAMES = 6
COMPARE_EXTRA = "compare"  # setup.cfg's extra with what --compare needs beyond the merge (librosa)


def compare_outputs(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> dict:
    """Logits of the base, the base with the adapter and the merged model (loaded from ``merged_dir``) on a probe.

    Loads the models in memory, one after another (only ``--compare`` does); the merged one through
    `base_model.load_base_model`, which refuses weights that leave any parameter uninitialised.

    Examples:
        ```python
        compare_outputs(Path("base"), Path("out/lora_adapters"), Path("merged"))["adapter_vs_merged"]
        # {'max_abs': 0.0, 'mean_abs': 0.0}
        ```
    """

    model = load_base_model(base_dir)
    probe = probe_inputs(model.config)
    try:
        audio_probe = audio_probe_inputs(model)
    except ImportError as exc:  # an optional part (librosa, for boson_multimodal's collator): run what can run
        audio_probe, skipped = None, optional_part_missing(exc, "the audio probe")
    else:
        skipped = None
    logits, audio = {"base": probe_logits(model, probe)}, {}
    if audio_probe is not None:
        audio["base"] = _audio_logits(model, audio_probe)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterVerificationError(f"the adapter at {adapter_dir} does not load: {first_line(exc)}") from exc
    logits["adapter"] = probe_logits(peft_model, probe)
    if audio_probe is not None:
        audio["adapter"] = _audio_logits(peft_model, audio_probe)
    del model, peft_model
    merged = load_base_model(merged_dir)
    logits["merged"] = probe_logits(merged, probe)
    comparison = {
        "probe_tokens": probe["input_ids"].shape[1],
        "base_vs_merged": logit_difference(logits["base"], logits["merged"]),
        "adapter_vs_merged": logit_difference(logits["adapter"], logits["merged"]),
    }
    if skipped is not None:
        comparison["audio_probe_skipped"] = skipped
    if audio_probe is not None:
        audio["merged"] = _audio_logits(merged, audio_probe)
        comparison["audio_probe_frames"] = AUDIO_PROBE_FRAMES
        comparison["audio_base_vs_merged"] = logit_difference(audio["base"], audio["merged"])
        comparison["audio_adapter_vs_merged"] = logit_difference(audio["adapter"], audio["merged"])
    return comparison


def probe_inputs(config: Any, length: int = PROBE_TOKENS) -> dict[str, torch.Tensor]:
    """A fixed batch of one random text sequence, avoiding the config's special (e.g. audio) token ids.

    Examples:
        >>> import transformers
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
def probe_logits(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**probe)
    logits = output["logits"] if isinstance(output, dict) else output.logits
    return logits[:, : probe["input_ids"].shape[1]].float()


def logit_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    delta = (a - b).abs()
    return {"max_abs": float(delta.max()), "mean_abs": float(delta.mean())}


def optional_part_missing(exc: ImportError, part: str) -> str:
    """Log (one warning line) and return why ``part`` of ``--compare`` is skipped: the package it needs, and how to get it.

    Examples:
        >>> print(optional_part_missing(ModuleNotFoundError("no librosa here", name="librosa"), "the audio probe"))
        the audio probe skipped: it needs librosa, which cannot be imported (no librosa here); install it with: pip install "higgs-trainer[compare]"
    """
    package = (exc.name or "").split(".")[0] or "a package"
    reason = (
        f"{part} skipped: it needs {package}, which cannot be imported ({first_line(exc)}); install it with: "
        f'pip install "higgs-trainer[{COMPARE_EXTRA}]"'
    )
    logger.warning("merge --compare: %s", reason)
    return reason


def audio_probe_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A fixed text prompt with an audio-out segment of random codes, for a Higgs model; None for other models.

    boson_multimodal's ``HiggsAudioModel``: ``<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>`` in the
    text, collated with its ``HiggsAudioSampleCollator`` (delay pattern and stream tokens as the
    config says). transformers' ``HiggsAudioV2ForConditionalGeneration``: audio placeholder tokens with
    ``audio_input_ids``. The model's audio logits on it are compared by `compare_outputs`.
    """
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = probe_inputs_for(config)
    if type(model).__name__ == "HiggsAudioModel":
        from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

        ids[5:8] = torch.tensor([config.audio_out_bos_token_id, config.audio_out_token_idx, config.audio_eos_token_id])
        codes = torch.randint(
            0, config.audio_codebook_size, (config.audio_num_codebooks, AUDIO_PROBE_FRAMES), generator=generator
        )
        sample = ChatMLDatasetSample(
            input_ids=ids, label_ids=ids.clone(), audio_ids_concat=codes, audio_ids_start=torch.tensor([0]),
            audio_waveforms_concat=torch.zeros(0), audio_waveforms_start=torch.zeros(0, dtype=torch.long),
            audio_sample_rate=torch.zeros(0), audio_speaker_indices=torch.zeros(0, dtype=torch.long),
        )  # fmt: skip
        collator = HiggsAudioSampleCollator(
            whisper_processor=None, encode_whisper_embed=False, audio_in_token_id=config.audio_in_token_idx,
            audio_out_token_id=config.audio_out_token_idx, audio_stream_bos_id=config.audio_stream_bos_id,
            audio_stream_eos_id=config.audio_stream_eos_id, pad_token_id=config.pad_token_id,
            return_audio_in_tokens=False, use_delay_pattern=config.use_delay_pattern,
            audio_num_codebooks=config.audio_num_codebooks, round_to=8,
        )  # fmt: skip
        batch = collator([sample])
        inputs = {
            name: getattr(batch, name)
            for name in (
                "input_ids",
                "attention_mask",
                "audio_out_ids",
                "audio_out_ids_start",
                "audio_out_ids_start_group_loc",
            )
        }
        if not config.skip_audio_tower:  # the Whisper tower wants a (here empty) features batch
            frames = 2 * config.audio_encoder_config.max_source_positions
            bins = config.audio_encoder_config.num_mel_bins
            inputs["audio_features"] = torch.zeros((0, bins, frames), dtype=model.dtype)
            inputs["audio_feature_attention_mask"] = torch.zeros((0, frames), dtype=torch.long)
        return inputs
    if type(model).__name__ == "HiggsAudioV2ForConditionalGeneration":
        ids[4 : 4 + AUDIO_PROBE_FRAMES] = config.audio_token_id
        codes = torch.randint(
            0, config.codebook_size, (1, AUDIO_PROBE_FRAMES, config.num_codebooks), generator=generator
        )
        return {
            "input_ids": ids[None],
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "audio_input_ids": codes,
            "audio_input_ids_mask": torch.ones(1, AUDIO_PROBE_FRAMES, dtype=torch.bool),
        }
    return None


def probe_inputs_for(config) -> torch.Tensor:
    """The text probe's token ids (one sequence), from `probe_inputs`."""
    return probe_inputs(config)["input_ids"][0].clone()


@torch.inference_mode()
def _audio_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**inputs)
    audio = getattr(output, "audio_logits", None)
    return (output.logits if audio is None else audio).float()


__all__ = ["AUDIO_PROBE_FRAMES", "audio_probe_inputs", "compare_outputs"]
