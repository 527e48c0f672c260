"""The speech extra's files: WAV (soundfile) and mel-spectrogram PNG (matplotlib, Agg), and reading a reference clip.

soundfile and matplotlib are imported here only, when first used; without them `require_speech_extra`
raises a one-line `MissingExtraError` naming ``pip install "higgs-trainer[speech]"``.

Examples:
    >>> import numpy as np
    >>> tone = np.sin(np.arange(4800) / 24000 * 2 * np.pi * 440).astype(np.float32)
    >>> write_wav("tone.wav", tone, 24000)
    >>> read_wav("tone.wav", 24000).shape
    (4800,)
    >>> write_spectrogram("tone.png", tone, 24000, title="tone")
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from ..errors import MissingExtraError, UsageError, first_line

EXTRA_HINT = 'pip install "higgs-trainer[speech]"'
N_MELS = 80


def require_speech_extra(what: str = "speech samples") -> tuple[Any, Any]:
    """Import soundfile and matplotlib (Agg backend), or raise `MissingExtraError` naming the extra.

    Examples:
        >>> soundfile, pyplot = require_speech_extra()
        >>> pyplot.get_backend().lower()
        'agg'
    """
    modules = []
    for name in ("soundfile", "matplotlib"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:  # OSError too: soundfile without its libsndfile raises that
            raise MissingExtraError(f"{what} need {name}, which is not installed: {EXTRA_HINT}") from exc
        except OSError as exc:
            raise MissingExtraError(f"{what} need {name}, which cannot load ({first_line(exc)}): {EXTRA_HINT}") from exc
    soundfile, matplotlib = modules
    matplotlib.use("Agg", force=False)  # files only: no display, no GUI toolkit
    from matplotlib import pyplot

    return soundfile, pyplot


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a mono float waveform as 16-bit PCM WAV at ``sample_rate`` (values beyond [-1, 1] are clipped)."""
    soundfile, _ = require_speech_extra()
    soundfile.write(os.fspath(path), np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0), sample_rate, "PCM_16")


def read_wav(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """A reference clip as a float32 mono waveform at ``sample_rate`` (channels averaged, resampled if needed)."""
    soundfile, _ = require_speech_extra("reference clips")
    try:
        waveform, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise UsageError(f"cannot read the reference clip {path}: {first_line(exc)} (pass a WAV file)") from exc
    waveform = waveform.mean(axis=1)
    if rate != sample_rate:
        import torch
        import torchaudio.functional  # what transformers' Higgs codec uses for resampling too

        waveform = torchaudio.functional.resample(torch.from_numpy(waveform), rate, sample_rate).numpy()
    return waveform.astype(np.float32)


def mel_spectrogram(waveform: np.ndarray, sample_rate: int, n_mels: int = N_MELS) -> np.ndarray:
    """Log-mel spectrogram ``[n_mels, frames]`` in dB (transformers' numpy audio_utils: 25 ms window, 10 ms hop).

    Examples:
        >>> import numpy as np
        >>> mel_spectrogram(np.zeros(24000, dtype=np.float32), 24000).shape
        (80, 101)
    """
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    n_fft = 1 << int(np.ceil(np.log2(0.025 * sample_rate)))
    hop = max(1, int(0.010 * sample_rate))
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.shape[0] < n_fft:
        waveform = np.pad(waveform, (0, n_fft - waveform.shape[0]))
    filters = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
        max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney",
    )  # fmt: skip
    return spectrogram(
        waveform, window_function(n_fft, "hann"), frame_length=n_fft, hop_length=hop, power=2.0,
        mel_filters=filters, log_mel="dB", reference=1.0, min_value=1e-10, db_range=80.0,
    )  # fmt: skip


def spectrogram_figure(waveform: np.ndarray, sample_rate: int, title: str) -> Any:
    """A matplotlib figure of the log-mel spectrogram (close it with ``pyplot.close(figure)``)."""
    _, pyplot = require_speech_extra()
    mel = mel_spectrogram(waveform, sample_rate)
    seconds = len(waveform) / sample_rate
    figure, axes = pyplot.subplots(figsize=(6, 2.5), dpi=100)
    image = axes.imshow(
        mel, origin="lower", aspect="auto", cmap="magma", extent=(0.0, max(seconds, 1e-3), 0, mel.shape[0])
    )
    axes.set(title=title, xlabel="seconds", ylabel="mel bin")
    figure.colorbar(image, ax=axes, label="dB")
    figure.tight_layout()
    return figure


def write_spectrogram(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int, title: str) -> None:
    """Write the log-mel spectrogram of ``waveform`` as a PNG."""
    _, pyplot = require_speech_extra()
    figure = spectrogram_figure(waveform, sample_rate, title)
    try:
        figure.savefig(os.fspath(path), format="png")
    finally:
        pyplot.close(figure)
