"""``higgs-trainer convert SRC --to LAYOUT -o DIR``: convert adapters or a model between layouts (`convert_layout`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..convert.conversion import convert_layout


def run(args: argparse.Namespace) -> int:
    """Convert ``args.source`` to the ``args.to`` layout in ``args.output`` and say what was written."""
    echo = args.echo
    result = convert_layout(args.source, args.to, args.output, base=args.base, overwrite=args.overwrite)
    if args.json:
        echo(json.dumps(asdict(result), indent=2))
        return 0
    what = "model" if result.kind == "model" else f"{len(result.outputs)} adapter(s)"
    echo(
        f"Converted {what} ({result.num_tensors} tensors, {result.renamed} renamed) from {result.source} to the "
        f"{result.to} layout in {result.path} in {result.seconds:.2f} s"
    )
    for path in result.outputs if result.kind == "adapters" else []:
        echo(f"  {path}")
    if result.concatenated:
        echo(f"  joined boson's split weights into {', '.join(result.concatenated)}")
    if result.skipped:
        echo(f"  skipped {len(result.skipped)} buffer(s) recomputed from the config")
    if result.verified_on_base:
        echo(f"  loads onto {args.base} with zero missing and zero unexpected adapter keys")
    return 0
