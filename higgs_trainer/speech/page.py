"""``OUTPUT_DIR/speech.html``: one page to listen to a whole run and compare its checkpoints.

A table of checkpoints (rows, oldest first) by prompts (columns); each cell has an audio player, the
spectrogram, the flags and the scores of that sample; the best checkpoint (``trainer_state.json``'s
``best_model_checkpoint``) is marked; above the table, the loss and the mean scores against the step.
It opens from disk: the style, the plot (SVG) and the one small script are inline, audio and
spectrograms are referenced by relative path, nothing is fetched from the network. Rewritten atomically,
so a browser reloading it during training never sees half a page.

Examples:
    >>> import json
    >>> from pathlib import Path
    >>> speech = Path("run/checkpoint-2/speech")
    >>> speech.mkdir(parents=True)
    >>> _ = Path("run/checkpoint-2/trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    >>> _ = (speech / "speech.json").write_text(json.dumps({"samples": [{"name": "hi", "prompt": {"text": "Hi."}}]}))
    >>> page = write_speech_page("run")
    >>> page.name, page.read_text().count('<tr class="checkpoint')
    ('speech.html', 1)
"""

from __future__ import annotations

import datetime
import logging
import os
from html import escape
from pathlib import Path
from urllib.parse import quote

from ..files.atomic import write_file_atomically
from .run_samples import CheckpointSamples, RunSamples, Sample, read_run
from .score_plot import score_plots

logger = logging.getLogger(__name__)

PAGE_NAME = "speech.html"
# What each degenerate-speech flag means (hover text on the page); flags not listed are shown as they are.
FLAG_MEANINGS = {
    "no_audio": "no audio: the audio end token came at once",
    "silence": "silence: the sample's RMS is below the threshold",
    "runaway": "run-away: the length limit was hit with no audio end",
    "run_away": "run-away: the length limit was hit with no audio end",
    "collapse": "collapse: one code frame repeats for most of the output",
}
SCORE_LABELS = (("wer", "WER", 2), ("cer", "CER", 2), ("similarity", "sim", 3))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
.meta { color: #555; margin: 0 0 0.8em; }
.plots svg { margin-right: 1.5em; border: 1px solid #eee; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }
th.prompt { max-width: 260px; font-weight: normal; }
th.prompt b { display: block; }
td.sample { width: 260px; }
td.sample img { width: 250px; height: 100px; object-fit: contain; object-position: left; display: block; margin-top: 4px; }
audio { width: 250px; }
tbody th { font-weight: normal; white-space: nowrap; }
tr.best { background: #eefbea; }
.badge { display: inline-block; border-radius: 3px; padding: 0 5px; margin: 2px 2px 0 0; font-size: 0.85em; }
.best-badge { background: #2ca02c; color: #fff; }
.flag { background: #d62728; color: #fff; }
.error, .broken { color: #d62728; }
.scores { font-variant-numeric: tabular-nums; }
.heard { color: #555; font-style: italic; }
.none { color: #aaa; }
"""

# Marks a player whose file is missing or cannot be decoded, and plays one sample at a time.
_SCRIPT = """
(function () {
  const players = Array.from(document.querySelectorAll("audio"));
  function broken(player) {
    if (player.dataset.broken) return;
    player.dataset.broken = "1";
    const note = document.createElement("div");
    note.className = "broken";
    note.textContent = "cannot play " + player.getAttribute("src");
    player.after(note);
  }
  for (const player of players) {
    if (player.error) broken(player);
    player.addEventListener("error", () => broken(player));
    player.addEventListener("play", () => players.forEach((other) => { if (other !== player) other.pause(); }));
  }
})();
"""


def _href(path: Path | str, run_dir: Path) -> str:
    return quote(Path(os.path.relpath(Path(path).resolve(), run_dir.resolve())).as_posix())


def _scores_text(scores: dict[str, float]) -> str:
    shown = [f"{label} {scores[key]:.{digits}f}" for key, label, digits in SCORE_LABELS if key in scores]
    return " · ".join(shown)


def _flag_badges(flags: tuple[str, ...]) -> str:
    return "".join(
        f'<span class="badge flag" title="{escape(FLAG_MEANINGS.get(flag, flag))}">{escape(flag)}</span>'
        for flag in flags
    )


def _cell(sample: Sample | None, run_dir: Path) -> str:
    if sample is None:
        return '<td class="sample none">no sample</td>'
    parts = []
    if sample.wav is not None:
        parts.append(f'<audio controls preload="metadata" src="{_href(sample.wav, run_dir)}"></audio>')
    elif not sample.error:
        parts.append('<div class="broken">WAV file missing</div>')
    length = [
        f"{sample.seconds:.2f} s" if sample.seconds is not None else "",
        f"{sample.frames} frames" if sample.frames is not None else "",
    ]
    if any(length) and not sample.error:  # a failed sample's record says 0 s, 0 frames: nothing to show
        parts.append(f"<div>{escape(', '.join(p for p in length if p))}</div>")
    if sample.flags:
        parts.append(f"<div>{_flag_badges(sample.flags)}</div>")
    if sample.error:
        parts.append(f'<div class="error">failed: {escape(sample.error)}</div>')
    if sample.scores:
        parts.append(f'<div class="scores">{escape(_scores_text(sample.scores))}</div>')
    if sample.transcript is not None:
        heard = f"“{escape(sample.transcript)}”" if sample.transcript else "nothing"
        parts.append(f'<div class="heard">heard: {heard}</div>')
    if sample.png is not None:
        href = _href(sample.png, run_dir)
        parts.append(f'<a href="{href}"><img src="{href}" alt="spectrogram of {escape(sample.name)}"></a>')
    return f'<td class="sample">{"".join(parts)}</td>'


def _row(checkpoint: CheckpointSamples, run: RunSamples, base: Path) -> str:
    best = checkpoint.name == run.best_checkpoint
    head = [f"<b>{escape(checkpoint.name)}</b>", f"step {checkpoint.step}"]
    if best:
        head.insert(1, '<span class="badge best-badge" title="trainer_state.json: best_model_checkpoint">best</span>')
    if checkpoint.loss is not None:
        head.append(f"loss {checkpoint.loss:.4g}")
    metrics = {key.removeprefix("speech_"): value for key, value in checkpoint.metrics.items()}
    if scores := _scores_text(metrics):
        head.append(f'<span class="scores">mean {escape(scores)}</span>')
    if metrics.get("degenerate"):
        head.append(f'<span class="error">{int(metrics["degenerate"])} degenerate</span>')
    if checkpoint.problem:
        head.append(f'<span class="none">{escape(checkpoint.problem)}</span>')
    cells = "".join(_cell(checkpoint.samples.get(prompt.name), base) for prompt in run.prompts)
    classes = "checkpoint best" if best else "checkpoint"
    return f'<tr class="{classes}" data-checkpoint="{escape(checkpoint.name)}"><th>{"<br>".join(head)}</th>{cells}</tr>'


def _prompt_header(prompt: Sample, run_dir: Path) -> str:
    parts = [f"<b>{escape(prompt.name)}</b>", escape(prompt.text)]
    if prompt.reference_audio and Path(prompt.reference_audio).is_file():
        parts.append(
            f'<div>voice: <audio controls preload="metadata" src="{_href(prompt.reference_audio, run_dir)}"></audio></div>'
        )
    elif prompt.reference_audio:
        parts.append(f'<div class="none">voice: {escape(prompt.reference_audio)} (not on this machine)</div>')
    return f'<th class="prompt">{"".join(parts)}</th>'


def render_page(run: RunSamples, base: Path | None = None) -> str:
    """The HTML of the page for ``run`` (see the module docstring), linking files relative to ``base`` (the page's
    directory; default the run's)."""
    base = base if base is not None else run.directory
    best = (
        f"best checkpoint: <b>{escape(run.best_checkpoint)}</b>"
        + (f" (best_metric {run.best_metric:.4g})" if run.best_metric is not None else "")
        if run.best_checkpoint
        else "no best checkpoint recorded (set metric_for_best_model to have the trainer choose one)"
    )
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    headers = "".join(_prompt_header(prompt, base) for prompt in run.prompts)
    rows = "\n".join(_row(checkpoint, run, base) for checkpoint in run.checkpoints)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Speech samples: {escape(run.directory.name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Speech samples of {escape(run.directory.name)}</h1>
<p class="meta">{escape(str(run.directory))} · {len(run.checkpoints)} checkpoints × {len(run.prompts)} prompts · {best} · written {escape(written)}</p>
<div class="plots">{score_plots(run)}</div>
<table id="samples">
<thead><tr><th>checkpoint</th>{headers}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_speech_page(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the listening page of the run at ``run_dir`` (to ``run_dir/speech.html`` unless ``output`` says).

    Args:
        run_dir: the run's ``output_dir``.
        output: where to write the page instead; its links to the samples are relative to its own directory.

    Returns:
        The path of the page.

    Raises:
        NoSpeechSamplesError: the run holds no speech samples (the message says what makes them).
    """
    run = read_run(run_dir)
    page = Path(output) if output is not None else run.directory / PAGE_NAME
    write_file_atomically(page, render_page(run, page.resolve().parent))
    logger.info("wrote %s (%d checkpoints, %d prompts)", page, len(run.checkpoints), len(run.prompts))
    return page
