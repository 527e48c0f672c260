"""Speech samples: generation time per second of audio, memory sampling adds, and the callback's share of training.

    venv=$(scripts/env.sh newest)
    $venv/bin/python benchmarks/bench_speech.py                 # all three parts, JSON then tables
    $venv/bin/python benchmarks/bench_speech.py --part generate --model higgs-shaped --layers 2 --steps 100

Generation: one prompt generated with the model's own ``generate`` (through `TransformersSpeechBackend`, as the
callback does), held to ``--steps`` steps by a logits processor that forbids the audio end, then decoded by the codec;
seconds of compute per second of audio out, and the peak resident memory above what the process held before
(VmHWM reset through /proc/self/clear_refs), next to the size of the model's weights: what sampling adds is
generation's own (KV cache, activations, the waveform), never a second copy of the model.
Models: ``tiny`` (the demo's: examples/speak_with_adapter.py) and ``higgs-shaped`` (HiggsAudioV2 3B's widths: hidden
3072, 24 heads, 8 KV heads, MLP 8192, vocabulary 128256, 8 codebooks of 1026, at ``--layers`` depth, fp32; a codec of
the Higgs tokenizer's shape: 24 kHz, 25 frames/s, 8 codebooks of 1024, DAC decoder width 1024).

Training share: the demo's run (examples/speak_with_adapter.py settings: 30 steps, a checkpoint every 15, 2 prompts,
the callback's default max_new_tokens) twice in one process, without and with `SpeechSamplesCallback`: train()'s wall
time each, and the seconds the callback spent inside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]


def example():
    spec = importlib.util.spec_from_file_location("speak_with_adapter", ROOT / "examples" / "speak_with_adapter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class NoAudioEnd(transformers.InfNanRemoveLogitsProcessor):
    """Forbids the stream EOS where the delay pattern leaves a choice: generation runs to max_new_tokens."""

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids, scores):
        free = torch.isfinite(scores).sum(-1) > 1
        scores = scores.clone()
        scores[free, self.eos] = -float("inf")
        return scores


def higgs_shaped(layers: int, tokenizer):
    """A HiggsAudioV2 model of the 3B's widths at ``layers`` depth, and a codec of the Higgs tokenizer's shape."""
    codec_config = transformers.HiggsAudioV2TokenizerConfig(
        target_bandwidths=[2.0], sample_rate=24000, codebook_size=1024, codebook_dim=64,
        acoustic_model_config={"encoder_hidden_size": 64, "downsampling_ratios": [8, 5, 4, 2, 3],
                               "decoder_hidden_size": 1024, "upsampling_ratios": [8, 5, 4, 2, 3], "hidden_size": 256},
        semantic_model_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 128},  # used only to encode: small here
    )  # fmt: skip
    codec = transformers.HiggsAudioV2TokenizerModel(codec_config).eval()
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.HiggsAudioV2Config(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
        num_codebooks=codec_config.num_quantizers, codebook_size=1026, audio_stream_bos_id=1024,
        audio_stream_eos_id=1025, audio_token_id=ids("<|AUDIO_OUT|>"), audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.HiggsAudioV2ForConditionalGeneration(config).eval(), codec


def bench_generate(model_name: str, layers: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from higgs_trainer.speech import SpeechPrompt, TransformersSpeechBackend
    from higgs_trainer.speech.sampling import generate_sample, undisturbed

    ex = example()
    torch.manual_seed(0)
    if model_name == "tiny":
        processor = ex.tiny_processor()
        model = transformers.HiggsAudioV2ForConditionalGeneration(ex.tiny_model_config(processor), use_text_head=True)
    else:
        model, codec = higgs_shaped(layers, ex.tiny_tokenizer())
        features = transformers.DacFeatureExtractor(sampling_rate=24000, hop_length=codec.config.hop_length)
        processor = transformers.HiggsAudioV2Processor(
            features, ex.tiny_tokenizer(), codec, audio_stream_bos_id=1024, audio_stream_eos_id=1025
        )
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    backend = TransformersSpeechBackend(processor)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    codec_weights = sum(p.numel() * p.element_size() for p in processor.audio_tokenizer.parameters())
    no_end = transformers.LogitsProcessorList([NoAudioEnd(model.get_base_model().config.audio_stream_eos_id)])
    prompt = SpeechPrompt("bench", ex.PROMPTS["high"])
    with undisturbed(model):  # warm-up: first-call costs (allocator, kernels) are not sampling's
        generate_sample(model, prompt, backend, max_new_tokens=4, logits_processor=no_end)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    with undisturbed(model):
        sample = generate_sample(model, prompt, backend, max_new_tokens=steps, logits_processor=no_end)
    seconds = time.perf_counter() - start
    added = _status_kb("VmHWM") - before
    audio = sample.record.seconds
    return {
        "model": model_name if model_name == "tiny" else f"higgs-shaped, {layers} layers",
        "weights_MiB": round(weights / 2**20, 1),
        "codec_MiB": round(codec_weights / 2**20, 1),
        "steps": steps,
        "frames": sample.record.frames,
        "audio_seconds": audio,
        "wall_seconds": round(seconds, 2),
        "seconds_per_audio_second": round(seconds / audio, 2) if audio else None,
        "memory_added_MiB": round(added / 1024, 1),
    }


def bench_training_share(max_steps: int, save_steps: int, max_new_tokens: int | None) -> dict:
    from higgs_trainer import HiggsLoraTrainer
    from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback

    ex = example()
    transformers.logging.set_verbosity_error()
    results = {}
    for label in ("without callback", "with callback"):
        with tempfile.TemporaryDirectory() as out:
            processor = ex.tiny_processor(ex.tiny_codec(0))
            torch.manual_seed(0)
            base = transformers.HiggsAudioV2ForConditionalGeneration(
                ex.tiny_model_config(processor), use_text_head=True
            )
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "audio_mlp.gate_proj", "audio_mlp.up_proj",
                                                    "audio_mlp.down_proj"], modules_to_save=["audio_lm_head"],
            )  # fmt: skip
            args = transformers.TrainingArguments(
                output_dir=out, max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=2,
                learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=max_steps, report_to=[],
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            )  # fmt: skip
            callbacks = []
            if label == "with callback":
                kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
                callbacks = [SpeechSamplesCallback([SpeechPrompt(n, t) for n, t in ex.PROMPTS.items()], **kwargs)]
            trainer = HiggsLoraTrainer(
                model=ex.HiggsAudioModelWrapper(get_peft_model(base, lora)), args=args, train_dataset=ex.ToneRequests(),
                data_collator=ex.Collator(processor), processing_class=processor, callbacks=callbacks,
            )  # fmt: skip
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
            row = {"train_wall_seconds": round(wall, 2)}
            if callbacks:
                spent = callbacks[0].seconds_spent
                row.update(callback_seconds=round(spent, 2), callback_share_percent=round(100 * spent / wall, 1))
                records = json.loads((Path(out) / f"checkpoint-{max_steps}" / "speech" / "speech.json").read_text())
                row["last_samples"] = {s["name"]: [s["frames"], s["flags"]] for s in records["samples"]}
            results[label] = row
    return {"max_steps": max_steps, "save_steps": save_steps, "max_new_tokens": max_new_tokens or "default", **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "generate", "training"], default="all")
    parser.add_argument("--model", choices=["tiny", "higgs-shaped"], default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="generation steps (default: 128 tiny, 100 higgs)")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=15)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="the callback's (default: its default)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    results = {"torch_threads": torch.get_num_threads()}
    if args.part in ("all", "generate"):
        models = [args.model] if args.model else ["tiny", "higgs-shaped"]
        results["generate"] = [
            bench_generate(m, args.layers, args.steps or (128 if m == "tiny" else 100)) for m in models
        ]
    if args.part in ("all", "training"):
        results["training"] = bench_training_share(args.max_steps, args.save_steps, args.max_new_tokens)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
