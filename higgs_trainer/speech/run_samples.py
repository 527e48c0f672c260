"""A run's speech samples as the page and ``higgs-trainer listen`` show them: checkpoints by prompts.

Reads what training left on disk, nothing else: each complete ``checkpoint-N`` (and the run's final
save) with its ``speech/speech.json`` records, the losses of ``trainer_state.json``'s ``log_history``,
and its ``best_model_checkpoint``. A checkpoint without samples (saved before the speech callback was
added) is kept as a row with nothing in it; an unreadable ``speech.json`` is kept with the reason.

Examples:
    >>> import json
    >>> from pathlib import Path
    >>> speech = Path("run/checkpoint-2/speech")
    >>> speech.mkdir(parents=True)
    >>> _ = Path("run/checkpoint-2/trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [{"step": 2, "loss": 3.5}]}))
    >>> record = {"name": "hi", "text": "Hi.", "seconds": 0.5, "flags": ["silence"], "scores": {"wer": 1.0}}
    >>> _ = (speech / "speech.json").write_text(json.dumps({"global_step": 2, "samples": [record]}))
    >>> run = read_run("run")
    >>> [(c.name, c.step, c.loss, c.samples["hi"].flags, c.metrics) for c in run.checkpoints]
    [('checkpoint-2', 2, 3.5, ('silence',), {'speech_wer': 1.0, 'speech_degenerate': 1.0})]
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, NoSpeechSamplesError, first_line
from ..files.paths import existing_directory, read_json_object
from ..files.runs import CHECKPOINT_NAME, checkpoints_of, is_complete_checkpoint
from ..names import TRAINER_STATE

logger = logging.getLogger(__name__)

SPEECH_DIRNAME = "speech"
SPEECH_RECORD = "speech.json"
FINAL = "final"  # the row of the run's own speech/ (the save at the end of training)
# Per-sample score keys in speech.json and the checkpoint metric each averages into (scoring.summarize's names).
SCORE_METRICS = {"wer": "speech_wer", "cer": "speech_cer", "similarity": "speech_similarity"}
HOW_TO_ADD = (
    "they are written by the speech callback at every save: pass callbacks=[SpeechSamplesCallback(prompts=...)] to "
    "the trainer (docs/listening.md), or make one for a saved adapter with higgs-trainer speak"
)


@dataclass(frozen=True)
class Sample:
    """One prompt's sample in one checkpoint (paths are absolute, ``None`` when the file is missing)."""

    name: str
    text: str = ""
    wav: Path | None = None
    png: Path | None = None
    seconds: float | None = None
    frames: int | None = None
    flags: tuple[str, ...] = ()
    error: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    transcript: str | None = None
    reference_audio: str | None = None


@dataclass(frozen=True)
class CheckpointSamples:
    """A checkpoint's row: its samples by prompt name, the training loss at its step, and its speech metrics."""

    name: str
    step: int
    directory: Path
    samples: dict[str, Sample]
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    problem: str | None = None  # why it has no samples to show


@dataclass(frozen=True)
class RunSamples:
    """A run's checkpoints (oldest first), its prompts (in order of first appearance), losses and best checkpoint."""

    directory: Path
    checkpoints: list[CheckpointSamples]
    prompts: list[Sample]
    loss_history: list[tuple[int, float]]
    eval_loss_history: list[tuple[int, float]]
    best_checkpoint: str | None = None
    best_metric: float | None = None


def read_run(run_dir: str | os.PathLike) -> RunSamples:
    """Read the speech samples of the run at ``run_dir``.

    Args:
        run_dir: a training run's ``output_dir`` (the directory holding ``checkpoint-N``).

    Raises:
        UsageError: ``run_dir`` does not exist or is a file.
        NoSpeechSamplesError: no checkpoint (and no final save) holds ``speech/speech.json``; says what makes them.
    """
    run_dir = existing_directory(run_dir, "run directory")
    directories = [(c, _step_of(c)) for c in checkpoints_of(run_dir) if is_complete_checkpoint(c)]
    state = _newest_state(run_dir, [c for c, _ in directories])
    if (run_dir / SPEECH_DIRNAME / SPEECH_RECORD).is_file():
        directories.append((run_dir, int(state.get("global_step") or (directories[-1][1] if directories else 0))))
    if not any((d / SPEECH_DIRNAME / SPEECH_RECORD).is_file() for d, _ in directories):
        raise NoSpeechSamplesError(
            f"{run_dir} has no speech samples (no checkpoint-N/speech/speech.json): {HOW_TO_ADD}"
        )
    losses = _history(state, "loss")
    checkpoints = [_read_checkpoint(d, step, losses, is_final=d == run_dir) for d, step in directories]
    prompts: dict[str, Sample] = {}
    for checkpoint in checkpoints:
        for name, sample in checkpoint.samples.items():
            prompts.setdefault(name, sample)
    best = state.get("best_model_checkpoint")
    return RunSamples(
        directory=run_dir,
        checkpoints=checkpoints,
        prompts=list(prompts.values()),
        loss_history=losses,
        eval_loss_history=_history(state, "eval_loss"),
        best_checkpoint=Path(best).name if best else None,  # a path on the machine that trained: match by name
        best_metric=_number(state.get("best_metric")),
    )


def _step_of(checkpoint: Path) -> int:
    match = CHECKPOINT_NAME.match(checkpoint.name)
    return int(match.group(1)) if match else 0


def _newest_state(run_dir: Path, checkpoints: list[Path]) -> dict[str, Any]:
    """The ``trainer_state.json`` with the most steps: the run's own (``save_state``) or the last checkpoint's."""
    candidates = [run_dir / TRAINER_STATE, *(c / TRAINER_STATE for c in reversed(checkpoints))]
    states = []
    for path in candidates:
        if path.is_file():
            try:
                states.append(read_json_object(path, CheckpointError))
            except CheckpointError as exc:
                logger.warning("%s; its losses are not shown", exc)
    return max(states, key=lambda s: int(s.get("global_step") or 0), default={})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _history(state: dict[str, Any], key: str) -> list[tuple[int, float]]:
    points = []
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and (value := _number(entry.get(key))) is not None and "step" in entry:
            points.append((int(entry["step"]), value))
    return points


def _loss_at(losses: list[tuple[int, float]], step: int) -> float | None:
    before = [loss for at, loss in losses if at <= step]
    return before[-1] if before else None


def _read_checkpoint(directory: Path, step: int, losses: list[tuple[int, float]], is_final: bool) -> CheckpointSamples:
    name = FINAL if is_final else directory.name
    speech = directory / SPEECH_DIRNAME
    row = {"name": name, "step": step, "directory": directory, "loss": _loss_at(losses, step)}
    if not (speech / SPEECH_RECORD).is_file():
        return CheckpointSamples(samples={}, problem="no speech samples in this checkpoint", **row)
    try:
        record = json.loads((speech / SPEECH_RECORD).read_text())
        samples = [_sample(speech, entry) for entry in _sample_entries(record)]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("%s cannot be read (%s); the checkpoint is shown without samples", speech / SPEECH_RECORD, exc)
        return CheckpointSamples(samples={}, problem=f"speech.json cannot be read: {first_line(exc)}", **row)
    return CheckpointSamples(samples={s.name: s for s in samples}, metrics=_metrics(samples), **row)


def _sample_entries(record: Any) -> list[dict[str, Any]]:
    """The per-sample records of a ``speech.json``: a ``samples`` list (or a mapping of name to record)."""
    samples = record["samples"] if isinstance(record, dict) else record
    if isinstance(samples, dict):
        return [{"name": name, **entry} for name, entry in samples.items()]
    if not isinstance(samples, list) or not all(isinstance(s, dict) and "name" in s for s in samples):
        raise ValueError("'samples' is not a list of records with a 'name'")
    return samples


def _flags(value: Any) -> tuple[str, ...]:
    """Flag names from a list of names, a list of ``{"flag": ...}`` records, or a mapping of name to truthy detail."""
    if isinstance(value, dict):
        return tuple(str(k) for k, v in value.items() if v)
    flags = []
    for item in value or []:
        flags.append(str(item.get("flag") or item.get("name")) if isinstance(item, dict) else str(item))
    return tuple(flags)


def _existing(directory: Path, name: Any) -> Path | None:
    if not isinstance(name, str) or not name:
        return None
    path = directory / name
    return path if path.is_file() and path.resolve().is_relative_to(directory.resolve()) else None


def _sample(speech: Path, entry: dict[str, Any]) -> Sample:
    name = str(entry["name"])
    # the prompt's fields sit in the record (text, reference_audio), or in a "prompt" object, or "prompt" is the text
    prompt = entry.get("prompt")
    prompt = {**entry, **(prompt if isinstance(prompt, dict) else {"text": prompt or entry.get("text") or ""})}
    scores = entry.get("scores") if isinstance(entry.get("scores"), dict) else {}
    numbers = {key: v for key, value in scores.items() if (v := _number(value)) is not None}
    transcript = next((t for t in (scores.get("transcript"), entry.get("transcript")) if isinstance(t, str)), None)
    return Sample(
        name=name,
        text=str(prompt.get("text") or ""),
        wav=_existing(speech, entry.get("wav") or f"{name}.wav"),
        png=_existing(speech, entry.get("png") or entry.get("spectrogram") or f"{name}.png"),
        seconds=_number(entry.get("seconds")),
        frames=int(entry["frames"]) if isinstance(entry.get("frames"), int) else None,
        flags=_flags(entry.get("flags")),
        error=str(entry["error"]) if entry.get("error") else None,
        scores=numbers,
        transcript=transcript,
        reference_audio=prompt.get("reference_audio") if isinstance(prompt.get("reference_audio"), str) else None,
    )


def _metrics(samples: list[Sample]) -> dict[str, float]:
    """The checkpoint's speech metrics from its samples' scores, as `scoring.summarize` makes them."""
    metrics = {}
    for key, metric in SCORE_METRICS.items():
        values = [s.scores[key] for s in samples if key in s.scores]
        if values:
            metrics[metric] = sum(values) / len(values)
    if samples:
        metrics["speech_degenerate"] = float(sum(1 for s in samples if s.flags or s.error))
    return metrics
