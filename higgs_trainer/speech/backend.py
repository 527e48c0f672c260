"""What the speech samples need from a stack: a prompt, the generated codes, and a backend that makes and decodes them.

A backend turns a `SpeechPrompt` into codec codes with the model as trained so far (`SpeechBackend.generate`)
and the codes into a waveform (`SpeechBackend.decode`). One backend per stack: transformers'
``HiggsAudioV2ForConditionalGeneration`` (`higgs_trainer.speech.transformers_backend`) and boson_multimodal's
``HiggsAudioModel`` (`higgs_trainer.speech.boson_backend`). This module imports neither, nor the speech extra.

Examples:
    >>> import torch
    >>> prompt = SpeechPrompt("greeting", "Hello there.")
    >>> speech = GeneratedSpeech(codes=torch.zeros(4, 10, dtype=torch.long), ended=True, audio_started=True)
    >>> speech.frames, codes_sha256(speech.codes)[:12]
    (10, '3aef2f16b61f')
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import UsageError

if TYPE_CHECKING:
    from transformers import LogitsProcessorList

_FILE_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class SpeechPrompt:
    """One text to speak at every checkpoint, optionally in the voice of a reference clip.

    Args:
        name: file-safe name of the sample: ``speech/<name>.wav`` (letters, digits, ``.``, ``_``, ``-``).
        text: what to say.
        reference_audio: path of a WAV clip whose voice to clone, optional.
        reference_text: the clip's transcript, optional.

    Examples:
        >>> SpeechPrompt("a/b", "hi")
        Traceback (most recent call last):
        higgs_trainer.errors.UsageError: speech prompt name 'a/b' is not file-safe: use letters, digits, '.', '_' and '-' (it names speech/<name>.wav)
    """

    name: str
    text: str
    reference_audio: str | None = None
    reference_text: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FILE_SAFE.match(self.name) or self.name in {".", ".."}:
            raise UsageError(
                f"speech prompt name {self.name!r} is not file-safe: use letters, digits, '.', '_' and '-' "
                "(it names speech/<name>.wav)"
            )
        if not isinstance(self.text, str) or not self.text.strip():
            raise UsageError(f"speech prompt {self.name!r} has no text: pass the words to speak")


@dataclass
class GeneratedSpeech:
    """What a backend generated for one prompt.

    Attributes:
        codes: int64 ``[num_codebooks, frames]`` codec codes, delay pattern removed, without stream BOS/EOS.
        ended: True when the model produced the audio-end token; False when the length limit was hit.
        audio_started: False when there was no audio at all (audio end / text end before any audio frame).
    """

    codes: torch.Tensor
    ended: bool
    audio_started: bool

    @property
    def frames(self) -> int:
        """Number of code frames (0 when no audio was generated)."""
        return int(self.codes.shape[-1]) if self.codes.dim() == 2 else 0


@runtime_checkable
class SpeechBackend(Protocol):
    """Generates codes for a prompt with a model and decodes codes to a waveform (one per stack).

    ``model`` is the ``PeftModel`` found by `higgs_trainer.find_lora_model`, with the adapter active, in eval
    mode, on its device. Generation is greedy (``do_sample=False``) unless ``generation_kwargs`` say otherwise;
    ``logits_processor`` must reach the model's real generation loop (tests force degenerate output with it).
    """

    sample_rate: int

    def generate(
        self,
        model: torch.nn.Module,
        prompt: SpeechPrompt,
        *,
        max_new_tokens: int,
        generation_kwargs: dict[str, Any],
        logits_processor: LogitsProcessorList | None = None,
    ) -> GeneratedSpeech:
        """Generate the codes of ``prompt`` with ``model``."""
        ...

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Decode ``[num_codebooks, frames]`` codes to a float32 mono waveform at ``sample_rate``."""
        ...


def codes_sha256(codes: torch.Tensor) -> str:
    """sha256 of codes as int64 little-endian bytes with their shape: equal codes, equal hash, on any device.

    Examples:
        >>> import torch
        >>> codes_sha256(torch.tensor([[1, 2]])) == codes_sha256(torch.tensor([[1, 2]], dtype=torch.int32))
        True
    """
    array = np.ascontiguousarray(codes.detach().to("cpu", torch.int64).numpy(), dtype="<i8")
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
