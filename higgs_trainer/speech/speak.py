"""Speak with a saved adapter: load the base and the adapter (no merge), generate, decode, write WAV + spectrogram.

What ``higgs-trainer speak`` runs. The adapter is the one a checkpoint's callback heard: greedy generation with the
same settings gives the same codes (``codes_sha256``) as that checkpoint's ``speech/speech.json``.

Examples:
    ```python
    result = speak("base_model", "run/checkpoint-500", "Hello there.", "hello.wav")
    result.record.codes_sha256, result.record.flags
    ```
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError, first_line
from ..files.paths import existing_directory
from ..files.runs import checkpoints_of, is_complete_checkpoint, resolve_adapter_dir
from ..names import ADAPTER_DIRNAME, CONFIG_NAME
from .audio_files import require_speech_extra
from .backend import SpeechBackend, SpeechPrompt
from .callback import DEFAULT_MAX_NEW_TOKENS
from .flags import DEFAULT_THRESHOLDS, FlagThresholds
from .records import SampleRecord
from .sampling import Sample, generate_sample, undisturbed, write_sample_files

logger = logging.getLogger(__name__)

CODEC_DIRNAME = "audio_tokenizer"  # where the base keeps its codec unless --codec says otherwise


@dataclass
class SpokenSample:
    """What `speak` wrote: the WAV, its spectrogram, the record (codes hash, flags) and the adapter it used."""

    wav: Path
    png: Path
    record: SampleRecord
    adapter: Path


def adapter_for_speaking(path: str | os.PathLike) -> Path:
    """The adapter ``path`` stands for: an adapter, a checkpoint's, or a run's final (else its last checkpoint's)."""
    directory = resolve_adapter_dir(path)
    if (directory / CONFIG_NAME).is_file():
        return directory
    complete = [
        c
        for c in checkpoints_of(directory)
        if is_complete_checkpoint(c) and (c / ADAPTER_DIRNAME / CONFIG_NAME).is_file()
    ]
    if complete:
        logger.info("Using the adapter of the last checkpoint, %s", complete[-1])
        return complete[-1] / ADAPTER_DIRNAME
    raise UsageError(f"{path} holds no adapter: pass an adapter directory, a checkpoint-N or a run directory")


def _model_type(base: Path) -> str:
    try:
        return json.loads((base / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{base} is not a model directory: cannot read config.json ({first_line(exc)})") from exc


def load_transformers_speaker(base: Path, codec: Path | None) -> tuple[torch.nn.Module, SpeechBackend]:
    """HiggsAudioV2ForConditionalGeneration from ``base`` and a backend over its processor files and codec."""
    import transformers

    from .transformers_backend import TransformersSpeechBackend

    codec = codec if codec is not None else base / CODEC_DIRNAME
    if not (codec / "config.json").is_file():
        raise UsageError(f"no codec at {codec}: pass --codec DIR (a HiggsAudioV2TokenizerModel directory)")
    model = transformers.HiggsAudioV2ForConditionalGeneration.from_pretrained(base)
    processor = transformers.HiggsAudioV2Processor(
        transformers.DacFeatureExtractor.from_pretrained(base),
        transformers.AutoTokenizer.from_pretrained(base),
        transformers.HiggsAudioV2TokenizerModel.from_pretrained(codec).eval(),
        audio_stream_bos_id=model.config.audio_stream_bos_id,
        audio_stream_eos_id=model.config.audio_stream_eos_id,
    )
    return model, TransformersSpeechBackend(processor)


def load_speaker(
    base: str | os.PathLike, codec: str | os.PathLike | None = None
) -> tuple[torch.nn.Module, SpeechBackend]:
    """The base model and the backend of its stack (``higgs_audio_v2``: transformers; ``higgs_audio``: boson)."""
    base = existing_directory(base, "base model")
    codec = Path(codec) if codec is not None else None
    model_type = _model_type(base)
    if model_type == "higgs_audio_v2":
        return load_transformers_speaker(base, codec)
    if model_type == "higgs_audio":
        from .boson_backend import load_boson_speaker  # imports boson_multimodal

        return load_boson_speaker(base, codec)
    raise UsageError(
        f"{base} holds a {model_type or 'unknown'} model: speak needs a Higgs Audio base (model_type higgs_audio_v2 "
        "for transformers' HiggsAudioV2ForConditionalGeneration, higgs_audio for boson's HiggsAudioModel)"
    )


def speak(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    text: str,
    output: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    reference_text: str | None = None,
    codec: str | os.PathLike | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    generation_kwargs: dict[str, Any] | None = None,
    thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
) -> SpokenSample:
    """Speak ``text`` with ``base`` + ``adapter`` (not merged) into ``output`` (WAV) and its ``.png`` spectrogram.

    Args:
        base: the base model directory (its codec in ``audio_tokenizer/`` unless ``codec`` is given).
        adapter: an adapter directory, a ``checkpoint-N`` or a run directory.
        text: what to say.
        output: the WAV to write; the spectrogram goes beside it (``.png``).
        reference: a WAV clip whose voice to clone; ``reference_text`` its transcript.
        codec: the codec directory, when not in the base's ``audio_tokenizer/``.
        max_new_tokens: generation's length limit (the callback's default unless given).
        generation_kwargs: passed to generation; greedy unless they say otherwise.
        thresholds: where the sample counts as degenerate (reported in ``record.flags``).
    """
    require_speech_extra("higgs-trainer speak")
    from peft import PeftModel

    output = Path(output)
    if output.suffix.lower() != ".wav":
        raise UsageError(f"--output {output} must name a .wav file")
    adapter_dir = adapter_for_speaking(adapter)
    prompt = SpeechPrompt(
        output.stem if _safe(output.stem) else "speech", text, reference and os.fspath(reference), reference_text
    )
    model, backend = load_speaker(base, codec)
    model = PeftModel.from_pretrained(model, os.fspath(adapter_dir))  # not merged: the adapter as trained
    with undisturbed(model):
        sample: Sample = generate_sample(
            model, prompt, backend, max_new_tokens=max_new_tokens, generation_kwargs=generation_kwargs,
            thresholds=thresholds,
        )  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.stem}.tmp-speak"
    staging.mkdir(exist_ok=True)
    try:
        write_sample_files(sample, staging, backend.sample_rate, title=f"{adapter_dir.parent.name} · {prompt.name}")
        os.replace(staging / sample.record.wav, output)
        os.replace(staging / sample.record.png, output.with_suffix(".png"))
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    sample.record.wav, sample.record.png = output.name, output.with_suffix(".png").name
    return SpokenSample(wav=output, png=output.with_suffix(".png"), record=sample.record, adapter=adapter_dir)


def _safe(name: str) -> bool:
    try:
        SpeechPrompt(name, "x")
    except UsageError:
        return False
    return True
