"""The speech backend contract (stand-in copied from SPEECH_CONTRACT.md; h20's backend.py replaces it on merge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessorList


@dataclass(frozen=True)
class SpeechPrompt:
    name: str
    text: str
    reference_audio: str | None = None
    reference_text: str | None = None


@dataclass
class GeneratedSpeech:
    codes: torch.Tensor
    ended: bool
    audio_started: bool


class SpeechBackend(Protocol):
    sample_rate: int

    def generate(
        self,
        model: nn.Module,
        prompt: SpeechPrompt,
        *,
        max_new_tokens: int,
        generation_kwargs: dict,
        logits_processor: LogitsProcessorList | None = None,
    ) -> GeneratedSpeech: ...

    def decode(self, codes: torch.Tensor) -> np.ndarray: ...
