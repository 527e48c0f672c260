"""Listen to a run: speech samples at every checkpoint (the ``speech`` extra: ``pip install "higgs-trainer[speech]"``).

Importing this package imports neither soundfile nor matplotlib; the callback and `higgs-trainer speak` import
them when used and fail at once with a one-line error naming the extra when they are missing.

Examples:
    >>> from higgs_trainer.speech import SpeechPrompt
    >>> SpeechPrompt("hello", "Hello there.").name
    'hello'
"""

from .backend import GeneratedSpeech, SpeechBackend, SpeechPrompt, codes_sha256
from .callback import SpeechSamplesCallback
from .flags import FLAG_MEANINGS, FlagThresholds
from .records import SampleRecord, read_records
from .scoring import SpeechScoring
from .transformers_backend import TransformersSpeechBackend

__all__ = [
    "FLAG_MEANINGS",
    "FlagThresholds",
    "GeneratedSpeech",
    "SampleRecord",
    "SpeechBackend",
    "SpeechPrompt",
    "SpeechSamplesCallback",
    "SpeechScoring",
    "TransformersSpeechBackend",
    "codes_sha256",
    "read_records",
]
