"""Entry point of the ``higgs-trainer`` command, outside the package on purpose.

Importing ``higgs_trainer`` imports torch, transformers and peft, which takes seconds; a Ctrl-C
in that time would end with a long traceback. Here the import itself is guarded, so an
interrupt at any moment ends with one line and exit status 130. Everything else is
``higgs_trainer.cli.main``.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run ``higgs-trainer`` on ``sys.argv[1:]`` and return its exit status."""
    try:
        from higgs_trainer.cli import main as run
    except KeyboardInterrupt:
        print("higgs-trainer: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    raise SystemExit(main())
