"""Degenerate speech: what makes a sample not worth listening to, found from its codes and waveform.

Flags (each a WARNING from the callback, recorded in ``speech.json``):

- ``no_audio``: the model ended the audio (or the text) before the first audio frame.
- ``silence``: the waveform's RMS is below ``silence_rms`` (default 1e-3, about -60 dBFS).
- ``runaway``: generation hit the length limit without the audio-end token.
- ``collapse``: one code frame makes up at least ``collapse_share`` (default 0.8) of the frames (at least 4 frames).

Examples:
    >>> import numpy as np, torch
    >>> from higgs_trainer.speech.backend import GeneratedSpeech
    >>> stuck = GeneratedSpeech(codes=torch.zeros(4, 10, dtype=torch.long), ended=False, audio_started=True)
    >>> speech_flags(stuck, np.full(4800, 0.1, dtype=np.float32))
    ['runaway', 'collapse']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .backend import GeneratedSpeech

FLAG_MEANINGS = {
    "no_audio": "the model ended the audio before the first frame",
    "silence": "the audio is near silent",
    "runaway": "the length limit was hit without the audio-end token",
    "collapse": "one code frame repeats for most of the output",
}


@dataclass(frozen=True)
class FlagThresholds:
    """Where a sample counts as degenerate.

    Args:
        silence_rms: RMS of the waveform (full scale 1.0) below which it is silence.
        collapse_share: share of frames one repeated code frame must reach to be a collapse.
        collapse_min_frames: fewer frames than this are never a collapse.
    """

    silence_rms: float = 1e-3
    collapse_share: float = 0.8
    collapse_min_frames: int = 4


DEFAULT_THRESHOLDS = FlagThresholds()


def rms(waveform: np.ndarray) -> float:
    """Root mean square of a waveform (0.0 when empty)."""
    waveform = np.asarray(waveform, dtype=np.float64)
    return float(np.sqrt(np.mean(waveform**2))) if waveform.size else 0.0


def most_common_frame_share(codes: torch.Tensor) -> float:
    """Share of frames (columns of ``[num_codebooks, frames]``) equal to the most common frame."""
    if codes.dim() != 2 or codes.shape[1] == 0:
        return 0.0
    _, counts = torch.unique(codes.T, dim=0, return_counts=True)
    return float(counts.max()) / codes.shape[1]


def speech_flags(
    speech: GeneratedSpeech, waveform: np.ndarray, thresholds: FlagThresholds = DEFAULT_THRESHOLDS
) -> list[str]:
    """The flags (keys of `FLAG_MEANINGS`) that ``speech`` and its decoded ``waveform`` raise, in a fixed order."""
    if not speech.audio_started or speech.frames == 0:
        return ["no_audio"]
    flags = []
    if rms(waveform) < thresholds.silence_rms:
        flags.append("silence")
    if not speech.ended:
        flags.append("runaway")
    if (
        speech.frames >= thresholds.collapse_min_frames
        and most_common_frame_share(speech.codes) >= thresholds.collapse_share
    ):
        flags.append("collapse")
    return flags
