"""Higgs Audio v2 LoRA training with transformers.Trainer and higgs_trainer (the README's main job).

Uses the library the way a Higgs Audio training script does: a plain ``nn.Module`` wrapper whose
``.model`` becomes the ``PeftModel`` (``get_peft_model``), a trainer with the DualFFN model's
text + audio loss (``LoraAdapterSavingMixin`` on ``transformers.Trainer``), and boson_multimodal's
own data path: every sample is a ``ChatMLDatasetSample`` and batches come from
``HiggsAudioSampleCollator``. Every ``checkpoint-N`` and the final output get a verified
``lora_adapters/``.

With no arguments: a tiny random ``HiggsAudioModel`` (DualFFN, 2 layers, hidden 64) on CPU, trained
for a few steps on synthetic samples that carry text and audio-out codes, so the text head and the
audio head are both trained (a few seconds). The tiny base is saved to ``OUTPUT_DIR/base_model`` so
that the merge command printed at the end runs as printed.

    python examples/train_higgs_lora.py --output-dir output/tiny-higgs-lora
    python examples/train_higgs_lora.py --lora-audio-mlp          # also adapt the DualFFN audio path
    python examples/train_higgs_lora.py --train-audio-head        # also train the heads whole (modules_to_save)

With ``--model-path`` (a local Higgs Audio v2 checkpoint directory) and ``--data-dir``, it trains the
real model on your data:

    python examples/train_higgs_lora.py --model-path /models/higgs-audio-v2-generation-3B-base \\
        --data-dir data/my-voice --output-dir output/my-voice --max-steps 2000 --save-steps 500

Data directory format (``--data-dir``): pre-tokenized samples, nothing is tokenized here.

* Every ``*.jsonl`` file in the directory (sorted by name), one JSON object per line:
  ``{"input_ids": [...], "label_ids": [...], "audio_codes": ["codes/0001.npy"]}``.
* ``input_ids``: the sample's text tokens (ChatML, tokenized with the model's text tokenizer), with
  one ``<|AUDIO_OUT|>`` token (``config.audio_out_token_idx``) where each audio-out segment goes,
  usually as ``<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>``.
* ``label_ids`` (optional, default: ``input_ids``): same length, ``-100`` where nothing is learned
  (the prompt). An audio segment is learned when the label at its ``<|AUDIO_OUT|>`` token is not
  ``-100`` (that is how ``HiggsAudioSampleCollator`` marks trained audio).
* ``audio_codes``: one file per ``<|AUDIO_OUT|>`` token, in order, path relative to the JSONL file:
  a ``.npy`` (read with ``allow_pickle=False``) or ``.pt`` (read with ``weights_only=True``) integer
  array of shape ``(num_codebooks, frames)``: the raw codes of the Higgs audio tokenizer
  (``audio_tokenizer.encode(wav)``), without stream BOS/EOS (the collator adds them).
* Not covered by this format: reference audio given as audio-in (voice cloning with Whisper
  features). ``write_example_data()`` below writes a small directory in this format.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import string
import sys
from pathlib import Path

import numpy as np
import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoTokenizer, HubertConfig, HubertModel, PreTrainedTokenizerFast, Trainer, TrainingArguments

from higgs_trainer import LoraAdapterSavingMixin, inspect_adapter
from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback, read_records
from higgs_trainer.speech.boson_backend import (
    BosonSpeechBackend,
    audio_tokenizer_from_config,
    load_audio_tokenizer,
    save_audio_tokenizer,
)

logger = logging.getLogger("train_higgs_lora")

# Special tokens of the tiny model (the real model's are in its config: audio_out_token_idx, ...).
AUDIO_IN, AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS = 250, 251, 252, 253
CODEBOOKS, CODEBOOK_SIZE = 4, 32
STREAM_BOS, STREAM_EOS = CODEBOOK_SIZE, CODEBOOK_SIZE + 1  # the audio head predicts CODEBOOK_SIZE + 2 classes
# The batch fields of HiggsAudioBatchInput this example feeds to HiggsAudioModel.forward.
BATCH_FIELDS = (
    "input_ids",
    "attention_mask",
    "audio_out_ids",
    "audio_out_ids_start",
    "audio_out_ids_start_group_loc",
    "label_ids",
    "label_audio_ids",
)


# Heard at every save (--speech-prompt replaces them); the tiny model is random, so its samples are flagged.
SPEECH_PROMPTS = ["Hello there.", "Good morning."]
# boson's text special tokens at the tiny model's ids (the real model's tokenizer has them).
SPECIAL_IDS = {
    "<|pad|>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "[UNK]": 3, "<|start_header_id|>": 240,
    "<|end_header_id|>": 241, "<|eot_id|>": 242, "<|AUDIO|>": AUDIO_IN, "<|AUDIO_OUT|>": AUDIO_OUT,
    "<|audio_out_bos|>": AUDIO_OUT_BOS, "<|audio_eos|>": AUDIO_EOS,
}  # fmt: skip
# boson's HiggsAudioTokenizer keywords for a tiny codec: 16 kHz, 4 codebooks of 32 codes, 50 frames a second.
TINY_CODEC = dict(
    D=8, ratios=[4, 4, 4, 5], sample_rate=16000, bins=CODEBOOK_SIZE, n_q=CODEBOOKS, codebook_dim=8,
    semantic_techer="hubert_base", semantic_sample_rate=16000,
)  # fmt: skip


# --- the model ---------------------------------------------------------------------------------


def tiny_higgs_model(seed: int = 0) -> HiggsAudioModel:
    """A random HiggsAudioModel (DualFFN on both layers) small enough to train on a CPU in seconds."""
    torch.manual_seed(seed)
    config = HiggsAudioConfig(
        text_config=dict(
            model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        ),
        audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[0, 1], audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128, skip_audio_tower=True, encode_whisper_embed=False,
        use_delay_pattern=True, audio_num_codebooks=CODEBOOKS, audio_codebook_size=CODEBOOK_SIZE,
        audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS, audio_in_token_idx=AUDIO_IN,
        audio_out_token_idx=AUDIO_OUT, audio_out_bos_token_id=AUDIO_OUT_BOS, audio_eos_token_id=AUDIO_EOS,
        pad_token_id=0,
    )  # fmt: skip
    return HiggsAudioModel(config)


def tiny_text_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, and boson's special tokens at the tiny model's ids."""
    vocabulary = {character: 4 + i for i, character in enumerate(string.printable[:-3])} | SPECIAL_IDS
    unused = sorted(set(range(256)) - set(vocabulary.values()))
    vocabulary |= {f"<|reserved_{i}|>": i for i in unused}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.add_special_tokens([token for token in SPECIAL_IDS if token != "[UNK]"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>",
        unk_token="[UNK]",
    )  # fmt: skip


def tiny_audio_tokenizer(seed: int = 0) -> nn.Module:
    """boson's HiggsAudioTokenizer, tiny and random (a one-layer random HuBERT as its semantic teacher)."""
    torch.manual_seed(seed)
    teacher = HubertModel(
        HubertConfig(
            hidden_size=768, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16,) * 4,
            conv_kernel=(10, 4, 4, 4), conv_stride=(5, 4, 4, 4), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        )
    )  # fmt: skip
    codec = audio_tokenizer_from_config(TINY_CODEC, teacher)
    with torch.no_grad():  # random codebooks, marked initialised as after loading a trained model.pth
        for layer in codec.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.embed_avg.copy_(layer._codebook.embed)
            layer._codebook.inited.fill_(1)
    return codec.eval()


class HiggsAudioModelWrapper(nn.Module):
    """The community scripts' wrapper: a plain ``nn.Module`` whose ``.model`` is the HiggsAudioModel.

    ``forward`` takes a collated batch and returns the model's output (text logits, audio logits and
    the labels expanded to the merged text + audio sequence); the trainer computes the loss.
    """

    # Explicit: Trainer must not scale this wrapper's loss by the number of processes
    # (known failure 13 in docs/troubleshooting.md, average_tokens_across_devices on transformers 5.x).
    accepts_loss_kwargs = False

    def __init__(self, model: HiggsAudioModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, attention_mask, label_ids, audio_out_ids, audio_out_ids_start,
                audio_out_ids_start_group_loc, label_audio_ids):  # fmt: skip
        audio_features = audio_feature_attention_mask = None
        if not self.config.skip_audio_tower:
            # A model with a Whisper tower needs a features batch even without audio-in: give it an empty one.
            encoder = self.config.audio_encoder_config
            frames = 2 * encoder.max_source_positions
            audio_features = torch.zeros(
                (0, encoder.num_mel_bins, frames), dtype=self.model.dtype, device=input_ids.device
            )
            audio_feature_attention_mask = torch.zeros((0, frames), dtype=torch.long, device=input_ids.device)
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, label_ids=label_ids, audio_out_ids=audio_out_ids,
            audio_out_ids_start=audio_out_ids_start, audio_out_ids_start_group_loc=audio_out_ids_start_group_loc,
            label_audio_ids=label_audio_ids, audio_features=audio_features,
            audio_feature_attention_mask=audio_feature_attention_mask,
        )  # fmt: skip


# What a new voice trains whole beside LoRA (peft's modules_to_save): the audio head, the text head and the
# codebook embeddings. They are saved, checked, extracted and merged like the LoRA tensors.
AUDIO_HEAD_MODULES = [
    "audio_decoder_proj.audio_lm_head",
    "audio_decoder_proj.text_lm_head",
    "audio_codebook_embeddings",
]


def lora_config(rank: int, audio_mlp: bool, audio_head: bool = False) -> LoraConfig:
    """LoRA on attention and the text MLPs; with ``audio_mlp`` also on the DualFFN audio MLPs.

    Text MLPs (``layers.N.mlp.*``) and the DualFFN audio path (``layers.N.audio_mlp.*``) share leaf
    names, so a regex over full module names tells them apart. No ``task_type``: peft's causal-LM
    model passes ``labels=`` to the base model, which ``HiggsAudioModel.forward`` does not take.
    With ``audio_head``, the heads and codebook embeddings train whole (``modules_to_save``).
    """
    audio_path = r"|audio_mlp\.(gate|up|down)_proj" if audio_mlp else ""
    pattern = r".*\.(self_attn\.(q|k|v|o)_proj|(?<!audio_)mlp\.(gate|up|down)_proj" + audio_path + ")"
    modules_to_save = AUDIO_HEAD_MODULES if audio_head else None
    return LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern, modules_to_save=modules_to_save
    )


# --- the loss and the trainer ------------------------------------------------------------------


def text_and_audio_losses(outputs, label_audio_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of the text head and of the audio head (mean over codebooks and frames).

    ``outputs.audio_logits`` has one row per audio-out position; the row at position ``t`` predicts
    the codes at ``t + 1`` (as in generation). ``label_audio_ids`` (from the collator) is ``-100`` at
    each segment's stream BOS, so shifting over the concatenated segments never crosses a boundary.
    """
    logits, labels = outputs.logits, outputs.expanded_labels
    text_loss = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    audio_logits = outputs.audio_logits  # (audio positions, codebooks, codebook_size + 2)
    if audio_logits is None or audio_logits.shape[0] < 2:
        return text_loss, text_loss.new_zeros(())
    targets = label_audio_ids[:, 1:].T  # (audio positions - 1, codebooks)
    audio_loss = nn.functional.cross_entropy(
        audio_logits[:-1].reshape(-1, audio_logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )
    return text_loss, audio_loss


class HiggsAudioTrainer(LoraAdapterSavingMixin, Trainer):
    """``Trainer`` with the DualFFN text + audio loss; the mixin writes ``lora_adapters`` on every save.

    Logs ``text_loss`` and ``audio_loss`` (means since the last log) beside ``loss``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_parts: dict[str, list[float]] = {"text_loss": [], "audio_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        outputs = model(**inputs)
        text_loss, audio_loss = text_and_audio_losses(outputs, inputs["label_audio_ids"])
        if model.training:
            self._loss_parts["text_loss"].append(text_loss.item())
            self._loss_parts["audio_loss"].append(audio_loss.item())
        loss = text_loss + audio_loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for key, values in self._loss_parts.items():
            if values and "loss" in logs:
                logs[key] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, *args, **kwargs)


# --- the data ----------------------------------------------------------------------------------


class HiggsAudioTrainingCollator:
    """``HiggsAudioSampleCollator`` set up from the model's config, returning the dict Trainer moves to the device.

    The data here has no audio-in (reference audio), so no Whisper features are computed and no
    WhisperProcessor is needed (``encode_whisper_embed=False``).
    """

    def __init__(self, config: HiggsAudioConfig):
        self.collator = HiggsAudioSampleCollator(
            whisper_processor=None,
            encode_whisper_embed=False,
            audio_in_token_id=config.audio_in_token_idx,
            audio_out_token_id=config.audio_out_token_idx,
            audio_stream_bos_id=config.audio_stream_bos_id,
            audio_stream_eos_id=config.audio_stream_eos_id,
            pad_token_id=config.pad_token_id,
            return_audio_in_tokens=False,
            use_delay_pattern=config.use_delay_pattern,
            audio_num_codebooks=config.audio_num_codebooks,
            round_to=8,
        )

    def __call__(self, samples: list[ChatMLDatasetSample]) -> dict[str, torch.Tensor]:
        batch = self.collator(samples)
        return {name: getattr(batch, name) for name in BATCH_FIELDS}


def chatml_sample(input_ids: torch.Tensor, label_ids: torch.Tensor, codes: list[torch.Tensor]) -> ChatMLDatasetSample:
    """A ChatMLDatasetSample with text and audio-out codes only, built from fresh tensors.

    Fresh every time: the collator writes ``-100`` into ``label_ids`` at ``<|AUDIO_OUT|>`` tokens in
    place, so a sample object reused in the next epoch would no longer train its audio.
    """
    starts = [0, *np.cumsum([c.shape[1] for c in codes[:-1]]).tolist()]
    return ChatMLDatasetSample(
        input_ids=input_ids.clone(),
        label_ids=label_ids.clone(),
        audio_ids_concat=torch.cat(codes, dim=1).long(),
        audio_ids_start=torch.tensor(starts, dtype=torch.long),
        audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long),
    )


class SyntheticSpeechSamples(torch.utils.data.Dataset):
    """TTS-shaped samples for the tiny model: a 5-token prompt, ``<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>``, text.

    The prompt is not learned; the audio-out segment (``audio_len`` frames of random codes) and the
    text after it are.
    """

    def __init__(self, n: int = 8, text_len: int = 16, audio_len: int = 6, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 240, (n, text_len), generator=gen)
        self.ids[:, 5], self.ids[:, 6], self.ids[:, 7] = AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS
        self.codes = torch.randint(0, CODEBOOK_SIZE, (n, CODEBOOKS, audio_len), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> ChatMLDatasetSample:
        labels = self.ids[i].clone()
        labels[:5] = -100
        return chatml_sample(self.ids[i], labels, [self.codes[i]])


def _read_codes(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        codes = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".pt":
        codes = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: audio codes must be a .npy or .pt file")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.is_floating_point():
        raise ValueError(f"{path}: expected an integer array of shape (num_codebooks, frames)")
    return codes.long()


class JsonlSpeechSamples(torch.utils.data.Dataset):
    """The ``--data-dir`` format (see the module docstring), checked when loaded, codes read per item."""

    def __init__(self, directory: str | Path, config: HiggsAudioConfig):
        self.records: list[tuple[torch.Tensor, torch.Tensor, list[Path]]] = []
        files = sorted(Path(directory).glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no *.jsonl files in {directory}")
        for file in files:
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                record = json.loads(line)
                input_ids = torch.tensor(record["input_ids"], dtype=torch.long)
                label_ids = torch.tensor(record.get("label_ids", record["input_ids"]), dtype=torch.long)
                paths = [file.parent / p for p in record.get("audio_codes", [])]
                if label_ids.shape != input_ids.shape:
                    raise ValueError(f"{where}: label_ids and input_ids differ in length")
                if int((input_ids == config.audio_out_token_idx).sum()) != len(paths):
                    raise ValueError(f"{where}: one audio_codes file is needed per <|AUDIO_OUT|> token")
                missing = [str(p) for p in paths if not p.is_file()]
                if missing:
                    raise FileNotFoundError(f"{where}: missing audio codes {missing}")
                self.records.append((input_ids, label_ids, paths))
        self.num_codebooks = config.audio_num_codebooks
        logger.info("%d samples from %d file(s) in %s", len(self.records), len(files), directory)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ChatMLDatasetSample:
        input_ids, label_ids, paths = self.records[i]
        codes = [_read_codes(p) for p in paths]
        short = [str(p) for p, c in zip(paths, codes, strict=True) if c.shape[0] < self.num_codebooks]
        if short:
            raise ValueError(f"audio codes with fewer than {self.num_codebooks} codebooks: {short}")
        return chatml_sample(input_ids, label_ids, codes)


def write_example_data(directory: str | Path, n: int = 8) -> Path:
    """Write the synthetic samples in the ``--data-dir`` format (for the tiny model's token ids)."""
    directory = Path(directory)
    (directory / "codes").mkdir(parents=True, exist_ok=True)
    samples = SyntheticSpeechSamples(n=n)
    with open(directory / "samples.jsonl", "w") as handle:
        for i in range(n):
            sample = samples[i]
            np.save(directory / "codes" / f"{i:04d}.npy", sample.audio_ids_concat.numpy())
            record = {
                "input_ids": sample.input_ids.tolist(),
                "label_ids": sample.label_ids.tolist(),
                "audio_codes": [f"codes/{i:04d}.npy"],
            }
            handle.write(json.dumps(record) + "\n")
    return directory


# --- the run -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/tiny-higgs-lora")
    parser.add_argument("--model-path", help="local Higgs Audio v2 checkpoint directory (default: tiny random model)")
    parser.add_argument("--data-dir", help="directory of JSONL samples (see the module docstring); needs --model-path")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="per device")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 5e-3 tiny model, 1e-4 real")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-audio-mlp", action="store_true", help="also put LoRA on the DualFFN audio_mlp")
    parser.add_argument(
        "--train-audio-head",
        action="store_true",
        help="also train the audio head, text head and codebook embeddings whole (peft modules_to_save)",
    )
    parser.add_argument("--adapter-only-checkpoints", action="store_true", help="checkpoints without base weights")
    parser.add_argument("--resume-from-checkpoint", help="a checkpoint-N directory of an earlier run")
    parser.add_argument(
        "--speech-prompt", action="append", metavar="TEXT", help="a text to speak at every save (repeatable)"
    )
    parser.add_argument("--audio-tokenizer", metavar="DIR", help="boson audio tokenizer directory (with --model-path)")
    parser.add_argument("--speech-max-new-tokens", type=int, default=32, help="length limit of each speech sample")
    parser.add_argument("--no-speech", action="store_true", help="no speech samples at the saves")
    args = parser.parse_args(argv)
    if args.model_path and args.speech_prompt and not args.audio_tokenizer and not args.no_speech:
        parser.error("--speech-prompt with --model-path needs --audio-tokenizer DIR (the codec that decodes audio)")
    if args.data_dir and not args.model_path:
        parser.error("--data-dir trains a real model: give --model-path too")
    if args.model_path and not args.data_dir:
        parser.error("--model-path needs --data-dir (the synthetic samples fit only the tiny model's vocabulary)")
    return args


def build_trainer(args: argparse.Namespace) -> HiggsAudioTrainer:
    """Model, LoRA, data and trainer, as a training script sets them up."""
    if args.model_path:
        base = HiggsAudioModel.from_pretrained(args.model_path, torch_dtype="auto")
        train_dataset = JsonlSpeechSamples(args.data_dir, base.config)
    else:
        base = tiny_higgs_model()
        base_dir = Path(args.output_dir) / "base_model"
        base.save_pretrained(base_dir)  # so the printed merge and speak commands run as is
        tiny_text_tokenizer().save_pretrained(base_dir)
        save_audio_tokenizer(tiny_audio_tokenizer(), TINY_CODEC, base_dir / "audio_tokenizer")
        train_dataset = SyntheticSpeechSamples()
    wrapper = HiggsAudioModelWrapper(base)
    wrapper.model = get_peft_model(
        wrapper.model, lora_config(args.lora_rank, args.lora_audio_mlp, args.train_audio_head)
    )
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate or (1e-4 if args.model_path else 5e-3),
        logging_steps=max(1, min(10, args.save_steps)), report_to=[], use_cpu=not cuda,
        bf16=cuda and base.dtype == torch.bfloat16, remove_unused_columns=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return HiggsAudioTrainer(
        model=wrapper,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=HiggsAudioTrainingCollator(base.config),
        adapter_only_checkpoints=args.adapter_only_checkpoints,
        callbacks=[] if args.no_speech or (args.model_path and not args.speech_prompt) else [speech_samples(args)],
    )


def speech_samples(args: argparse.Namespace) -> SpeechSamplesCallback:
    """Speak the prompts at every save through boson's generation and audio tokenizer (higgs_trainer.speech)."""
    base = Path(args.model_path or Path(args.output_dir) / "base_model")
    codec = Path(args.audio_tokenizer) if args.audio_tokenizer else base / "audio_tokenizer"
    backend = BosonSpeechBackend(AutoTokenizer.from_pretrained(base), load_audio_tokenizer(codec))
    prompts = [SpeechPrompt(f"prompt{i}", text) for i, text in enumerate(args.speech_prompt or SPEECH_PROMPTS)]
    return SpeechSamplesCallback(prompts, backend=backend, max_new_tokens=args.speech_max_new_tokens)


def report(args: argparse.Namespace) -> None:
    """Print where the adapters are, what they hold, and how to verify and merge them."""
    out = Path(args.output_dir)
    checkpoints = sorted(out.glob("checkpoint-*/lora_adapters"), key=lambda p: int(p.parent.name.split("-")[1]))
    print(f"\nLoRA adapters of {out}:")
    for directory in [*checkpoints, out / "lora_adapters"]:
        s = inspect_adapter(directory)
        status = "ok" if s.ok else "FAILED: " + "; ".join(s.problems)
        print(
            f"  {directory}: {s.num_tensors} tensors, {s.num_parameters} parameters, "
            f"{s.num_bytes} bytes, r={s.r}, alpha={s.lora_alpha}"
            + (f", modules_to_save {', '.join(s.modules_to_save)}" if s.modules_to_save else "")
            + f" [{status}]"
        )
    speech = [d / "speech" for d in [*(c.parent for c in checkpoints), out] if (d / "speech" / "speech.json").is_file()]
    if speech:
        print("\nSpeech samples (WAV, mel-spectrogram PNG, speech.json) at every save:")
        for directory in speech:
            samples = read_records(directory / "speech.json")["samples"]
            listed = ", ".join(
                f"{s['name']}.wav {s['seconds']:.2f}s" + (f" [{', '.join(s['flags'])}]" if s["flags"] else "")
                for s in samples
            )
            print(f"  {directory}: {listed}")
        print("  (the tiny model is random and trains on random codes: noise, a frame or two, or none; flags in [])")
        page = (out / "speech.html").resolve()  # rewritten by the speech callback after each save
        if page.is_file():
            print(f"  listening page (every checkpoint side by side, opens from disk): {page}")
    # Full paths, so that the commands run as printed from a new shell (any directory, this environment not active).
    run, base = out.resolve(), Path(args.model_path or out / "base_model").resolve()
    command, adapter = higgs_trainer_command(), run / "lora_adapters"
    print("\nNext:")
    print(f"  verify: {command} verify {shlex.quote(str(run))} --base {shlex.quote(str(base))}")
    print(
        f"  merge:  {command} merge --base {shlex.quote(str(base))} --adapter {shlex.quote(str(adapter))} "
        f"--output {shlex.quote(str(run))}-merged"
    )
    print("          (streams the base's safetensors tensor by tensor; add --compare to check the merged outputs)")
    print(f"  load:   PeftModel.from_pretrained(HiggsAudioModel.from_pretrained('{base}'), '{adapter}')")
    if speech:
        codec = f" --codec {shlex.quote(args.audio_tokenizer)}" if args.audio_tokenizer else ""
        print(
            f"  speak:  {command} speak --base {shlex.quote(str(base))} --adapter {shlex.quote(str(run))}{codec} "
            f'--text "Hello there." --output {shlex.quote(str(run))}-hello.wav --max-new-tokens {args.speech_max_new_tokens}'
        )


def higgs_trainer_command() -> str:
    """The ``higgs-trainer`` of the environment running this script, by full path (its bin/ need not be on PATH)."""
    script = Path(sys.executable).parent / "higgs-trainer"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m higgs_trainer.cli"  # higgs_trainer importable but not installed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("higgs_trainer").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    final = [log for log in trainer.state.log_history if "text_loss" in log]
    if final and not all(math.isfinite(final[-1][k]) for k in ("text_loss", "audio_loss")):
        print("the losses are not finite")
        return 1
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
