"""One sample: generate a prompt's codes with the model, decode them, flag and score the audio, write its files.

Used by the callback at every save and by ``higgs-trainer speak``, so both produce the same codes for the
same model and prompt.

Examples:
    ```python
    result = generate_sample(peft_model, SpeechPrompt("hello", "Hello there."), backend, max_new_tokens=256)
    result.record.codes_sha256, result.record.flags
    ```
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio_files import write_spectrogram, write_wav
from .backend import GeneratedSpeech, SpeechBackend, SpeechPrompt, codes_sha256
from .flags import DEFAULT_THRESHOLDS, FlagThresholds, speech_flags
from .records import SampleRecord

logger = logging.getLogger(__name__)

# A scorer gets the prompt, the waveform and its sample rate and returns name -> value (issue 21: ASR, speaker).
Scorer = Callable[[SpeechPrompt, np.ndarray, int], Mapping[str, float]]


@dataclass
class Sample:
    """A generated sample: its record, codes and waveform."""

    record: SampleRecord
    speech: GeneratedSpeech
    waveform: np.ndarray


@contextlib.contextmanager
def undisturbed(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; every module's train mode and the python, numpy and torch RNGs restored after.

    Examples:
        >>> import torch
        >>> layer = torch.nn.Dropout(0.5).train()
        >>> before = torch.rand(1)
        >>> with undisturbed(layer):
        ...     _ = torch.rand(3), layer.training
        >>> layer.training
        True
    """
    modes = [(module, module.training) for module in model.modules()]
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def generate_sample(
    model: torch.nn.Module,
    prompt: SpeechPrompt,
    backend: SpeechBackend,
    *,
    max_new_tokens: int,
    generation_kwargs: Mapping[str, Any] | None = None,
    thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
    scorers: Sequence[Scorer] = (),
    logits_processor: Any = None,
) -> Sample:
    """Generate and decode ``prompt`` with ``model`` (the PeftModel, in eval mode), flag and score it; writes nothing.

    Args:
        model: the ``PeftModel`` with the adapter active.
        prompt: what to say.
        backend: the stack's `SpeechBackend`.
        max_new_tokens: length limit of generation (audio frames plus the delay pattern's few).
        generation_kwargs: passed to generation (greedy unless they say otherwise).
        thresholds: where a sample counts as degenerate.
        scorers: callables ``(prompt, waveform, sample_rate) -> {name: value}``.
        logits_processor: a ``LogitsProcessorList`` for the generation loop (tests force degenerate output with it).
    """
    speech = backend.generate(
        model, prompt, max_new_tokens=max_new_tokens, generation_kwargs=dict(generation_kwargs or {}),
        logits_processor=logits_processor,
    )  # fmt: skip
    waveform = np.asarray(backend.decode(speech.codes), dtype=np.float32).reshape(-1)
    record = SampleRecord(
        name=prompt.name, text=prompt.text, reference_audio=prompt.reference_audio,
        reference_text=prompt.reference_text, seconds=round(len(waveform) / backend.sample_rate, 4),
        frames=speech.frames, codes_sha256=codes_sha256(speech.codes), ended=speech.ended,
        flags=speech_flags(speech, waveform, thresholds),
    )  # fmt: skip
    for scorer in scorers:
        record.scores.update({str(k): float(v) for k, v in scorer(prompt, waveform, backend.sample_rate).items()})
    return Sample(record=record, speech=speech, waveform=waveform)


def write_sample_files(sample: Sample, directory: Path, sample_rate: int, title: str) -> None:
    """Write ``<name>.wav`` and ``<name>.png`` (mel spectrogram) of ``sample`` into ``directory``."""
    name = sample.record.name
    write_wav(directory / f"{name}.wav", sample.waveform, sample_rate)
    write_spectrogram(directory / f"{name}.png", sample.waveform, sample_rate, title=title)
    sample.record.wav, sample.record.png = f"{name}.wav", f"{name}.png"


def thresholds_json(thresholds: FlagThresholds) -> dict[str, Any]:
    """The thresholds as recorded in ``speech.json``."""
    return asdict(thresholds)
