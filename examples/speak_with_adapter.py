"""Speech from a LoRA adapter without merging, on transformers 5.x's HiggsAudioV2ForConditionalGeneration.

Everything is tiny, random and local: short tones are generated, encoded to audio codes by a codec,
laid out as HiggsAudioV2Processor lays out audio (stream bos/eos tokens and the delay pattern across
codebooks), and a tiny HiggsAudioV2ForConditionalGeneration wrapped like the community scripts'
``HiggsAudioModelWrapper`` is trained with LoRA through ``HiggsLoraTrainer``. Then the base and
``lora_adapters/`` are loaded with ``PeftModel.from_pretrained``, audio codes are generated, decoded
by the codec, and written to a WAV file.

The codec is transformers' ``DacModel`` (the acoustic codec inside ``HiggsAudioV2TokenizerModel``):
``HiggsAudioV2TokenizerModel``, and with it ``HiggsAudioV2Processor``, needs torchaudio, which has no
build for this stack's torch (2.13, CPU). With torchaudio installed, ``processor(text, audio,
output_labels=True)`` gives the same batches and ``processor.decode(codes)`` the waveform.

Run: ``scripts/demo.sh --stack newest [--output-dir DIR] [--max-steps N]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import wave
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from higgs_trainer import HiggsLoraTrainer

SAMPLE_RATE = 24000
CODEBOOKS, CODES = 4, 32  # codes per codebook; the model's codebook_size adds the two stream tokens
STREAM_BOS, STREAM_EOS = CODES, CODES + 1
WORDS = ["<pad>", "<bos>", "<eos>", "say", "a", "low", "high", "tone", "please"]
SPECIAL = {"<|AUDIO_OUT|>": 251, "<|audio_out_bos|>": 252, "<|audio_eos|>": 253, "<|reserved_special_token_6|>": 254}
VOCAB = 256
PROMPTS = {"low": "say a low tone please", "high": "say a high tone please"}


def token_ids(text: str) -> list[int]:
    """Word ids of ``text`` (the tiny vocabulary: WORDS then the special tokens at their Higgs-like ids)."""
    ids = []
    for word in text.split():
        ids.append(SPECIAL[word] if word in SPECIAL else WORDS.index(word))
    return ids


def tiny_codec() -> transformers.DacModel:
    """A tiny random DAC codec: 24 kHz, 4 codebooks of 32 codes, 50 frames a second."""
    torch.manual_seed(0)
    config = transformers.DacConfig(
        encoder_hidden_size=4, downsampling_ratios=[8, 6, 10], decoder_hidden_size=16, upsampling_ratios=[10, 6, 8],
        n_codebooks=CODEBOOKS, codebook_size=CODES, codebook_dim=4, hidden_size=16, sampling_rate=SAMPLE_RATE,
    )  # fmt: skip
    return transformers.DacModel(config).eval()


def tiny_model_config() -> transformers.HiggsAudioV2Config:
    return transformers.HiggsAudioV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_codebooks=CODEBOOKS,
        codebook_size=CODES + 2, audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS,
        audio_token_id=SPECIAL["<|AUDIO_OUT|>"], audio_bos_token_id=SPECIAL["<|audio_out_bos|>"],
        audio_delay_token_id=SPECIAL["<|reserved_special_token_6|>"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


def tone(pitch: str, seconds: float = 0.2) -> torch.Tensor:
    """A locally generated tone: the training 'speech'."""
    t = torch.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return 0.5 * torch.sin(2 * math.pi * (180.0 if pitch == "low" else 720.0) * t)


def with_delay_pattern(codes: torch.Tensor) -> torch.Tensor:
    """(frames, codebooks) codes framed by stream bos/eos, codebook k delayed by k frames (HiggsAudioV2Processor's layout)."""
    frames = codes.shape[0] + 2 + CODEBOOKS - 1
    out = torch.empty(frames, CODEBOOKS, dtype=torch.long)
    for k in range(CODEBOOKS):
        column = torch.cat([torch.tensor([STREAM_BOS]), codes[:, k], torch.tensor([STREAM_EOS])])
        out[:, k] = torch.cat([torch.full((k,), STREAM_BOS), column, torch.full((CODEBOOKS - 1 - k,), STREAM_EOS)])
    return out


def without_delay_pattern(sequence: torch.Tensor) -> torch.Tensor:
    """Generated (frames, codebooks) codes back to aligned codes: the frames between stream bos and eos."""
    length = sequence.shape[0] - (CODEBOOKS - 1)
    aligned = torch.stack([sequence[k : k + length, k] for k in range(CODEBOOKS)], dim=1)
    keep = (aligned != STREAM_BOS).all(-1) & (aligned != STREAM_EOS).all(-1)
    return aligned[keep].clamp(0, CODES - 1)


class SpeechExamples(torch.utils.data.Dataset):
    """Prompt, then the tone's codes as audio tokens, as HiggsAudioV2Processor(output_labels=True) builds them."""

    def __init__(self, codec: transformers.DacModel):
        self.items = []
        for pitch, prompt in PROMPTS.items():
            with torch.no_grad():
                codes = codec.encode(tone(pitch)[None, None]).audio_codes[0].T  # (frames, codebooks)
            audio = with_delay_pattern(codes)
            frames = audio.shape[0]
            text = token_ids(prompt) + [SPECIAL["<|audio_out_bos|>"]]
            ids = text + [SPECIAL["<|AUDIO_OUT|>"]] * (frames - CODEBOOKS + 1)
            ids += [SPECIAL["<|reserved_special_token_6|>"]] * (CODEBOOKS - 1) + [SPECIAL["<|audio_eos|>"], 2]
            labels = torch.tensor(ids)
            labels[len(text) - 1 : len(text) + frames] = -100  # audio positions: scored by audio_labels
            audio_labels = audio.clone()
            audio_labels[(audio_labels == STREAM_BOS) | (audio_labels == STREAM_EOS)] = -100
            self.items.append(
                {
                    "input_ids": torch.tensor(ids),
                    "attention_mask": torch.ones(len(ids), dtype=torch.long),
                    "labels": labels,
                    "audio_input_ids": audio,
                    "audio_input_ids_mask": torch.ones(frames, dtype=torch.bool),
                    "audio_labels": audio_labels,
                }
            )

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i):
        return self.items[i % len(self.items)]


class HiggsAudioModelWrapper(nn.Module):
    """The community scripts' pattern: a plain module whose ``.model`` becomes the PeftModel; the model computes its loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}


@torch.no_grad()
def generate_codes(model: nn.Module, prompt: str, max_new_tokens: int = 24) -> torch.Tensor:
    """Greedy audio codes (frames, codebooks) for ``prompt``, aligned (delay pattern undone)."""
    ids = torch.tensor([token_ids(prompt) + [SPECIAL["<|audio_out_bos|>"]]])
    model.eval()
    sequence = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return without_delay_pattern(sequence[0])


def write_wav(path: Path, waveform: torch.Tensor) -> None:
    """16-bit mono PCM WAV (the standard library's wave module)."""
    samples = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.numpy().tobytes())


def run(output_dir: str | Path, max_steps: int = 30, seed: int = 0) -> dict:
    """Train, save adapters, reload base + adapter, generate and decode; returns the paths and codes."""
    output_dir = Path(output_dir)
    codec = tiny_codec()
    torch.manual_seed(seed)
    base = transformers.HiggsAudioV2ForConditionalGeneration(tiny_model_config(), use_text_head=True)
    base.save_pretrained(output_dir / "base_model")
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj"],
    )  # fmt: skip
    wrapper = HiggsAudioModelWrapper(get_peft_model(base, lora))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=max(1, max_steps // 2), per_device_train_batch_size=2,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=max(1, max_steps // 3), report_to=[],
        use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    trainer = HiggsLoraTrainer(model=wrapper, args=args, train_dataset=SpeechExamples(codec))
    trainer.train()
    trainer.save_model()  # the final lora_adapters/ (each checkpoint-N has its own)

    fresh = transformers.HiggsAudioV2ForConditionalGeneration.from_pretrained(str(output_dir / "base_model"))
    base_codes = generate_codes(fresh, PROMPTS["high"])
    with_adapter = PeftModel.from_pretrained(fresh, str(output_dir / "lora_adapters"))
    codes = generate_codes(with_adapter, PROMPTS["high"])
    if not len(codes):
        raise RuntimeError("the model generated no audio frame between stream bos and eos")
    with torch.no_grad():
        waveform = codec.decode(audio_codes=codes.T[None]).audio_values[0]
    wav = output_dir / "speech.wav"
    write_wav(wav, waveform)
    return {"wav": wav, "codes": codes, "base_codes": base_codes, "adapter": output_dir / "lora_adapters"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/tiny-higgs-v2-speech")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.output_dir, args.max_steps, args.seed)
    frames = len(result["codes"])
    print(f"LoRA adapter: {result['adapter']} (loaded with PeftModel.from_pretrained onto the base, not merged)")
    print(f"Generated {frames} audio frames with the adapter -> {result['wav']}")
    print(f"  the base alone generates other codes: {not torch.equal(result['codes'], result['base_codes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
