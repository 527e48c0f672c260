import logging

import pytest

from tests.testing_models import HIGGS_STACK

# Scripts that torchrun starts (they read sys.argv and start a process group at import): never import them here,
# also not for --doctest-modules (setup.cfg).
collect_ignore = ["distributed"]
if not HIGGS_STACK:  # imports boson_multimodal at module level (its doctests run on the Higgs stack)
    collect_ignore.append("testing_boson_speech.py")


def pytest_report_header(config):
    import peft
    import torch
    import transformers

    stack = "higgs (HiggsAudioModel)" if HIGGS_STACK else "newest (HiggsAudioV2ForConditionalGeneration)"
    return (
        f"stack: {stack}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="higgs_trainer")
