"""``higgs-trainer verify PATH...``: check adapters by their content (`inspect_path`) and print a line for each."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..errors import UsageError
from ..files.atomic import find_directory
from ..files.paths import existing_directory
from ..files.sizes import human_size
from ..merge.base_model import empty_base_model
from ..verification.inspection import AdapterSummary, inspect_path


def run(args: argparse.Namespace) -> int:
    """Verify every adapter each of ``args.paths`` stands for; 0 when all pass, 1 when any fails."""
    echo = args.echo
    for path in args.paths:
        if not find_directory(path).exists():
            raise UsageError(f"{path} does not exist")
    base_model = empty_base_model(existing_directory(args.base, "base model")) if args.base else None
    summaries = [summary for path in args.paths for summary in inspect_path(path, base_model)]
    failed = [s for s in summaries if not s.ok]
    if args.json:
        results = [dict(asdict(s), ok=s.ok) for s in summaries]
        echo(json.dumps({"ok": not failed, "base": args.base, "results": results}, indent=2))
    else:
        for summary in summaries:
            echo(summary_line(summary))
            for problem in summary.problems:
                echo(f"  - {problem}")
        echo(f"{len(summaries) - len(failed)} passed, {len(failed)} failed")
    if failed:
        args.complain(f"{len(failed)} of {len(summaries)} adapter(s) failed verification")
        return 1
    return 0


def summary_line(summary: AdapterSummary) -> str:
    """One line for a verified adapter: ``PASS path: ...`` or ``FAIL path``."""
    if not summary.ok:
        return f"FAIL {summary.path}"
    targets = ", ".join(summary.target_modules)
    saved = f"; modules_to_save {', '.join(summary.modules_to_save)}" if summary.modules_to_save else ""
    return (
        f"PASS {summary.path}: {summary.num_tensors} tensors, {summary.num_parameters:,} parameters, "
        f"{human_size(summary.num_bytes)}; r={summary.r}, lora_alpha={summary.lora_alpha}; targets {targets}{saved}"
    )
