"""``speech.json``: what was generated for each prompt at one save, open to scores added later (ASR, speaker).

Examples:
    >>> record = SampleRecord(name="hello", text="Hello there.", frames=10, seconds=0.2, codes_sha256="ab", ended=True)
    >>> sorted(record.to_json())[:4]
    ['codes_sha256', 'ended', 'error', 'flags']
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

SPEECH_DIRNAME = "speech"
RECORD_NAME = "speech.json"
FORMAT_VERSION = 1


@dataclass
class SampleRecord:
    """One prompt's sample at one save.

    Attributes:
        name, text, reference_audio, reference_text: the prompt.
        wav, png: file names inside ``speech/`` (None when nothing was written).
        seconds, frames: length of the audio and number of code frames.
        codes_sha256: `codes_sha256` of the codes: equal codes, equal hash (``higgs-trainer speak`` prints it).
        ended: the model produced the audio end (False: the length limit was hit).
        flags: degenerate-speech flags (`higgs_trainer.speech.flags`).
        scores: name -> value from the scorers and `SpeechScoring` (``wer``, ``cer``, ``similarity``, ``transcript``).
        error: why the sample failed, or None.
    """

    name: str
    text: str
    reference_audio: str | None = None
    reference_text: str | None = None
    wav: str | None = None
    png: str | None = None
    seconds: float = 0.0
    frames: int = 0
    codes_sha256: str | None = None
    ended: bool | None = None
    flags: list[str] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object."""
        return asdict(self)


def write_records(
    path: str | os.PathLike, samples: list[SampleRecord], *, checkpoint: str, global_step: int, sample_rate: int,
    generation: dict[str, Any], thresholds: dict[str, Any],
) -> None:  # fmt: skip
    """Write ``speech.json``: the save it belongs to, how samples were generated, and one record per prompt."""
    document = {
        "format_version": FORMAT_VERSION,
        "checkpoint": checkpoint,
        "global_step": global_step,
        "sample_rate": sample_rate,
        "generation": generation,
        "flag_thresholds": thresholds,
        "samples": [sample.to_json() for sample in samples],
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, default=str)
        handle.write("\n")


def read_records(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``speech.json`` written by `write_records`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
