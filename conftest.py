"""pytest set-up for every test and for the doctests of higgs_trainer/ (collected with ``--doctest-modules``, see setup.cfg)."""

import functools
import importlib.util
import os
import signal

import pytest
from _pytest.doctest import DoctestItem


def pytest_configure(config):
    """A suite started in the background by a non-interactive shell (``cmd &``, ``nohup``) inherits SIGINT ignored,
    and the commands it runs keep it so, as they should (``higgs_trainer.cli.main``). The tests that send SIGINT need
    it delivered: Python's own handler here, and so the default in every process the tests start."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.cache
def _start_deepspeed_logging_outside_the_examples() -> None:
    """DeepSpeed's logger writes to the ``sys.stdout`` of the moment it is imported, and logs a line when it first
    detects the accelerator; transformers imports it on first use (``Trainer``, ``from_pretrained``). Done inside an
    example, both would land in that example's output, so do it once before the first example runs."""
    if importlib.util.find_spec("deepspeed") is not None:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()


@pytest.fixture(autouse=True)
def _doctests_run_in_an_empty_directory(request, tmp_path, monkeypatch):
    """The examples write relative paths (``out/lora_adapters``, ``base``): each runs in a fresh temporary directory."""
    if isinstance(request.node, DoctestItem):
        _start_deepspeed_logging_outside_the_examples()
        monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _environment_restored_after_each_test():
    """transformers' ``TrainingArguments`` writes its settings into ``os.environ`` (``ACCELERATE_DYNAMO_BACKEND`` for
    ``torch_compile``, ``ACCELERATE_USE_FSDP``, ``ACCELERATE_MIXED_PRECISION``, ...) and never takes them back. Left
    there, they reach every later test and every process it starts: one test's ``torch_compile=True`` once made each
    later torchrun compile its model with inductor (the ZeRO-3 tests ran 3.5x slower, and not as written)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
