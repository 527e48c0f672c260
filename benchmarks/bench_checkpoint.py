"""Full vs adapter-only checkpoints of a >=1e9-parameter wrapped model with r=16 LoRA, side by side in one run.

Reports, for one ``checkpoint-N`` written by a real ``HiggsLoraTrainer`` training step:
the time the training loop waits in ``_save_checkpoint`` and the bytes on disk, for a full
checkpoint (the default) and for ``adapter_only_checkpoints=True``; and the share of the full
checkpoint's time taken by the adapter save inside it.

    python benchmarks/bench_checkpoint.py [--shape llama-3.2-1b|llama-3.2-3b|mha-1b] [--targets q_proj,v_proj]

Targets (issue 4): adapter-only at least 50x smaller and 20x faster than full; the adapter save
adds at most 2% to a full checkpoint's time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from higgs_trainer import HiggsLoraTrainer


class Wrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None):
        return {"loss": self.model(input_ids=input_ids, labels=labels).loss}


class TimedTrainer(HiggsLoraTrainer):
    checkpoint_seconds: list[float] = []

    def _save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        result = super()._save_checkpoint(*args, **kwargs)
        self.checkpoint_seconds.append(time.perf_counter() - start)
        return result


# Model shapes (LlamaConfig fields). The adapter-only checkpoint holds the LoRA weights and their two
# fp32 Adam moments, so how much smaller it is than a full one depends on base / LoRA parameters.
SHAPES = {
    # Llama-3.2-1B: the smallest of the family Higgs Audio v2's LLM (Llama-3.2-3B) comes from; GQA.
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    # Llama-3.2-3B: the shape of Higgs Audio v2's text backbone (without its audio DualFFN layers).
    "llama-3.2-3b": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    # A 1.04e9 model without GQA (TinyLlama widths, 18 layers): k/v LoRA as large as q/o, the hardest case.
    "mha-1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
    ),
}  # fmt: skip


def build_model(shape: str, targets: list[str]) -> nn.Module:
    config = transformers.LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    base = base.to_empty(device="cpu").to(torch.bfloat16)
    if config.tie_word_embeddings:
        base.tie_weights()  # to_empty gave the tied head its own storage
    generator = torch.Generator().manual_seed(0)
    for param in base.parameters():
        param.data.normal_(0, 0.02, generator=generator)
    base.model.rotary_emb = type(base.model.rotary_emb)(config=config)  # its buffers are computed, not loaded
    wrapper = Wrapper(base)
    wrapper.model = get_peft_model(wrapper.model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return wrapper


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_checkpoint(wrapper: nn.Module, out: Path, adapter_only: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    TimedTrainer.checkpoint_seconds = []
    ids = torch.randint(0, 32000, (4, 8), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=1, save_steps=1, per_device_train_batch_size=1, report_to=[], use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, learning_rate=1e-4, save_only_model=False,
    )  # fmt: skip
    trainer = TimedTrainer(model=wrapper, args=args, train_dataset=dataset, adapter_only_checkpoints=adapter_only)
    trainer.train()
    checkpoint = out / "checkpoint-1"
    return {
        "seconds": TimedTrainer.checkpoint_seconds[0],
        "bytes": dir_bytes(checkpoint),
        "adapter_seconds": trainer.last_saved_adapter.seconds,
        "adapter_bytes": trainer.last_saved_adapter.num_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b", help="model shape (see SHAPES)")
    parser.add_argument("--out", default="/tmp/bench-checkpoint")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA target modules, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    targets = args.targets.split(",")
    wrapper = build_model(args.shape, targets)
    params = sum(p.numel() for p in wrapper.parameters())
    lora = sum(p.numel() for n, p in wrapper.named_parameters() if "lora_" in n)
    out = Path(args.out)
    full = one_checkpoint(wrapper, out / "full", adapter_only=False)
    adapter_only = one_checkpoint(wrapper, out / "adapter-only", adapter_only=True)
    shutil.rmtree(out, ignore_errors=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "shape": args.shape,
        "parameters": params,
        "lora_targets": targets,
        "lora_parameters": lora,
        "full_checkpoint": full,
        "adapter_only_checkpoint": adapter_only,
        "smaller_x": full["bytes"] / adapter_only["bytes"],
        "faster_x": full["seconds"] / adapter_only["seconds"],
        "adapter_save_share_of_full_checkpoint": full["adapter_seconds"] / full["seconds"],
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{args.shape}: {params / 1e9:.2f}e9 parameters, {lora / 1e6:.1f}M LoRA (r=16 on {'/'.join(targets)})\n"
        f"full checkpoint:         {full['seconds']:7.2f} s  {full['bytes'] / 2**20:10.1f} MiB\n"
        f"adapter-only checkpoint: {adapter_only['seconds']:7.2f} s  {adapter_only['bytes'] / 2**20:10.1f} MiB\n"
        f"adapter-only is {result['smaller_x']:.0f}x smaller and {result['faster_x']:.0f}x faster; "
        f"the adapter save is {100 * result['adapter_save_share_of_full_checkpoint']:.2f}% of a full checkpoint's time"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
