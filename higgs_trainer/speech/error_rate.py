"""Word and character error rate of a speech sample: an ASR transcript of it against the text it was asked to say.

The ASR model is anything ``transformers.pipeline("automatic-speech-recognition")`` takes (Whisper, a
wav2vec2 CTC model...), loaded once, never trained, run under ``torch.no_grad``. Both texts go through the
same normalisation before jiwer counts the edits: by default ``"basic"`` (lower case, punctuation
removed, runs of spaces made one, ends stripped); ``"none"`` only strips and joins spaces; or pass your own
``str -> str`` function (e.g. Whisper's ``EnglishTextNormalizer``).

Examples:
    >>> normalizer("basic")("Hello,  World!")
    'hello world'
    >>> error_rates("hello world", "hello word", normalize="basic")
    (0.5, 0.0909...)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SpeechScorerError, first_line
from .clips import to_rate
from .dependencies import import_speech_dependency
from .model_loading import local_or_hub, untouched_rng

logger = logging.getLogger(__name__)

Normalize = str | Callable[[str], str]
NORMALIZATIONS = ("basic", "none")


def normalizer(normalize: Normalize) -> Callable[[str], str]:
    """The text normalisation named by ``normalize`` (``"basic"``, ``"none"``) or ``normalize`` itself if callable.

    Args:
        normalize: ``"basic"``: lower case, punctuation removed (jiwer's ``RemovePunctuation``: every Unicode
            punctuation character), spaces joined and stripped; ``"none"``: spaces joined and stripped only;
            a function from a string to a string.
    """
    if callable(normalize):
        return normalize
    jiwer = import_speech_dependency("jiwer")
    steps = {
        "basic": [jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()],
        "none": [jiwer.RemoveMultipleSpaces(), jiwer.Strip()],
    }
    if normalize not in steps:
        raise SpeechScorerError(
            f"unknown text normalisation {normalize!r}: pass one of {', '.join(NORMALIZATIONS)} or a function str -> str"
        )
    return jiwer.Compose(steps[normalize])


def error_rates(reference: str, hypothesis: str, normalize: Normalize = "basic") -> tuple[float, float]:
    """``(wer, cer)`` of ``hypothesis`` against ``reference``, both normalised alike.

    An empty hypothesis (nothing heard) scores 1.0 on both; a rate can exceed 1.0 when the hypothesis
    holds more words than the reference.
    """
    jiwer = import_speech_dependency("jiwer")
    clean = normalizer(normalize)
    reference, hypothesis = clean(reference), clean(hypothesis)
    if not reference:
        raise SpeechScorerError("the reference text is empty after normalisation: give the prompt words to say")
    return float(jiwer.wer(reference, hypothesis)), float(jiwer.cer(reference, hypothesis))


@dataclass(frozen=True)
class ErrorRate:
    """One sample's error rates and the transcript they come from (``wer``/``cer``: 0.0 is every word right)."""

    wer: float
    cer: float
    transcript: str


class ErrorRateScorer:
    """Transcribe speech with an ASR model and score it against the text it should say.

    Args:
        model: a local directory or hub name of a model ``pipeline("automatic-speech-recognition")`` takes.
        normalize: the text normalisation (``"basic"``, ``"none"`` or a function); see the module docstring.
        device: where the ASR model runs (``"cpu"``, ``"cuda:0"``, ...); default CPU, so it takes no
            accelerator memory from training.
        generate_kwargs: passed to the pipeline's generation, e.g. ``{"language": "en", "task": "transcribe"}``
            for a multilingual Whisper.

    Raises:
        SpeechScorerError: the model cannot be loaded (one line: which model, why, what to pass).

    Examples:
        ```python
        scorer = ErrorRateScorer("openai/whisper-small", generate_kwargs={"language": "en"})
        scorer.score(waveform, 24000, "Hello there.")  # ErrorRate(wer=0.0, cer=0.0, transcript=' Hello there.')
        ```
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        normalize: Normalize = "basic",
        device: str | torch.device | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.normalize = normalize
        self._clean = normalizer(normalize)
        self.generate_kwargs = dict(generate_kwargs or {})
        import_speech_dependency("jiwer")
        self.model_name = os.fspath(model)
        try:
            from transformers import pipeline

            self._pipeline = pipeline(
                "automatic-speech-recognition",
                model=local_or_hub(model),
                device=torch.device(device) if device is not None else torch.device("cpu"),
                trust_remote_code=False,
            )
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a model it cannot load
            raise SpeechScorerError(
                f"cannot load the ASR model {self.model_name!r}: {first_line(exc)}; pass a local directory or hub name "
                "of a model that transformers.pipeline('automatic-speech-recognition') loads (e.g. a Whisper checkpoint)"
            ) from None
        self._pipeline.model.eval().requires_grad_(False)
        self.sample_rate: int = int(self._pipeline.feature_extractor.sampling_rate)
        self._check_transcribes()

    def _check_transcribes(self) -> None:
        """Transcribe half a second of silence once, so a model that loads but cannot transcribe fails here.

        transformers 4.46 builds an ASR pipeline around an x-vector or audio-classification checkpoint (a CTC head
        initialised at random, no tokenizer) and fails only when decoding its output.
        """
        try:
            if self._pipeline.tokenizer is None:
                raise ValueError("it has no tokenizer to write a transcript with")
            self.transcribe(np.zeros(self.sample_rate // 2, dtype=np.float32), self.sample_rate)
        except Exception as exc:
            raise SpeechScorerError(
                f"cannot transcribe with the ASR model {self.model_name!r}: {first_line(exc)}; pass a speech "
                "recognition model with its tokenizer (e.g. a Whisper checkpoint)"
            ) from None

    def check_text(self, text: str, prompt_name: str = "") -> None:
        """Raise `SpeechScorerError` when ``text`` has no words left after normalisation (nothing to score against)."""
        if not self._clean(text):
            where = f"prompt {prompt_name!r}" if prompt_name else "the prompt"
            raise SpeechScorerError(
                f"{where} has no words to score against after {self.normalize!r} normalisation ({text!r}): give it "
                "text to say, or another normalize="
            )

    @torch.no_grad()
    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """What the ASR model hears in ``audio`` (empty for no audio)."""
        audio = to_rate(audio, sample_rate, self.sample_rate)
        if audio.size == 0:
            return ""
        kwargs = {"generate_kwargs": self.generate_kwargs} if self.generate_kwargs else {}
        with untouched_rng(self._pipeline.device):
            result = self._pipeline({"raw": audio, "sampling_rate": self.sample_rate}, **kwargs)
        return str(result["text"])

    def score(self, audio: np.ndarray, sample_rate: int, text: str) -> ErrorRate:
        """Transcribe ``audio`` and score the transcript against ``text``.

        Args:
            audio: the sample, mono float.
            sample_rate: its rate in Hz (resampled to the model's).
            text: what it should say.
        """
        transcript = self.transcribe(audio, sample_rate)
        wer, cer = error_rates(text, transcript, self._clean)
        return ErrorRate(wer=wer, cer=cer, transcript=transcript.strip())
