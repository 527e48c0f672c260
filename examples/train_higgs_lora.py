"""Tiny real Higgs Audio v2 LoRA training on CPU with HiggsLoraTrainer (the README's main job).

With no arguments: builds a tiny random ``HiggsAudioModel`` (DualFFN, 2 layers, hidden 64),
wraps it the way the community ``trainer.py`` does (a plain ``nn.Module`` whose ``.model``
becomes the ``PeftModel``), trains a few steps on synthetic samples that carry both text
and audio-out codes (so the text and the audio heads are both trained), and prints where
the adapters are and what they hold.

    python examples/train_higgs_lora.py --output-dir output/tiny-higgs-lora
    python examples/train_higgs_lora.py --lora-audio-mlp   # also adapt the DualFFN audio path
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import TrainingArguments

from higgs_trainer import HiggsLoraTrainer, inspect_adapter

AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS = 252, 251, 253
CODEBOOKS, CODEBOOK_SIZE = 4, 32
STREAM_BOS, STREAM_EOS = CODEBOOK_SIZE, CODEBOOK_SIZE + 1


def tiny_higgs_model(seed: int = 0) -> HiggsAudioModel:
    """A random HiggsAudioModel small enough to train on a CPU in seconds."""
    torch.manual_seed(seed)
    config = HiggsAudioConfig(
        text_config=dict(
            model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        ),
        audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[0, 1], audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128, skip_audio_tower=True, audio_num_codebooks=CODEBOOKS,
        audio_codebook_size=CODEBOOK_SIZE, audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS,
        audio_in_token_idx=250, audio_out_token_idx=AUDIO_OUT, audio_out_bos_token_id=AUDIO_OUT_BOS,
        audio_eos_token_id=AUDIO_EOS, pad_token_id=0,
    )  # fmt: skip
    return HiggsAudioModel(config)


class HiggsAudioModelWrapper(nn.Module):
    """The community scripts' wrapper: ``.model`` is the HiggsAudioModel; forward returns text + audio loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, input_ids, attention_mask, label_ids, audio_out_ids, audio_out_ids_start,
                audio_out_ids_start_group_loc, label_audio_ids):  # fmt: skip
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, label_ids=label_ids, audio_out_ids=audio_out_ids,
            audio_out_ids_start=audio_out_ids_start, audio_out_ids_start_group_loc=audio_out_ids_start_group_loc,
            label_audio_ids=label_audio_ids,
        )  # fmt: skip
        logits, labels = out.logits, out.expanded_labels
        text_loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        audio_logits = out.audio_logits  # (audio_len, codebooks, codebook_size + 2)
        audio_loss = nn.functional.cross_entropy(
            audio_logits.reshape(-1, audio_logits.shape[-1]).float(), label_audio_ids.T.reshape(-1)
        )
        return {"loss": text_loss + audio_loss, "text_loss": text_loss, "audio_loss": audio_loss, "logits": logits}


class SyntheticSpeechSamples(torch.utils.data.Dataset):
    """Text prompt, then one audio-out segment of codes, then text: the layout of a Higgs TTS sample."""

    def __init__(self, n: int = 16, text_len: int = 16, audio_len: int = 6, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 240, (n, text_len), generator=gen)
        self.ids[:, 5], self.ids[:, 6], self.ids[:, 7] = AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS
        self.codes = torch.randint(0, CODEBOOK_SIZE, (n, CODEBOOKS, audio_len), generator=gen)
        self.codes[:, :, 0], self.codes[:, :, -1] = STREAM_BOS, STREAM_EOS

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:5] = -100  # the prompt is not learned
        return {"input_ids": self.ids[i], "label_ids": labels, "audio_codes": self.codes[i]}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch samples the way HiggsAudioSampleCollator lays out audio-out codes (concatenated along time)."""
    codes = [s["audio_codes"] for s in samples]
    starts = torch.tensor([0] + [c.shape[1] for c in codes[:-1]]).cumsum(0)
    input_ids = torch.stack([s["input_ids"] for s in samples])
    audio = torch.cat(codes, dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "label_ids": torch.stack([s["label_ids"] for s in samples]),
        "audio_out_ids": audio,
        "audio_out_ids_start": starts,
        "audio_out_ids_start_group_loc": torch.arange(len(samples)),
        "label_audio_ids": audio,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/tiny-higgs-lora")
    parser.add_argument("--model-path", help="a real Higgs Audio v2 checkpoint directory (default: tiny random model)")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-audio-mlp", action="store_true", help="also put LoRA on the DualFFN audio_mlp")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("higgs_trainer").setLevel(logging.INFO)

    if args.model_path:
        base = HiggsAudioModel.from_pretrained(args.model_path, torch_dtype=torch.bfloat16)
    else:
        base = tiny_higgs_model()
    # Text-path MLPs (layers.N.mlp.*) and the DualFFN audio path (layers.N.audio_mlp.*) share leaf names,
    # so a regex over full module names picks them; the audio path only when asked.
    audio_path = r"|audio_mlp\.(gate|up|down)_proj" if args.lora_audio_mlp else ""
    pattern = r".*\.(self_attn\.(q|k|v|o)_proj|(?<!audio_)mlp\.(gate|up|down)_proj" + audio_path + ")"
    wrapper = HiggsAudioModelWrapper(base)
    wrapper.model = get_peft_model(
        wrapper.model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=pattern)
    )

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps,
        per_device_train_batch_size=2, learning_rate=5e-3, logging_steps=2, report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = HiggsLoraTrainer(
        model=wrapper, args=training_args, train_dataset=SyntheticSpeechSamples(), data_collator=collate
    )
    trainer.train()
    trainer.save_model()

    out = Path(args.output_dir)
    print(f"\nLoRA adapters of {out}:")
    for directory in sorted(out.glob("checkpoint-*/lora_adapters"), key=lambda p: int(p.parent.name.split("-")[1])) + [
        out / "lora_adapters"
    ]:
        s = inspect_adapter(directory)
        status = "ok" if s.ok else "FAILED: " + "; ".join(s.problems)
        print(
            f"  {directory}: {s.num_tensors} tensors, {s.num_parameters} parameters, "
            f"{s.num_bytes} bytes, r={s.r}, alpha={s.lora_alpha} [{status}]"
        )
    print(f"\nLoad it with: PeftModel.from_pretrained(HiggsAudioModel(...), '{out / 'lora_adapters'}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
