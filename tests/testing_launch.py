"""Run a script under real ``torchrun`` (2 CPU processes, gloo) from a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None) -> str:
    """Run ``tests/distributed/<script>`` on ``nproc`` processes; return its output, fail the test on a non-zero exit."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(ROOT / "tests" / "distributed" / script), *map(str, args),
    ]  # fmt: skip
    # DeepSpeed JIT-builds its CPU shared-memory op on first use (about a minute on 2 cores) into torch's extension
    # cache; one cache per environment, so that the two stacks' suites do not rebuild it for each other.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": extensions}
    full_env.update(env or {})
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} failed (exit {result.returncode}):\n{output[-6000:]}"
    return output
