"""The README's main job, examples/train_higgs_lora.py: the real HiggsAudioModel, ChatMLDatasetSample and HiggsAudioSampleCollator."""

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from higgs_trainer import verify_adapter
from tests.testing_models import HIGGS_STACK, assert_resumed_exactly, final_adapter

pytestmark = pytest.mark.skipif(not HIGGS_STACK, reason="boson_multimodal imports only on the Higgs stack")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_higgs_lora.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_higgs_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_batch(example, n=4):
    samples = example.SyntheticSpeechSamples()
    return example.HiggsAudioTrainingCollator(example.tiny_higgs_model().config)([samples[i] for i in range(n)])


@torch.no_grad()
def losses_of(example, model, batch):
    model.eval()
    text_loss, audio_loss = example.text_and_audio_losses(model(**batch), batch["label_audio_ids"])
    return text_loss.item(), audio_loss.item()


def test_default_run_trains_both_heads_writes_verified_adapters_and_says_how_to_verify_and_merge(
    example, tmp_path, capsys
):
    assert example.main(["--output-dir", str(tmp_path), "--max-steps", "4", "--lora-audio-mlp"]) == 0
    for directory in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        summary = verify_adapter(directory / "lora_adapters")
        assert summary.num_tensors == 40  # 2 layers x (4 attention + 3 text MLP + 3 audio MLP) x (A, B)
        assert any(
            ".audio_mlp." in t for t in load_file(str(directory / "lora_adapters" / "adapter_model.safetensors"))
        )
    out = capsys.readouterr().out
    adapter = tmp_path / "lora_adapters"
    # Speech at every save, through boson's generation and audio tokenizer, and where it is printed.
    for directory in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        record = json.loads((directory / "speech" / "speech.json").read_text())
        assert [s["name"] for s in record["samples"]] == ["prompt0", "prompt1"]
        assert all(s["error"] is None and (directory / "speech" / s["wav"]).is_file() for s in record["samples"])
        assert f"  {directory / 'speech'}: prompt0.wav " in out
    heard = json.loads((tmp_path / "speech" / "speech.json").read_text())["samples"][0]["codes_sha256"]
    (page_line,) = [line for line in out.splitlines() if line.startswith("  listening page")]
    page = Path(page_line.rsplit(": ", 1)[1])  # the page the callback rewrote after each save: one row per save
    assert page == (tmp_path / "speech.html").resolve() and page.read_text().count('<tr class="checkpoint') == 3
    assert f"higgs-trainer verify {tmp_path}" in out
    assert f"higgs-trainer merge --base {tmp_path / 'base_model'} --adapter {adapter}" in out
    # The "Next:" commands run as printed from a new shell: another directory, no virtual environment on PATH.
    shell_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(EXAMPLE.parents[1])}
    for label in ("verify", "merge", "speak"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {label}:")]
        command = line.split(":", 1)[1].strip()
        result = subprocess.run(["bash", "-c", command], cwd="/", env=shell_env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if label == "speak":  # the final adapter, greedy: the codes the final save's callback heard for prompt0
            assert f"codes sha256 {heard}" in result.stdout, result.stdout
    assert (tmp_path.parent / f"{tmp_path.name}-merged" / "config.json").is_file()

    # The final adapter on the saved base: both losses finite and lower than the base's on the training data.
    batch = training_batch(example)
    base = example.HiggsAudioModelWrapper(example.HiggsAudioModel.from_pretrained(tmp_path / "base_model"))
    before = losses_of(example, base, batch)
    after = losses_of(
        example, example.HiggsAudioModelWrapper(PeftModel.from_pretrained(base.model, str(adapter))), batch
    )
    assert all(math.isfinite(x) for x in before + after)
    assert after[0] < before[0] and after[1] < before[1], (before, after)


def test_saved_adapter_reproduces_the_trained_wrappers_text_and_audio_logits(example, tmp_path):
    trainer = example.build_trainer(example.parse_args(["--output-dir", str(tmp_path), "--max-steps", "4"]))
    trainer.train()
    trainer.save_model()
    logged = [log for log in trainer.state.log_history if "text_loss" in log]
    assert logged and all(math.isfinite(log["text_loss"]) and math.isfinite(log["audio_loss"]) for log in logged)
    assert all(log["audio_loss"] > 0 for log in logged)  # the audio head had targets in every batch

    batch = training_batch(example)
    reloaded = example.HiggsAudioModelWrapper(
        PeftModel.from_pretrained(example.tiny_higgs_model(), str(tmp_path / "lora_adapters"))
    ).eval()
    trained = trainer.model.eval()
    with torch.no_grad():
        expected, actual = trained(**batch), reloaded(**batch)
        untrained = example.HiggsAudioModelWrapper(example.tiny_higgs_model()).eval()(**batch)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.audio_logits, expected.audio_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        untrained.audio_logits, expected.audio_logits, atol=1e-4
    )  # training changed the audio head


def test_model_path_and_data_dir_train_a_saved_model_on_jsonl_samples(example, tmp_path):
    example.tiny_higgs_model().save_pretrained(tmp_path / "base")
    data = example.write_example_data(tmp_path / "data", n=4)
    out = tmp_path / "out"
    argv = [
        "--model-path",
        str(tmp_path / "base"),
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
    ]
    assert example.main(argv) == 0
    assert verify_adapter(out / "lora_adapters").num_tensors == 28  # no audio_mlp without --lora-audio-mlp
    assert not (out / "base_model").exists()  # only the tiny default saves its base


def test_data_dir_errors_name_the_file_and_line(example, tmp_path):
    config = example.tiny_higgs_model().config
    data = example.write_example_data(tmp_path / "data", n=2)
    lines = (data / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["audio_codes"] = []
    (data / "samples.jsonl").write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: one audio_codes file is needed per <\|AUDIO_OUT\|> token"):
        example.JsonlSpeechSamples(data, config)


def test_resume_from_an_adapter_only_checkpoint_gives_the_uninterrupted_adapter(example, tmp_path):
    common = ["--max-steps", "4", "--adapter-only-checkpoints"]
    assert example.main(["--output-dir", str(tmp_path / "a"), *common]) == 0
    assert not (tmp_path / "a" / "checkpoint-2" / "model.safetensors").exists()
    resumed = ["--output-dir", str(tmp_path / "b"), "--resume-from-checkpoint", str(tmp_path / "a" / "checkpoint-2")]
    assert example.main([*resumed, *common]) == 0
    assert_resumed_exactly(tmp_path / "b", final_adapter(tmp_path / "a"))


def test_train_audio_head_trains_the_heads_whole_and_the_adapter_reproduces_them(example, tmp_path):
    argv = ["--output-dir", str(tmp_path), "--max-steps", "2", "--train-audio-head", "--lora-audio-mlp"]
    trainer = example.build_trainer(example.parse_args(argv))
    trainer.train()
    trainer.save_model()
    adapter = tmp_path / "lora_adapters"
    summary = verify_adapter(adapter)
    assert summary.modules_to_save == sorted(example.AUDIO_HEAD_MODULES)
    assert summary.num_tensors == 40 + 3  # the LoRA pairs of --lora-audio-mlp, and the three modules whole
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    base = dict(example.tiny_higgs_model().named_parameters())
    for module in example.AUDIO_HEAD_MODULES:
        key = f"base_model.model.{module}.weight"
        assert saved[key].shape == base[f"{module}.weight"].shape
        assert not torch.equal(saved[key], base[f"{module}.weight"]), module  # trained

    batch = training_batch(example)
    reloaded = example.HiggsAudioModelWrapper(
        PeftModel.from_pretrained(example.tiny_higgs_model(), str(adapter))
    ).eval()
    with torch.no_grad():
        expected, actual = trainer.model.eval()(**batch), reloaded(**batch)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.audio_logits, expected.audio_logits, rtol=1e-5, atol=1e-5)
