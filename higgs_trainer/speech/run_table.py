"""The page's table as plain text, for the terminal (``higgs-trainer listen``).

Examples:
    >>> from pathlib import Path
    >>> from higgs_trainer.speech.run_samples import CheckpointSamples, RunSamples, Sample
    >>> hi = Sample("hi", "Hi.", seconds=0.5, flags=("silence",), scores={"wer": 1.0})
    >>> row = CheckpointSamples("checkpoint-2", 2, Path("run/checkpoint-2"), {"hi": hi}, loss=3.5)
    >>> print(format_table(RunSamples(Path("run"), [row], [hi], [], [], best_checkpoint="checkpoint-2")))
    checkpoint      step  loss  hi
    checkpoint-2 *     2   3.5  0.50 s WER 1.00 [silence]
    * best checkpoint (trainer_state.json's best_model_checkpoint)
"""

from __future__ import annotations

from .run_samples import CheckpointSamples, RunSamples, Sample

_SCORES = (("wer", "WER", 2), ("cer", "CER", 2), ("similarity", "sim", 3))


def sample_summary(sample: Sample | None) -> str:
    """One cell: length, scores and flags of a sample (``-`` when there is none).

    Examples:
        >>> sample_summary(Sample("hi", error="CUDA out of memory"))
        'failed: CUDA out of memory'
    """
    if sample is None:
        return "-"
    if sample.error:
        return f"failed: {sample.error}"
    parts = [f"{sample.seconds:.2f} s"] if sample.seconds is not None else []
    parts += [f"{label} {sample.scores[key]:.{digits}f}" for key, label, digits in _SCORES if key in sample.scores]
    if sample.flags:
        parts.append(f"[{', '.join(sample.flags)}]")
    return " ".join(parts) or "sample"


def _label(checkpoint: CheckpointSamples, run: RunSamples) -> str:
    return checkpoint.name + (" *" if checkpoint.name == run.best_checkpoint else "")


def format_table(run: RunSamples) -> str:
    """The run's checkpoints (rows) by prompts (columns), each cell a `sample_summary`, the best one starred."""
    header = ["checkpoint", "step", "loss", *(prompt.name for prompt in run.prompts)]
    rows = [
        [
            _label(c, run),
            str(c.step),
            f"{c.loss:.4g}" if c.loss is not None else "-",
            *(sample_summary(c.samples.get(p.name)) if c.samples else (c.problem or "-") for p in run.prompts),
        ]
        for c in run.checkpoints
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2])]
        cells += [cell.ljust(width) for cell, width in zip(row[3:], widths[3:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    if run.best_checkpoint:
        lines.append("* best checkpoint (trainer_state.json's best_model_checkpoint)")
    return "\n".join(lines)
