"""`higgs-trainer --help` before and after the lazy package (issue 19): wall time and peak memory, side by side.

    python benchmarks/bench_cli_startup.py [--repeat 5] [--before REV]

"Before" is the package as it was when the console script entered through ``higgs_trainer_cli.py``
(``import higgs_trainer`` imported torch, transformers and peft), taken from git at ``REV`` (default:
the last commit that had that file) into a temporary directory; "after" is this checkout. Each run is
a fresh process measured as the other benchmarks here measure theirs (`bench_extract_merge.measure`:
wall time of the whole process, peak RSS), run alternately, ``--repeat`` times each; the medians are
reported, with whether torch and transformers were imported.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

from bench_extract_merge import measure

ROOT = Path(__file__).resolve().parents[1]


def before_revision() -> str:
    """The last commit whose tree has ``higgs_trainer_cli.py`` (the parent of the one that removed it)."""
    removed = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--diff-filter=D", "--", "higgs_trainer_cli.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not removed:
        raise SystemExit("no commit removed higgs_trainer_cli.py in this history; pass --before REV")
    return f"{removed}~1"


def export(revision: str, directory: Path) -> None:
    """``higgs_trainer/`` and ``higgs_trainer_cli.py`` of ``revision`` into ``directory``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "higgs_trainer", "higgs_trainer_cli.py"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")


def child(mode: str, args: list[str]) -> None:
    """Runs in the measured process: ``higgs-trainer ARGS`` the way the console script of ``mode`` enters."""
    if mode == "before":
        sys.path.insert(0, args[0])  # ahead of the editable install of this checkout
        import higgs_trainer_cli

        entry, argv = higgs_trainer_cli.main, args[1:]
        sys.argv[1:] = argv
        call = entry
    else:
        from higgs_trainer.cli import main

        argv = args

        def call() -> int:
            return main(argv)

    with redirect_stdout(io.StringIO()):  # the help text; the result is the last line
        code = call()
    import higgs_trainer

    print(
        json.dumps(
            {
                "exit": code,
                "package": str(Path(higgs_trainer.__file__).parent),
                "torch": "torch" in sys.modules,
                "transformers": "transformers" in sys.modules,
                "modules": len(sys.modules),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--before", help="git revision of the 'before' package (default: the last with higgs_trainer_cli.py)"
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    revision = args.before or before_revision()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export(revision, Path(tmp))
        cases = {
            "before --help": ("before", tmp, "--help"),
            "after --help": ("after", "--help"),
            "before --version": ("before", tmp, "--version"),
            "after --version": ("after", "--version"),
        }
        for _ in range(args.repeat):
            for name, case in cases.items():
                result = measure(case[0], *case[1:], script=__file__)
                expected = tmp if case[0] == "before" else str(ROOT)
                if not result["package"].startswith(expected):
                    raise SystemExit(f"{name} imported higgs_trainer from {result['package']}, not {expected}")
                runs.setdefault(name, []).append(result)
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True)
    print(
        f"before: {revision} ({commit.stdout.strip()}), after: this checkout; medians of {args.repeat} fresh processes"
    )
    print("| command | wall s | peak RSS MiB | modules | torch | transformers |")
    print("|---|---:|---:|---:|---|---|")
    summary = {}
    for name, results in runs.items():
        row = {
            "seconds": statistics.median(r["process_seconds"] for r in results),
            "peak_rss_mib": statistics.median(r["peak_rss_mb"] for r in results),
            "modules": statistics.median(r["modules"] for r in results),
            "torch": results[0]["torch"],
            "transformers": results[0]["transformers"],
        }
        summary[name] = row
        print(
            f"| `higgs-trainer {name.split()[1]}` {name.split()[0]} | {row['seconds']:.2f} | {row['peak_rss_mib']:.0f} | "
            f"{row['modules']:.0f} | {'yes' if row['torch'] else 'no'} | {'yes' if row['transformers'] else 'no'} |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
