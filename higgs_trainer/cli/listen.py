"""``higgs-trainer listen RUN``: write the run's listening page (`write_speech_page`) and print its table."""

from __future__ import annotations

import argparse
import json

from ..speech.page import write_speech_page
from ..speech.run_samples import read_run
from ..speech.run_table import format_table


def run(args: argparse.Namespace) -> int:
    """Write ``args.run``'s ``speech.html`` (or ``args.output``) and print the same table of samples."""
    echo = args.echo
    page = write_speech_page(args.run, args.output)
    samples = read_run(args.run)
    if args.json:
        rows = [
            {
                "checkpoint": c.name,
                "step": c.step,
                "loss": c.loss,
                "metrics": c.metrics,
                "samples": {
                    name: {"seconds": s.seconds, "flags": list(s.flags), "error": s.error, "scores": s.scores}
                    for name, s in c.samples.items()
                },
            }
            for c in samples.checkpoints
        ]
        echo(json.dumps({"page": str(page), "best_checkpoint": samples.best_checkpoint, "checkpoints": rows}, indent=2))
        return 0
    echo(format_table(samples))
    echo(f"page: {page} (open it in a browser; it needs no server)")
    return 0
