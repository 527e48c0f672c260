"""Open a page in headless Chromium (Debian's ``chromium`` package) and report what a person opening it would meet.

`check_page` loads a copy of the page, written beside it (so its relative paths hold), with a probe
script first in ``<head>``: it records console errors and warnings, uncaught errors, resources that fail to
load, whether each ``<audio>`` source loads and decodes (``canplaythrough`` and its duration, or the media
error), whether each image decodes, the rows of the samples table, and the notes the page itself shows (``.broken``); it writes the results into the DOM,
which ``chromium --headless --dump-dom`` prints. Console lines Chromium logs on stderr count too.
`screenshot` saves what the page looks like.

Run as a script to make the docs' screenshot from the test run directory:
``python -m tests.testing_browser docs/images/speech-page.png``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

CHROMIUM = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
RESULT_ID = "browser-check-result"
# Runs before the page's own script: collects problems, then waits for every player and image and reports.
_PROBE = """<script>
(function () {
  const problems = [];
  for (const level of ["error", "warn"]) {
    const original = console[level];
    console[level] = function (...args) { problems.push("console." + level + ": " + args.join(" ")); original.apply(console, args); };
  }
  window.addEventListener("error", (event) => {
    const target = event.target;
    if (target && target !== window) problems.push("failed to load " + (target.currentSrc || target.src || target.href));
    else problems.push("uncaught: " + event.message);
  }, true);
  window.addEventListener("unhandledrejection", (event) => problems.push("unhandled rejection: " + event.reason));
  function settle(player) {
    return new Promise((resolve) => {
      const report = (state) => resolve({src: player.getAttribute("src"), state: state, duration: player.duration,
                                          error: player.error ? player.error.code : null});
      if (player.error) return report("error");
      if (player.readyState >= 4) return report("decoded");
      player.addEventListener("canplaythrough", () => report("decoded"), {once: true});
      player.addEventListener("error", () => report("error"), {once: true});
      player.preload = "auto";
      player.load();
    });
  }
  window.addEventListener("load", async () => {
    const audio = await Promise.all(Array.from(document.querySelectorAll("audio")).map(settle));
    const images = Array.from(document.images).map((img) => ({src: img.getAttribute("src"), decoded: img.complete && img.naturalWidth > 0}));
    const rows = Array.from(document.querySelectorAll("#samples tbody tr")).map((row) => row.dataset.checkpoint);
    const marked = Array.from(document.querySelectorAll(".broken")).map((note) => note.textContent);
    const result = document.createElement("pre");
    result.id = "RESULT_ID";
    result.textContent = JSON.stringify({problems: problems, audio: audio, images: images, rows: rows, marked: marked});
    document.body.appendChild(result);
  });
})();
</script>""".replace("RESULT_ID", RESULT_ID)


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        raise FileNotFoundError("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing from an earlier run
        command = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--mute-audio",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def check_page(page: Path, budget_ms: int = 15000) -> dict:
    """Load ``page`` in headless Chromium; return the probe's findings plus ``console``: the page's console lines."""
    page = Path(page).resolve()
    text = page.read_text()
    probed = page.with_name(f".{page.stem}.check-{uuid.uuid4().hex[:8]}.html")
    probed.write_text(re.sub(r"<head>", lambda m: m.group(0) + _PROBE, text, count=1))
    try:
        done = _chromium(f"--virtual-time-budget={budget_ms}", "--dump-dom", probed.as_uri())
    finally:
        probed.unlink()
    found = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', done.stdout, re.S)
    if not found:
        raise AssertionError(
            f"the page never finished loading in chromium (exit {done.returncode}): {done.stderr[-2000:]}"
        )
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return result


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1000) -> Path:
    """Save a ``width`` x ``height`` screenshot of ``page`` to ``png``."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium(
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--virtual-time-budget=5000",
        f"--screenshot={png}",
        Path(page).resolve().as_uri(),
    )
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


def main(argv: list[str]) -> int:
    """Write the screenshot of the test run's page to ``argv[0]`` (default docs/images/speech-page.png)."""
    from higgs_trainer.speech.page import write_speech_page
    from tests.testing_speech_runs import make_run

    target = Path(argv[0] if argv else "docs/images/speech-page.png")
    with tempfile.TemporaryDirectory() as scratch:
        run = make_run(Path(scratch) / "voice-finetune")
        page = write_speech_page(run)
        shot = screenshot(page, target, height=int(os.environ.get("SHOT_HEIGHT", "1000")))
        sys.stdout.write(f"{shot}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
