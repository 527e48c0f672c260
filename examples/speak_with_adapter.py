"""Hear a LoRA fine-tune while it trains, on transformers 5.x's HiggsAudioV2ForConditionalGeneration.

Everything is tiny, random and local: short tones are the "speech"; transformers' own
``HiggsAudioV2TokenizerModel`` (the Higgs audio codec) and ``HiggsAudioV2Processor`` turn them into
training batches (audio codes in the delay pattern, labels); a tiny ``HiggsAudioV2ForConditionalGeneration``
wrapped like the community scripts' ``HiggsAudioModelWrapper`` is trained with LoRA through
``HiggsLoraTrainer``, and ``SpeechSamplesCallback`` speaks fixed prompts at every checkpoint and at the final
save (``speech/<name>.wav``, ``<name>.png``, ``speech.json``). Then the saved adapter is loaded onto the base
(no merge) as ``higgs-trainer speak`` does, and it speaks the same codes as the last checkpoint's sample.

Run: ``scripts/demo.sh --stack newest [--output-dir DIR] [--max-steps N]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from higgs_trainer import HiggsLoraTrainer
from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback, read_records
from higgs_trainer.speech.callback import DEFAULT_MAX_NEW_TOKENS
from higgs_trainer.speech.speak import speak

SAMPLE_RATE = 24000
CODES = 32  # codes per codebook; the model's codebook_size adds the stream BOS and EOS
STREAM_BOS, STREAM_EOS = CODES, CODES + 1
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "say", "a", "low", "high", "tone", "please"]
SPECIAL = ["<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>", "<|reserved_special_token_6|>"]
PROMPTS = {"low": "say a low tone please", "high": "say a high tone please"}


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level text tokenizer with the Higgs audio special tokens."""
    vocab = {word: i for i, word in enumerate(WORDS + SPECIAL)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=SPECIAL,
    )  # fmt: skip


def tiny_codec(seed: int = 0) -> transformers.HiggsAudioV2TokenizerModel:
    """A tiny random Higgs audio codec (HiggsAudioV2TokenizerModel): 24 kHz, 4 codebooks of 32 codes, 50 frames/s."""
    config = transformers.HiggsAudioV2TokenizerConfig(
        target_bandwidths=[1.0], sample_rate=SAMPLE_RATE, codebook_size=CODES, codebook_dim=8,
        acoustic_model_config={"encoder_hidden_size": 4, "downsampling_ratios": [8, 6, 10], "decoder_hidden_size": 16,
                               "upsampling_ratios": [10, 6, 8], "hidden_size": 16},
        semantic_model_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 32, "conv_dim": [8] * 7, "num_conv_pos_embeddings": 16,
                               "num_conv_pos_embedding_groups": 2},
    )  # fmt: skip
    torch.manual_seed(seed)
    codec = transformers.HiggsAudioV2TokenizerModel(config).eval()
    with torch.no_grad():  # the codebooks start at zero (they are loaded from a checkpoint): random ones here, at
        for layer in codec.quantizer.quantizers:  # the scale of the encoder's output, so different audio, other codes
            layer.codebook.embed.normal_(std=0.01)
    return codec


def tiny_processor(codec: transformers.HiggsAudioV2TokenizerModel | None = None) -> transformers.HiggsAudioV2Processor:
    """HiggsAudioV2Processor over the tiny tokenizer and codec."""
    codec = codec if codec is not None else tiny_codec()
    features = transformers.DacFeatureExtractor(sampling_rate=SAMPLE_RATE, hop_length=codec.config.hop_length)
    return transformers.HiggsAudioV2Processor(
        features, tiny_tokenizer(), codec, audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS
    )


def tiny_model_config(processor: transformers.HiggsAudioV2Processor) -> transformers.HiggsAudioV2Config:
    ids = processor.tokenizer.convert_tokens_to_ids
    return transformers.HiggsAudioV2Config(
        vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        num_codebooks=processor.audio_tokenizer.config.num_quantizers, codebook_size=CODES + 2,
        audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS, audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"), audio_delay_token_id=ids("<|reserved_special_token_6|>"),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )  # fmt: skip


def save_base(directory: Path, model: nn.Module, processor: transformers.HiggsAudioV2Processor) -> None:
    """The base as ``higgs-trainer speak --base`` reads it: model, tokenizer and processor files, codec in audio_tokenizer/."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    processor.audio_tokenizer.save_pretrained(directory / "audio_tokenizer")


def tone(pitch: str, seconds: float = 0.2) -> np.ndarray:
    """A locally generated tone: the training 'speech'."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * math.pi * (180.0 if pitch == "low" else 720.0) * t)).astype(np.float32)


class ToneRequests(torch.utils.data.Dataset):
    """(prompt text, tone) pairs; `Collator` turns a batch into model inputs with HiggsAudioV2Processor."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
        pitch = list(PROMPTS)[i % len(PROMPTS)]
        return PROMPTS[pitch], tone(pitch)


class Collator:
    """``processor(text, audio, output_labels=True)``: text with the audio placeholder, codes in the delay pattern."""

    def __init__(self, processor: transformers.HiggsAudioV2Processor):
        self.processor = processor

    def __call__(self, items: list[tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        p = self.processor
        texts = [f"{text} {p.audio_bos_token}{p.audio_token}{p.audio_eos_token}" for text, _ in items]
        batch = dict(p(text=texts, audio=[audio for _, audio in items], output_labels=True, return_tensors="pt"))
        # output_labels=True masks every stream EOS (-100): a model trained on that never learns to end its audio
        # (the callback flags it `runaway`). Teach the end: the first stream EOS of each codebook is a label.
        eos = batch["audio_input_ids"] == p.audio_stream_eos_id
        first_eos = eos & (eos.cumsum(dim=1) == 1)
        batch["audio_labels"][first_eos] = p.audio_stream_eos_id
        return batch


class HiggsAudioModelWrapper(nn.Module):
    """The community scripts' pattern: a plain module whose ``.model`` becomes the PeftModel; the model computes its loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}


def run(
    output_dir: str | Path, max_steps: int = 30, seed: int = 0, save_steps: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict:  # fmt: skip
    """Train with speech samples at every save, then speak from the saved adapter; returns paths and hashes."""
    output_dir = Path(output_dir)
    processor = tiny_processor(tiny_codec(seed))
    torch.manual_seed(seed)
    base = transformers.HiggsAudioV2ForConditionalGeneration(tiny_model_config(processor), use_text_head=True)
    save_base(output_dir / "base_model", base, processor)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj"],
        modules_to_save=["audio_lm_head"],  # the audio head trained whole: the tiny model learns the tones and their end
    )  # fmt: skip
    wrapper = HiggsAudioModelWrapper(get_peft_model(base, lora))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=save_steps or max(1, max_steps // 2),
        per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=max(1, max_steps // 3), report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    speech = SpeechSamplesCallback(
        [SpeechPrompt(name, text) for name, text in PROMPTS.items()], max_new_tokens=max_new_tokens
    )
    trainer = HiggsLoraTrainer(
        model=wrapper, args=args, train_dataset=ToneRequests(), data_collator=Collator(processor),
        processing_class=processor, callbacks=[speech],
    )  # fmt: skip
    trainer.train()
    trainer.save_model()  # the final lora_adapters/ and speech/ (each checkpoint-N has its own)

    last = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    heard = {s["name"]: s for s in read_records(last / "speech" / "speech.json")["samples"]}
    spoken = speak(
        output_dir / "base_model", last, PROMPTS["high"], output_dir / "speak" / "high.wav",
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    return {
        "run": output_dir,
        "speech_dirs": sorted(output_dir.glob("checkpoint-*/speech")) + [output_dir / "speech"],
        "last_checkpoint": last,
        "checkpoint_sha": heard["high"]["codes_sha256"],
        "spoken": spoken,
        "seconds_sampling": speech.seconds_spent,
        "page": output_dir / "speech.html",  # rewritten by the callback after each save
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/tiny-higgs-v2-speech")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="length limit of a sample")
    args = parser.parse_args(argv)
    result = run(args.output_dir, args.max_steps, args.seed, max_new_tokens=args.max_new_tokens)
    print("Speech samples (WAV, mel-spectrogram PNG, speech.json) at every save:")
    for directory in result["speech_dirs"]:
        records = read_records(directory / "speech.json")["samples"]
        listed = ", ".join(
            f"{r['name']}.wav {r['seconds']:.2f}s{' ' + ','.join(r['flags']) if r['flags'] else ''}" for r in records
        )
        print(f"  {directory}: {listed}")
    print(f"Listening page (every checkpoint side by side, opens from disk): {result['page']}")
    spoken = result["spoken"]
    same = spoken.record.codes_sha256 == result["checkpoint_sha"]
    print(f"Spoken from {spoken.adapter} (base + adapter, not merged) -> {spoken.wav}")
    print(f"  same codes as {result['last_checkpoint'].name}/speech/high.wav: {same}")
    print(f"Listen: higgs-trainer speak --base {result['run']}/base_model --adapter {result['last_checkpoint']} "
          f'--text "{PROMPTS["low"]}" --output low.wav --max-new-tokens {args.max_new_tokens}')  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
