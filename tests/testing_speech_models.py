"""Tiny random scoring models for the speech tests, saved to a directory and loaded as a user's would be.

`save_tiny_whisper` writes a Whisper model (random weights), its feature extractor and a byte-level BPE
tokenizer built here (the 256 byte symbols, no merges, Whisper's special tokens), so
``pipeline("automatic-speech-recognition", model=DIR)`` loads it with nothing downloaded.
`save_tiny_xvector` writes a WavLM x-vector model and its feature extractor for
``AutoModelForAudioXVector``. The transcripts and embeddings are meaningless; the loading and scoring
paths are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table (what byte-level BPE vocabularies hold), as a list indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def save_tiny_whisper(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random Whisper ASR model with its tokenizer and feature extractor into ``directory``."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    files = directory / "tokenizer-source"
    files.mkdir(exist_ok=True)
    (files / "vocab.json").write_text(json.dumps({symbol: i for i, symbol in enumerate(_byte_symbols())}))
    (files / "merges.txt").write_text("#version: 0.2\n")
    end = WHISPER_SPECIALS[0]
    tokenizer = WhisperTokenizer(
        str(files / "vocab.json"), str(files / "merges.txt"), unk_token=end, bos_token=end, eos_token=end, pad_token=end
    )
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    ids = dict(zip(WHISPER_SPECIALS, tokenizer.convert_tokens_to_ids(WHISPER_SPECIALS), strict=True))
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=1500,  # 30 s of 10 ms mel frames, halved by the encoder's stride: Whisper's own
        max_target_positions=32,
        pad_token_id=ids[end],
        bos_token_id=ids[end],
        eos_token_id=ids[end],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    generation = model.generation_config
    generation.max_length = 12
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.lang_to_id = {"<|en|>": ids["<|en|>"]}
    generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    generation.is_multilingual = True
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)
    return directory


def save_tiny_xvector(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random WavLM x-vector (speaker-embedding) model and its feature extractor into ``directory``."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    config = WavLMConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        tdnn_dim=(8, 8),
        tdnn_kernel=(3, 1),
        tdnn_dilation=(1, 1),
        xvector_output_dim=8,
        num_buckets=16,
        max_bucket_distance=64,
    )
    torch.manual_seed(seed)
    WavLMForXVector(config).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(directory)
    return directory


def tone(seconds: float, frequency: float, sample_rate: int, amplitude: float = 0.3) -> np.ndarray:
    """A sine tone with a little noise: a short real signal for a sample or a reference clip."""
    rng = np.random.default_rng(int(frequency))
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = amplitude * np.sin(2 * np.pi * frequency * t) * np.minimum(1.0, 8 * t) + 0.01 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


class LossMirroringScoring:
    """A `SpeechScoring` stand-in whose word error rate rises as the eval loss falls: the issue's story, on demand.

    ``score`` returns ``wer = 10 - eval_loss`` (the eval loss the trainer logged last, just before the callback's
    ``on_evaluate``), so the checkpoint with the best WER is the one with the worst eval loss. It goes through the
    callback like the real scorers (its ``metrics`` and `SampleScores`); the real ones are tested in
    tests/test_speech_scoring.py and once end to end through the callback.
    """

    metrics = ("speech_wer", "speech_degenerate")

    def __init__(self) -> None:
        self.trainer = None  # set once the trainer exists
        self.calls: list[int] = []  # the global step of each score, to count generations

    def score(self, prompt, audio, sample_rate):
        from higgs_trainer.speech.scoring import SampleScores

        state = self.trainer.state
        eval_loss = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry][-1]
        self.calls.append(state.global_step)
        return SampleScores(wer=10.0 - eval_loss, transcript="mirrored")


def assert_best_follows_the_speech_metric(trainer, scoring, output_dir: Path, steps: int) -> str:
    """The trainer kept the checkpoint with the best logged ``eval_speech_wer``, which is not the best eval loss's; its
    adapter is the final one, each checkpoint's speech.json holds its score, and speech.html marks it. Returns it."""
    from safetensors.torch import load_file

    history = trainer.state.log_history
    eval_loss = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    wer = {e["step"]: e["eval_speech_wer"] for e in history if "eval_speech_wer" in e}
    assert sorted(eval_loss) == sorted(wer) == list(range(1, steps + 1))
    best_by_wer, best_by_loss = min(wer, key=wer.get), min(eval_loss, key=eval_loss.get)
    assert best_by_wer != best_by_loss, (eval_loss, wer)  # else the test could not tell them apart
    best = f"checkpoint-{best_by_wer}"
    assert Path(trainer.state.best_model_checkpoint).name == best
    assert trainer.state.best_metric == wer[best_by_wer]
    assert scoring.calls == list(range(1, steps + 1)) + [steps] * (len(scoring.calls) - steps)  # once per save
    for step in range(1, steps + 1):
        record = json.loads((output_dir / f"checkpoint-{step}" / "speech" / "speech.json").read_text())
        assert [s["scores"]["wer"] for s in record["samples"]] == [wer[step]] * len(record["samples"])
    final = load_file(output_dir / "lora_adapters" / "adapter_model.safetensors")
    kept = load_file(output_dir / best / "lora_adapters" / "adapter_model.safetensors")
    last = load_file(output_dir / f"checkpoint-{steps}" / "lora_adapters" / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in kept)
    assert any(not torch.equal(last[k], kept[k]) for k in kept)  # load_best_model_at_end reloaded it
    page = (output_dir / "speech.html").read_text()
    assert f'<tr class="checkpoint best" data-checkpoint="{best}">' in page
    return best
