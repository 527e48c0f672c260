"""Speech from a LoRA adapter without merging (examples/speak_with_adapter.py, `scripts/demo.sh --stack newest`)."""

import importlib.util
import wave
from pathlib import Path

import pytest
import torch

from higgs_trainer import verify_adapter
from tests.models import HIGGS_STACK

pytestmark = pytest.mark.skipif(HIGGS_STACK, reason="HiggsAudioV2ForConditionalGeneration ships with transformers 5.x")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "speak_with_adapter.py"


def load_example():
    spec = importlib.util.spec_from_file_location("speak_with_adapter", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapter_speaks_a_valid_wav_that_differs_from_the_base(tmp_path):
    example = load_example()
    result = example.run(tmp_path, max_steps=6)
    assert result["wav"] == tmp_path / "speech.wav"
    verify_adapter(tmp_path / "lora_adapters")
    with wave.open(str(result["wav"]), "rb") as handle:
        assert (handle.getnchannels(), handle.getsampwidth(), handle.getframerate()) == (1, 2, example.SAMPLE_RATE)
        frames = handle.getnframes()
        samples = torch.frombuffer(bytearray(handle.readframes(frames)), dtype=torch.int16)
    assert frames > 0 and samples.abs().max() > 0
    # greedy generation from the same prompt: the adapter changes the codes
    assert len(result["codes"]) > 0 and not torch.equal(result["codes"], result["base_codes"])


def test_delay_pattern_round_trips():
    example = load_example()
    codes = torch.randint(0, example.CODES, (7, example.CODEBOOKS))
    delayed = example.with_delay_pattern(codes)
    assert delayed.shape == (7 + 2 + example.CODEBOOKS - 1, example.CODEBOOKS)
    assert torch.equal(example.without_delay_pattern(delayed), codes)
