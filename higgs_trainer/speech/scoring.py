"""Scores for the speech samples of a checkpoint, and the metrics they make for choosing a checkpoint.

`SpeechScoring` holds the scorers a user asked for (an ASR model for the error rates, a speaker model
for similarity to each prompt's reference clip), checks everything it can when it is built (models
load, reference clips read, every prompt has words to score against), scores each sample, and averages
a checkpoint's samples into the metrics logged at that step:

| metric | what it is | better |
| --- | --- | --- |
| ``speech_wer`` | mean word error rate over the prompts | lower (``greater_is_better=False``) |
| ``speech_cer`` | mean character error rate | lower |
| ``speech_similarity`` | mean speaker cosine over the prompts with a reference clip | higher (``greater_is_better=True``) |
| ``speech_degenerate`` | samples flagged degenerate (no audio, silence, ...) | lower |

A sample with no audio scores what it is worth: error rates 1.0 (nothing said) and similarity 0.0.

Examples:
    >>> summarize([SampleScores(wer=0.5, cer=0.25), SampleScores(wer=0.0, cer=0.0, similarity=0.8)], degenerate=1)
    {'speech_wer': 0.25, 'speech_cer': 0.125, 'speech_similarity': 0.8, 'speech_degenerate': 1.0}
    >>> check_best_metric("eval_speech_wer", produced=("speech_wer", "speech_cer", "speech_degenerate"))
    True
    >>> check_best_metric("eval_loss", produced=("speech_wer",))  # not a speech metric: the trainer's own concern
    False
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import SpeechScorerError
from .error_rate import ErrorRateScorer, Normalize
from .similarity import SpeakerSimilarityScorer

logger = logging.getLogger(__name__)

WER, CER, SIMILARITY, DEGENERATE = "speech_wer", "speech_cer", "speech_similarity", "speech_degenerate"
SPEECH_METRICS = (WER, CER, SIMILARITY, DEGENERATE)
# Which way is better, for greater_is_better.
GREATER_IS_BETTER = {WER: False, CER: False, SIMILARITY: True, DEGENERATE: False}


class Prompt(Protocol):
    """What scoring reads of a speech prompt (``higgs_trainer.speech``'s ``SpeechPrompt`` has these)."""

    name: str
    text: str
    reference_audio: str | None


@dataclass(frozen=True)
class SampleScores:
    """The scores of one sample; ``None`` where that scorer is not configured (or the prompt has no reference)."""

    wer: float | None = None
    cer: float | None = None
    similarity: float | None = None
    transcript: str | None = None

    def as_record(self) -> dict[str, Any]:
        """The scores as ``speech.json`` holds them (``None`` left out)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def summarize(scores: Sequence[SampleScores], degenerate: int | None = None) -> dict[str, float]:
    """A checkpoint's metrics: each score averaged over the samples that have it, and the degenerate count.

    Args:
        scores: the scores of each of the checkpoint's samples.
        degenerate: how many of its samples were flagged degenerate (left out when ``None``).
    """
    metrics: dict[str, float] = {}
    for name, field in ((WER, "wer"), (CER, "cer"), (SIMILARITY, "similarity")):
        values = [getattr(s, field) for s in scores if getattr(s, field) is not None]
        if values:
            metrics[name] = float(np.mean(values))
    if degenerate is not None:
        metrics[DEGENERATE] = float(degenerate)
    return metrics


def check_best_metric(metric_for_best_model: str | None, produced: Iterable[str]) -> bool:
    """True when ``metric_for_best_model`` is a speech metric that ``produced`` holds; False when it is none of ours.

    transformers compares ``metrics["eval_" + name]`` (it adds the prefix when missing), so
    ``"speech_wer"`` and ``"eval_speech_wer"`` both name ``speech_wer``.

    Raises:
        SpeechScorerError: it names a speech metric that no configured scorer produces.
    """
    if not metric_for_best_model:
        return False
    name = metric_for_best_model.removeprefix("eval_")
    if not name.startswith("speech_"):
        return False
    produced = tuple(produced)
    if name in produced:
        return True
    how = {
        WER: "pass asr_model= (e.g. a Whisper checkpoint) to score word error rates",
        CER: "pass asr_model= (e.g. a Whisper checkpoint) to score character error rates",
        SIMILARITY: "pass speaker_model= (an x-vector model) and give prompts a reference_audio clip",
    }.get(name, f"speech metrics are {', '.join(SPEECH_METRICS)}")
    raise SpeechScorerError(
        f"metric_for_best_model={metric_for_best_model!r} but no configured speech score produces {name!r} "
        f"(produced: {', '.join(produced) or 'none'}); {how}"
    )


class SpeechScoring:
    """The scorers for a set of prompts, set up and checked once, before training.

    Args:
        prompts: the prompts the samples are generated from (``name``, ``text``, ``reference_audio``).
        asr_model: an ASR model for ``speech_wer``/``speech_cer`` (see `ErrorRateScorer`), or ``None``.
        speaker_model: a speaker-embedding model for ``speech_similarity`` (see `SpeakerSimilarityScorer`), or
            ``None``; scored for the prompts that have a ``reference_audio``.
        normalize: text normalisation for the error rates (``"basic"``, ``"none"`` or a function).
        device: where both models run; default CPU (no accelerator memory taken from training).
        asr_generate_kwargs: passed to the ASR pipeline's generation (e.g. ``{"language": "en"}``).

    Raises:
        SpeechScorerError: a model that does not load, a reference clip that cannot be read, a prompt with no
            words to score, or a speaker model with no prompt that has a reference clip.

    Examples:
        ```python
        scoring = SpeechScoring(prompts, asr_model="openai/whisper-small", speaker_model="microsoft/wavlm-base-plus-sv")
        scores = [scoring.score(prompt, waveform, 24000) for prompt, waveform in samples]
        summarize(scores)  # {'speech_wer': 0.12, 'speech_cer': 0.05, 'speech_similarity': 0.91}
        ```
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        *,
        asr_model: str | os.PathLike | None = None,
        speaker_model: str | os.PathLike | None = None,
        normalize: Normalize = "basic",
        device: str | torch.device | None = None,
        asr_generate_kwargs: dict[str, Any] | None = None,
    ):
        self.asr = (
            ErrorRateScorer(asr_model, normalize=normalize, device=device, generate_kwargs=asr_generate_kwargs)
            if asr_model is not None
            else None
        )
        self.speaker = SpeakerSimilarityScorer(speaker_model, device=device) if speaker_model is not None else None
        for prompt in prompts:
            if self.asr is not None:
                self.asr.check_text(prompt.text, prompt.name)
            if self.speaker is not None and prompt.reference_audio:
                self.speaker.add_reference(prompt.reference_audio, prompt.name)
        if self.speaker is not None and not any(prompt.reference_audio for prompt in prompts):
            raise SpeechScorerError(
                f"speaker_model={self.speaker.model_name!r} was given but no prompt has a reference_audio clip to "
                "compare with; give prompts reference_audio=, or leave speaker_model out"
            )

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric names these scorers produce (``speech_degenerate`` always)."""
        names = [WER, CER] if self.asr is not None else []
        return (*names, *([SIMILARITY] if self.speaker is not None else []), DEGENERATE)

    def score(self, prompt: Prompt, audio: np.ndarray, sample_rate: int) -> SampleScores:
        """Score one sample of ``prompt``.

        Args:
            prompt: the prompt it was generated from.
            audio: the decoded sample, mono float (empty when no audio was generated).
            sample_rate: its rate in Hz.
        """
        rates = self.asr.score(audio, sample_rate, prompt.text) if self.asr is not None else None
        similarity = None
        if self.speaker is not None and prompt.reference_audio:
            similarity = self.speaker.score(audio, sample_rate, prompt.reference_audio)
        return SampleScores(
            wer=rates.wer if rates else None,
            cer=rates.cer if rates else None,
            similarity=similarity,
            transcript=rates.transcript if rates else None,
        )


def as_eval_metrics(metrics: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
    """``metrics`` under the names ``Trainer`` compares ``metric_for_best_model`` with (``eval_speech_wer``...).

    Examples:
        >>> as_eval_metrics({"speech_wer": 0.5})
        {'eval_speech_wer': 0.5}
    """
    return {f"{prefix}{name}": value for name, value in metrics.items()}
