"""Speaker similarity of a speech sample: the cosine between its speaker embedding and that of a reference clip.

The embedding model is one transformers loads with ``AutoFeatureExtractor`` and
``AutoModelForAudioXVector`` (for example a WavLM or wav2vec2 x-vector model fine-tuned for speaker
verification), loaded once, never trained, run under ``torch.no_grad``. Reference clips are read and
embedded when they are first named (`SpeakerSimilarityScorer.add_reference`), so an unreadable clip is an
error before training starts, not at the first save.

Examples:
    >>> import torch
    >>> round(cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])), 4)
    0.7071
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..errors import SpeechScorerError, first_line
from .clips import read_clip, to_rate
from .model_loading import local_or_hub, untouched_rng

logger = logging.getLogger(__name__)

# x-vector models start with convolutions over ~25 ms of audio; a shorter sample is padded with silence to this.
_MIN_SECONDS = 0.1


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embedding vectors, from -1 to 1 (1: same direction)."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


class SpeakerSimilarityScorer:
    """Embed speech with a speaker-embedding model and compare it with reference clips.

    Args:
        model: a local directory or hub name of a model ``AutoModelForAudioXVector`` loads, with its feature
            extractor (``preprocessor_config.json``).
        device: where it runs; default CPU.

    Raises:
        SpeechScorerError: the model or its feature extractor cannot be loaded.

    Examples:
        ```python
        scorer = SpeakerSimilarityScorer("microsoft/wavlm-base-plus-sv")
        scorer.add_reference("voices/anna.wav")
        scorer.score(waveform, 24000, "voices/anna.wav")  # 0.93
        ```
    """

    def __init__(self, model: str | os.PathLike, *, device: str | torch.device | None = None):
        self.model_name = os.fspath(model)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:
            from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

            source = local_or_hub(model)
            self._features = AutoFeatureExtractor.from_pretrained(source, trust_remote_code=False)
            self._model = AutoModelForAudioXVector.from_pretrained(source, trust_remote_code=False)
        except Exception as exc:  # OSError, ValueError, KeyError... for a model transformers cannot load
            raise SpeechScorerError(
                f"cannot load the speaker-embedding model {self.model_name!r}: {first_line(exc)}; pass a local "
                "directory or hub name of a model AutoModelForAudioXVector loads, with its feature extractor "
                "(e.g. a WavLM x-vector model for speaker verification)"
            ) from None
        self._model.to(self.device).eval().requires_grad_(False)
        self.sample_rate: int = int(self._features.sampling_rate)
        self._references: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """The speaker embedding of ``audio`` (a 1-D tensor on the CPU)."""
        audio = to_rate(audio, sample_rate, self.sample_rate)
        shortest = int(_MIN_SECONDS * self.sample_rate)
        if audio.size < shortest:
            audio = np.pad(audio, (0, shortest - audio.size))
        inputs = self._features(audio, sampling_rate=self.sample_rate, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with untouched_rng(self.device):
            return self._model(**inputs).embeddings[0].detach().cpu()

    def add_reference(self, path: str | os.PathLike, prompt_name: str = "") -> None:
        """Read and embed the reference clip at ``path`` once.

        Raises:
            SpeechScorerError: the clip cannot be read (missing, not audio, empty).
        """
        key = os.fspath(path)
        if key in self._references:
            return
        try:
            clip = read_clip(key, self.sample_rate)
        except (OSError, ValueError) as exc:
            where = f" of prompt {prompt_name!r}" if prompt_name else ""
            raise SpeechScorerError(
                f"cannot read the reference clip {key}{where}: {first_line(exc)}; pass reference_audio= the path of "
                "a WAV (or FLAC, OGG) file of the voice"
            ) from None
        self._references[key] = self.embed(clip, self.sample_rate)

    def score(self, audio: np.ndarray, sample_rate: int, reference: str | os.PathLike) -> float:
        """Cosine similarity of ``audio``'s speaker embedding and ``reference``'s (read on first use); 0.0 for no audio.

        Args:
            audio: the sample, mono float.
            sample_rate: its rate in Hz.
            reference: the path of the reference clip.
        """
        self.add_reference(reference)
        if np.asarray(audio).size == 0:
            return 0.0
        return cosine(self.embed(audio, sample_rate), self._references[os.fspath(reference)])
