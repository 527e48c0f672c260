"""The page's plot: the training loss and the speech scores against the step, side by side, as inline SVG.

Plain SVG text, so the page needs no plotting library, no image file and no network; the best
checkpoint's step is a dashed green line on both panels.

Examples:
    >>> svg = line_panel("loss", [Series("loss", "#444", [(1, 3.0), (2, 2.0)])], best_step=2)
    >>> svg.startswith("<svg") and svg.count("<polyline") == 1
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from .run_samples import RunSamples

WIDTH, HEIGHT = 380, 210
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 26, 46
SCORE_SERIES = (
    ("speech_wer", "WER", "#d62728"),
    ("speech_cer", "CER", "#ff7f0e"),
    ("speech_similarity", "similarity", "#1f77b4"),
)
BEST_COLOR = "#2ca02c"


@dataclass(frozen=True)
class Series:
    """One line of a panel: its legend label, colour and ``(step, value)`` points."""

    label: str
    color: str
    points: list[tuple[int, float]]
    dashed: bool = False


def _ticks(low: float, high: float) -> list[float]:
    return [low + (high - low) * i / 2 for i in range(3)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def line_panel(
    title: str, series: list[Series], best_step: int | None = None, empty: str = "nothing recorded yet"
) -> str:
    """One panel: ``series`` against the step, with their legend and the best step marked.

    Args:
        title: the panel's heading.
        series: the lines to draw (an empty one is left out of the drawing but kept in the legend).
        best_step: the step of the best checkpoint, or ``None``.
        empty: what the panel says when no series has a point.
    """
    points = [p for s in series for p in s.points]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{_LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{_LEFT}" y="{HEIGHT // 2}" fill="#888">{escape(empty)}</text></svg>')
        return "".join(parts)
    steps = [step for step, _ in points] + ([best_step] if best_step is not None else [])
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(step: float) -> float:
        return _LEFT + (step - x0) / (x1 - x0) * plot_w

    def y(value: float) -> float:
        return _TOP + (1 - (value - y0) / (y1 - y0)) * plot_h

    bottom = _TOP + plot_h
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>')
    for value in _ticks(y0, y1):
        parts.append(f'<text x="{_LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end">{_label(value)}</text>')
    for step in _ticks(x0, x1):
        parts.append(f'<text x="{x(step):.1f}" y="{bottom + 14}" text-anchor="middle">{_label(step)}</text>')
    parts.append(f'<text x="{_LEFT + plot_w / 2:.1f}" y="{bottom + 27}" text-anchor="middle" fill="#555">step</text>')
    if best_step is not None:
        parts.append(
            f'<line x1="{x(best_step):.1f}" y1="{_TOP}" x2="{x(best_step):.1f}" y2="{bottom}" stroke="{BEST_COLOR}" '
            'stroke-dasharray="4 3"><title>best checkpoint</title></line>'
        )
    legend_x = _LEFT
    for line in series:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in line.points)
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        if line.points:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{line.color}" stroke-width="1.6"{dash}/>')
            parts.extend(
                f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{line.color}"><title>{escape(line.label)} at step '
                f"{s}: {v:.4g}</title></circle>"
                for s, v in line.points
            )
        parts.append(f'<rect x="{legend_x}" y="{HEIGHT - 10}" width="10" height="3" fill="{line.color}"/>')
        parts.append(f'<text x="{legend_x + 13}" y="{HEIGHT - 6}">{escape(line.label)}</text>')
        legend_x += 18 + 7 * len(line.label)
    parts.append("</svg>")
    return "".join(parts)


def score_plots(run: RunSamples) -> str:
    """The two panels of a run: training (and eval) loss, and the mean speech scores of each checkpoint."""
    best = next((c.step for c in run.checkpoints if c.name == run.best_checkpoint), None)
    losses = [Series("training loss", "#444", run.loss_history)]
    if run.eval_loss_history:
        losses.append(Series("eval loss", "#888", run.eval_loss_history, dashed=True))
    scores = [
        Series(label, color, [(c.step, c.metrics[metric]) for c in run.checkpoints if metric in c.metrics])
        for metric, label, color in SCORE_SERIES
        if any(metric in c.metrics for c in run.checkpoints)
    ]
    no_scores = "no scores: give the speech callback an asr_model or speaker_model"
    return line_panel("loss", losses, best) + line_panel("speech scores (mean over prompts)", scores, best, no_scores)
