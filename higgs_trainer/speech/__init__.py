"""Listen to a run: speech samples at every checkpoint (the ``speech`` extra: ``pip install "higgs-trainer[speech]"``).

Importing this package imports nothing heavy; the callback and the writers import soundfile and matplotlib when
used, and fail at once with a one-line error naming the extra when they are missing.

Examples:
    >>> from higgs_trainer.speech import SpeechPrompt
    >>> SpeechPrompt("hello", "Hello there.").name
    'hello'
"""

from .backend import GeneratedSpeech, SpeechBackend, SpeechPrompt, codes_sha256

__all__ = ["GeneratedSpeech", "SpeechBackend", "SpeechPrompt", "codes_sha256"]
