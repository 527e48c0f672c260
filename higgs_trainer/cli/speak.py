"""``higgs-trainer speak``: speak a text with a base model and a saved adapter (no merge) into a WAV and its spectrogram."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..speech.speak import speak


def run(args: argparse.Namespace) -> int:
    """Generate, decode and write ``args.output`` (and ``.png`` beside it); print what was written."""
    result = speak(
        args.base, args.adapter, args.text, args.output, reference=args.reference, reference_text=args.reference_text,
        codec=args.codec, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    record = result.record
    if args.json:
        args.echo(json.dumps({"wav": str(result.wav), "png": str(result.png), "adapter": str(result.adapter),
                              **asdict(record)}, indent=2))  # fmt: skip
        return 0
    flags = f"; flags: {', '.join(record.flags)}" if record.flags else ""
    args.echo(
        f"{result.wav}: {record.seconds:.2f} s, {record.frames} frames, codes sha256 {record.codes_sha256}{flags}"
    )
    args.echo(f"{result.png}: mel spectrogram (adapter {result.adapter}, not merged)")
    return 0
