"""The listening page in a real browser: headless Chromium (Debian's ``chromium``) opens it from disk.

Skipped where chromium is not installed, except under CI (``CI`` set) or with
``HIGGS_TRAINER_REQUIRE_BROWSER=1``, where its absence fails: the README's test command installs it
(``apt-get install -y chromium``).
"""

from __future__ import annotations

import os

import pytest

from higgs_trainer.speech.page import write_speech_page
from tests.testing_browser import CHROMIUM, check_page, screenshot
from tests.testing_speech_runs import make_run

pytest.importorskip("soundfile")
_REQUIRED = bool(os.environ.get("CI")) or os.environ.get("HIGGS_TRAINER_REQUIRE_BROWSER") == "1"
if CHROMIUM is None and _REQUIRED:
    raise RuntimeError("chromium is required here (CI or HIGGS_TRAINER_REQUIRE_BROWSER=1): apt-get install -y chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def test_page_loads_cleanly_and_every_player_decodes(tmp_path):
    run = make_run(tmp_path / "run")
    found = check_page(write_speech_page(run))
    assert found["problems"] == [] and found["console"] == [] and found["marked"] == []
    assert found["rows"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert len(found["audio"]) == 8 and all(player["state"] == "decoded" for player in found["audio"]), found["audio"]
    durations = {player["src"]: player["duration"] for player in found["audio"]}
    assert durations["checkpoint-2/speech/question.wav"] == pytest.approx(1.3, abs=0.01)  # the file's own length
    assert durations["checkpoint-6/speech/numbers.wav"] == pytest.approx(0.5, abs=0.01)
    assert len(found["images"]) == 8 and all(image["decoded"] for image in found["images"])
    shot = screenshot(run / "speech.html", tmp_path / "page.png", height=600)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_check_sees_a_broken_clip_a_missing_image_and_a_script_error(tmp_path):
    run = make_run(tmp_path / "run", steps=(2, 4))
    page = write_speech_page(run)
    (run / "checkpoint-2" / "speech" / "greeting.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEdata")
    (run / "checkpoint-4" / "speech" / "greeting.png").unlink()
    page.write_text(page.read_text().replace("</body>", "<script>console.error('boom'); missing();</script></body>"))
    found = check_page(page)
    states = {player["src"]: player["state"] for player in found["audio"]}
    assert states["checkpoint-2/speech/greeting.wav"] == "error" and list(states.values()).count("error") == 1
    assert [image["src"] for image in found["images"] if not image["decoded"]] == ["checkpoint-4/speech/greeting.png"]
    problems = " | ".join(found["problems"])
    assert "console.error: boom" in problems and "uncaught: Uncaught ReferenceError: missing is not defined" in problems
    assert "failed to load" in problems and "checkpoint-4/speech/greeting.png" in problems
    assert any("boom" in line for line in found["console"])
    assert found["marked"] == ["cannot play checkpoint-2/speech/greeting.wav"]  # the page tells its reader too
