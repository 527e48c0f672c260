"""The listening page (``OUTPUT_DIR/speech.html``) and ``higgs-trainer listen``, on a run directory as training leaves it."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest

from higgs_trainer.errors import NoSpeechSamplesError
from higgs_trainer.speech.page import write_speech_page
from higgs_trainer.speech.run_samples import read_run
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_speech_runs import PROMPTS, make_run

pytest.importorskip("soundfile")


class _Page(HTMLParser):
    """The elements of a page that matter here: table rows, players, images, and every external reference."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.audio, self.images, self.references, self.scripts = [], [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "checkpoint" in (attrs.get("class") or "").split():
            self.rows.append(attrs)
        if tag == "audio":
            self.audio.append(attrs["src"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link", "iframe", "source", "object", "embed"):
            self.scripts.append((tag, attrs))
        for name in ("src", "href"):
            if name in attrs:
                self.references.append(attrs[name])


def test_page_has_a_row_per_checkpoint_a_cell_per_prompt_and_the_best_marked(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_speech_page(run)
    assert page == run / "speech.html"
    parsed = _Page(page.read_text())
    assert [row["data-checkpoint"] for row in parsed.rows] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [row["class"] for row in parsed.rows] == ["checkpoint", "checkpoint best", "checkpoint"]
    # 3 x 3 samples, one failed in checkpoint-6: 8 players and 8 spectrograms, all relative paths that exist
    assert len(parsed.audio) == 8 and len(parsed.images) == 8
    for reference in parsed.audio + parsed.images:
        assert not os.path.isabs(reference) and (run / unquote(reference)).is_file(), reference
    text = page.read_text()
    for name, prompt in PROMPTS.items():
        assert f"<b>{name}</b>" in text and prompt.replace("'", "&#x27;") in text
    assert 'title="silence: the sample&#x27;s RMS is below the threshold">silence</span>' in text
    assert "failed: RuntimeError: generation failed" in text and "1 degenerate" not in text
    assert "2 degenerate" in text  # checkpoint-6: the silent sample and the failed one
    assert "best checkpoint: <b>checkpoint-4</b> (best_metric 0.25)" in text


def test_page_works_offline_from_disk(tmp_path):
    run = make_run(tmp_path / "run")
    parsed = _Page(write_speech_page(run).read_text())
    assert all(not attrs.get("src") and not attrs.get("href") for _, attrs in parsed.scripts), parsed.scripts
    assert [tag for tag, _ in parsed.scripts] == ["script"]  # one inline script, no stylesheet link
    assert not [r for r in parsed.references if "://" in r or r.startswith("//")], parsed.references
    # the plot is inline SVG: the loss and the three mean scores against the step, the best step marked
    text = (run / "speech.html").read_text()
    assert text.count("<svg") == 2 and text.count("<polyline") == 4 and text.count("best checkpoint</title>") == 2
    for label in ("training loss", "WER", "CER", "similarity"):
        assert f">{label}</text>" in text


def test_page_scores_and_losses_come_from_the_run(tmp_path):
    run = read_run(make_run(tmp_path / "run"))
    by_name = {c.name: c for c in run.checkpoints}
    assert [c.step for c in run.checkpoints] == [2, 4, 6] and run.best_checkpoint == "checkpoint-4"
    assert by_name["checkpoint-4"].metrics == {
        "speech_wer": 0.0,
        "speech_cer": 0.0,
        "speech_similarity": 1.0,
        "speech_degenerate": 0.0,
    }
    assert by_name["checkpoint-6"].metrics["speech_degenerate"] == 2.0
    assert by_name["checkpoint-6"].samples["question"].error.startswith("RuntimeError")
    assert by_name["checkpoint-2"].loss == pytest.approx(
        4.0 / 1.8, abs=1e-3
    )  # the last loss logged at or before step 2
    assert run.loss_history[-1][0] == 6


def test_page_keeps_checkpoints_without_samples_and_with_an_unreadable_record(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "checkpoint-2" / "speech" / "speech.json").write_text("{not json")
    (run / "checkpoint-8").mkdir()
    (run / "checkpoint-8" / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": []}))
    (run / "checkpoint-10").mkdir()  # interrupted while saving (no trainer_state.json): not a checkpoint
    (run / "checkpoint-4" / "speech" / "greeting.wav").unlink()
    text = write_speech_page(run).read_text()
    parsed = _Page(text)
    assert [row["data-checkpoint"] for row in parsed.rows] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert "speech.json cannot be read" in text and "no speech samples in this checkpoint" in text
    assert "WAV file missing" in text and len(parsed.audio) == 4  # checkpoint-4's two, checkpoint-6's two


def test_page_is_replaced_whole_and_lists_the_final_save(tmp_path):
    run = make_run(tmp_path / "run")
    first = write_speech_page(run).read_text()
    make_run(tmp_path / "final-source", steps=(8,), best=None)
    os.rename(tmp_path / "final-source" / "checkpoint-8" / "speech", run / "speech")  # the save at the end of training
    second = write_speech_page(run).read_text()
    assert first != second and sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    rows = [row["data-checkpoint"] for row in _Page(second).rows]
    assert rows == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "final"]


def test_listen_writes_the_page_and_prints_the_same_table(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    code, out, err = run_cli(capsys, "listen", run)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "loss", "greeting", "question", "numbers"]
    assert [line.split()[0] for line in lines[1:4]] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert lines[2].startswith("checkpoint-4 *") and "WER 0.00" in lines[2]
    assert "failed: RuntimeError" in lines[3] and "[silence]" in lines[3]
    assert lines[-1] == f"page: {run / 'speech.html'} (open it in a browser; it needs no server)"
    assert (run / "speech.html").is_file()
    code, out, _ = run_cli(capsys, "listen", run, "--json", "--output", tmp_path / "elsewhere" / "page.html")
    result = json.loads(out)
    assert code == 0 and result["best_checkpoint"] == "checkpoint-4" and len(result["checkpoints"]) == 3
    assert result["checkpoints"][2]["samples"]["numbers"]["flags"] == ["silence"]
    moved = _Page((tmp_path / "elsewhere" / "page.html").read_text())
    assert all((tmp_path / "elsewhere" / unquote(src)).is_file() for src in moved.audio)  # links from where it is


def test_listen_on_a_run_without_samples_says_what_makes_them(tmp_path, capsys):
    run = make_run(tmp_path / "run", samples=False)
    code, out, err = run_cli(capsys, "listen", run)
    assert code == 1 and out == ""
    assert_one_line_error(
        err, "has no speech samples (no checkpoint-N/speech/speech.json): they are written by the speech callback"
    )
    assert not (run / "speech.html").exists()
    code, _, err = run_cli(capsys, "listen", tmp_path / "nowhere")
    assert code == 2
    assert_one_line_error(err, "run directory")
    with pytest.raises(NoSpeechSamplesError, match="higgs-trainer speak"):
        read_run(run)


def test_a_failed_rewrite_leaves_the_previous_page_and_no_temporary_file(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    before = write_speech_page(run).read_text()
    (run / "checkpoint-6" / "speech" / "speech.json").unlink()  # the next page would differ

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_speech_page(run)
    assert (run / "speech.html").read_text() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
