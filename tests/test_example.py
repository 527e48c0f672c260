"""The README's main job, examples/train_higgs_lora.py, on the real HiggsAudioModel."""

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from higgs_trainer import verify_adapter
from tests.models import HIGGS_STACK

pytestmark = pytest.mark.skipif(not HIGGS_STACK, reason="boson_multimodal imports only on the Higgs stack")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_higgs_lora.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_higgs_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_text_and_audio_and_writes_adapters_that_round_trip(tmp_path, capsys):
    example = load_example()
    assert example.main(["--output-dir", str(tmp_path), "--max-steps", "4", "--lora-audio-mlp"]) == 0
    for directory in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        summary = verify_adapter(directory / "lora_adapters")
        assert summary.num_tensors == 40  # 2 layers x (4 attention + 3 text MLP + 3 audio MLP) x (A, B)
    assert str(tmp_path / "lora_adapters") in capsys.readouterr().out

    batch = example.collate([example.SyntheticSpeechSamples()[i] for i in range(2)])
    base = example.HiggsAudioModelWrapper(example.tiny_higgs_model()).eval()
    adapted = example.HiggsAudioModelWrapper(
        PeftModel.from_pretrained(example.tiny_higgs_model(), str(tmp_path / "lora_adapters"))
    ).eval()
    with torch.no_grad():
        before, after = base(**batch), adapted(**batch)
    for key in ("text_loss", "audio_loss"):
        assert torch.isfinite(after[key]) and torch.isfinite(before[key])
    # training lowered both losses on its own data, and the saved adapter carries that change
    assert after["text_loss"] < before["text_loss"]
    assert after["audio_loss"] < before["audio_loss"]
