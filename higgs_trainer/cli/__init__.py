"""The ``higgs-trainer`` command line: `main` parses and dispatches, one module runs each command.

Examples:
    >>> main(["--version"])
    higgs-trainer ...
    0
"""

from .main import main

__all__ = ["main"]
