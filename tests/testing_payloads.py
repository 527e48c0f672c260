"""One malicious pickle for every test that feeds untrusted files to the library: proof that nothing ran."""

from __future__ import annotations

import pathlib


class MaliciousPickle:
    """Unpickles into a call of ``Path.touch(marker)``: ``marker`` exists afterwards only if a load ran its code.

    ``torch.save({"x": MaliciousPickle(tmp_path / "pwned")}, path)`` writes a file that
    ``torch.load(weights_only=True)`` must refuse and the inert-stub reader must read without running.
    """

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)
