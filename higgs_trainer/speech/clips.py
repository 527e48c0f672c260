"""Audio for the scorers: a clip read from disk, or a waveform, as mono float32 at the rate a model takes.

Reading is soundfile's (WAV, FLAC, OGG...), resampling soxr's (the resampler librosa uses): the same
two steps for the generated samples and the users' reference clips, so both reach a model alike.

Examples:
    >>> import numpy as np
    >>> tone = np.sin(np.linspace(0, 200 * np.pi, 24000)).astype(np.float32)
    >>> to_rate(tone, 24000, 16000).shape
    (16000,)
"""

from __future__ import annotations

import os

import numpy as np

from .dependencies import import_speech_dependency


def to_rate(audio: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """``audio`` (mono, or ``[samples, channels]`` averaged to mono) as float32 at ``target_rate``.

    Args:
        audio: the waveform.
        sample_rate: its rate in Hz.
        target_rate: the rate the model takes.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise ValueError(f"expected a mono waveform or [samples, channels], got shape {tuple(audio.shape)}")
    if sample_rate == target_rate or audio.size == 0:
        return audio
    soxr = import_speech_dependency("soxr")
    return np.asarray(soxr.resample(audio, sample_rate, target_rate), dtype=np.float32)


def read_clip(path: str | os.PathLike, target_rate: int) -> np.ndarray:
    """The audio file at ``path`` as mono float32 at ``target_rate``.

    Raises ``OSError`` or ``ValueError`` (soundfile's ``LibsndfileError`` is a ``RuntimeError``, turned into
    ``ValueError`` here) when it cannot be read, and ``ValueError`` when it holds no samples.

    Examples:
        >>> import numpy as np, soundfile
        >>> soundfile.write("clip.wav", np.zeros(8000, dtype=np.float32), 8000)
        >>> read_clip("clip.wav", 16000).shape
        (16000,)
    """
    soundfile = import_speech_dependency("soundfile")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        audio, sample_rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:
        raise ValueError(f"not an audio file soundfile reads ({' '.join(str(exc).split())})") from None
    if audio.shape[0] == 0:
        raise ValueError("the file holds no samples")
    return to_rate(audio, sample_rate, target_rate)
