"""Tiny real models for the tests: random weights built from configs, nothing downloaded.

On the Higgs stack (transformers < 4.47 with boson_multimodal installed) the base model is
the real ``HiggsAudioModel``; on the newest stack, where boson_multimodal does not import, the
real ``HiggsAudioV2ForConditionalGeneration`` transformers ships (DualFFN on every layer, its text
head on), trained with its own text and audio loss (``labels`` and ``audio_labels``): the batches
there hold an audio segment (``audio_input_ids``). `tiny_llama` is a plain ``LlamaForCausalLM``
for the tests that show the library works for any PEFT model. The wrappers mirror the community
scripts' ``HiggsAudioModelWrapper``: a plain ``nn.Module`` whose ``.model`` (or
``.model.text_model``) becomes the ``PeftModel``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

HIGGS_STACK = Version(transformers.__version__) < Version("4.47") and bool(importlib.util.find_spec("boson_multimodal"))
VOCAB = 256
SEQ_LEN = 16  # a multiple of 8, so HiggsAudioModel adds no padding
TARGET_MODULES = ["q_proj", "v_proj"]
# The newest stack's HiggsAudioV2: 4 codebooks of 32 codes plus the two stream tokens; frames SEQ_LEN // 4 ... 3 // 4.
CODEBOOKS, CODEBOOK_SIZE, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, AUDIO_DELAY = 4, 34, 251, 252, 253, 254
AUDIO_SPAN = slice(SEQ_LEN // 4, 3 * SEQ_LEN // 4)
FRAMES = AUDIO_SPAN.stop - AUDIO_SPAN.start


def tiny_higgs_v2_config() -> transformers.PretrainedConfig:
    """The newest stack's tiny HiggsAudioV2Config (same sizes as the Higgs stack's HiggsAudioModel)."""
    return transformers.HiggsAudioV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, num_codebooks=CODEBOOKS,
        codebook_size=CODEBOOK_SIZE, audio_stream_bos_id=CODEBOOK_SIZE - 2, audio_stream_eos_id=CODEBOOK_SIZE - 1,
        audio_token_id=AUDIO_TOKEN, audio_bos_token_id=AUDIO_BOS, audio_delay_token_id=AUDIO_DELAY, pad_token_id=0,
        bos_token_id=1, eos_token_id=AUDIO_EOS, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


def tiny_llama(seed: int = 0) -> nn.Module:
    """A tiny ``LlamaForCausalLM`` with tied embeddings: any causal LM, not Higgs."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def tiny_base_model(seed: int = 0) -> nn.Module:
    """The bare base model, identical for the same seed."""
    torch.manual_seed(seed)
    if HIGGS_STACK:
        from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

        config = HiggsAudioConfig(
            text_config=dict(
                model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
            ),
            audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[0, 1], audio_ffn_hidden_size=64,
            audio_ffn_intermediate_size=128, skip_audio_tower=True, audio_num_codebooks=4, audio_codebook_size=32,
            audio_stream_bos_id=32, audio_stream_eos_id=33, audio_in_token_idx=250, audio_out_token_idx=251,
            audio_out_bos_token_id=252, audio_eos_token_id=253, pad_token_id=0,
        )  # fmt: skip
        return HiggsAudioModel(config)
    return transformers.HiggsAudioV2ForConditionalGeneration(tiny_higgs_v2_config(), use_text_head=True)


def lora_config(r: int = 4) -> LoraConfig:
    # HiggsAudioModel.forward takes no `labels`, which PeftModelForCausalLM always passes: no task type there.
    task_type = None if HIGGS_STACK else "CAUSAL_LM"
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type=task_type)


def adapter_shapes(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the adapter file peft's own ``save_pretrained`` writes for ``peft_model``.

    What a verified adapter of an unsharded model must hold (the library reads them from the live
    model, DeepSpeed's ``ds_shape`` included, when it saves).
    """
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    return {key: tuple(value.shape) for key, value in state.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits[:, : labels.shape[1]]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def logits_loss(logits: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
    """The loss from a model's logits: causal-LM on the text, or (HiggsAudioV2, whose logits are the audio head's)
    the sum over codebooks of the causal-LM loss on ``audio_labels`` at the audio positions, as the model computes it.
    """
    if not batch or batch.get("audio_labels") is None:
        return causal_lm_loss(logits, labels)
    ids = batch["input_ids"]
    per_codebook = logits[:, : ids.shape[1]].reshape(*ids.shape, CODEBOOKS, CODEBOOK_SIZE)
    expanded = torch.full((*ids.shape, CODEBOOKS), -100, dtype=torch.long, device=ids.device)
    expanded[ids == AUDIO_TOKEN] = batch["audio_labels"][batch["audio_input_ids_mask"]]
    return sum(causal_lm_loss(per_codebook[:, :, c], expanded[:, :, c]) for c in range(CODEBOOKS))


class TextModelHolder(nn.Module):
    """A model with a ``text_model`` attribute, for the ``wrapper.model.text_model`` layout."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


class TwoComponents(nn.Module):
    """Two PEFT components, ``a`` and ``b`` (by default two tiny models from different seeds), both in the forward pass."""

    def __init__(self, a: nn.Module | None = None, b: nn.Module | None = None):
        super().__init__()
        self.a = a if a is not None else get_peft_model(tiny_base_model(0), lora_config())
        self.b = b if b is not None else get_peft_model(tiny_base_model(1), lora_config())

    def forward(self, input_ids, attention_mask=None, labels=None, audio_labels=None, **audio):
        logits = (
            self.a(input_ids=input_ids, attention_mask=attention_mask, **audio).logits
            + self.b(input_ids=input_ids, attention_mask=attention_mask, **audio).logits
        )
        batch = dict(audio, input_ids=input_ids, audio_labels=audio_labels)
        return {"loss": logits_loss(logits, labels, batch), "logits": logits}


class Wrapper(nn.Module):
    """Like the community ``HiggsAudioModelWrapper``: a plain ``nn.Module`` around the model, computing the loss."""

    def __init__(self, model: nn.Module, compute_loss: bool = True):
        super().__init__()
        self.model = model
        self.compute_loss = compute_loss

    def forward(self, input_ids, attention_mask=None, labels=None, **audio):
        loss, logits = loss_and_logits(
            self.model, input_ids, attention_mask, labels if self.compute_loss else None, **audio
        )
        return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}


def loss_and_logits(model, input_ids, attention_mask=None, labels=None, **audio):
    """(loss or None, logits) of ``model`` on a batch: Higgs v2 computes its own text + audio loss, others the causal-LM one."""
    if audio:  # HiggsAudioV2: audio_input_ids, audio_input_ids_mask and (when training) audio_labels
        if labels is None:
            audio = {k: v for k, v in audio.items() if k != "audio_labels"}
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **audio)
        return out.loss, out.logits
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return (None if labels is None else causal_lm_loss(out.logits, labels)), out.logits


def make_model(
    layout: str = "model", seed: int = 0, r: int = 4, compute_loss: bool = True, base: nn.Module | None = None
) -> nn.Module:
    """A model with LoRA applied where ``layout`` says: ``model``, ``text_model`` or ``top`` (a bare PeftModel).

    ``base`` replaces `tiny_base_model` (e.g. `tiny_llama`).
    """
    base = tiny_base_model(seed) if base is None else base
    if layout == "top":
        return get_peft_model(base, lora_config(r))
    if layout == "model":
        return Wrapper(get_peft_model(base, lora_config(r)), compute_loss)
    if layout == "text_model":
        holder = TextModelHolder(base)
        holder.text_model = get_peft_model(holder.text_model, lora_config(r))
        return Wrapper(holder, compute_loss)
    raise ValueError(layout)


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences; labels are the inputs (on the newest stack, with an audio segment: ``audio``)."""

    def __init__(self, n: int = 16, seed: int = 1, audio: bool | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB - 8, (n, SEQ_LEN), generator=gen)
        self.codes = torch.randint(0, CODEBOOK_SIZE - 2, (n, FRAMES, CODEBOOKS), generator=gen)
        self.audio = not HIGGS_STACK if audio is None else audio

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if self.audio:
            item = with_audio(item, self.codes[i])
            item["audio_labels"] = item["audio_input_ids"].clone()
        return item


def with_audio(item: dict[str, torch.Tensor], codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """A text sequence with an audio segment in its middle, as HiggsAudioV2Processor lays it out (newest stack)."""
    ids = item["input_ids"].clone()
    ids[..., AUDIO_SPAN] = AUDIO_TOKEN
    item = dict(
        item, input_ids=ids, audio_input_ids=codes, audio_input_ids_mask=torch.ones(codes.shape[:-1], dtype=torch.bool)
    )
    if "labels" in item:
        labels = ids.clone()
        labels[..., AUDIO_SPAN] = -100  # the audio positions are scored by audio_labels
        item["labels"] = labels
    return item


def probe_batch(n: int = 2, audio: bool | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB - 8, (n, SEQ_LEN), generator=torch.Generator().manual_seed(99))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not HIGGS_STACK if audio is None else audio:
        codes = torch.randint(0, CODEBOOK_SIZE - 2, (n, FRAMES, CODEBOOKS), generator=torch.Generator().manual_seed(98))
        batch = with_audio(batch, codes)
    return batch


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    out = model(**batch)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    return logits[:, :SEQ_LEN].float()


def training_args(output_dir, **overrides) -> transformers.TrainingArguments:
    """Small, deterministic CPU training arguments."""
    values = dict(
        output_dir=str(output_dir), max_steps=4, save_steps=2, save_strategy="steps", per_device_train_batch_size=2,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, seed=7,
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    values.update(overrides)
    return transformers.TrainingArguments(**values)


class EarliestIsBest(TrainerCallback):
    """Adds eval_step_score = -step, so with greater_is_better the earliest checkpoint is the best."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_step_score"] = -state.global_step


def final_adapter(output_dir) -> dict[str, torch.Tensor]:
    """The tensors of the final ``lora_adapters`` a run saved into ``output_dir``."""
    return load_file(str(Path(output_dir) / "lora_adapters" / "adapter_model.safetensors"))


def assert_resumed_exactly(resumed_dir, uninterrupted: dict[str, torch.Tensor]) -> None:
    """The final adapter of the resumed run in ``resumed_dir`` equals the uninterrupted run's, up to float noise."""
    resumed = final_adapter(resumed_dir)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7, msg=key)


def assert_same_tensors(actual, expected):
    """Same keys, bit-identical tensors."""
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


class SavedAdapters(logging.Handler):
    """Collects the paths of the adapters this process wrote, from higgs_trainer's own INFO line.

    ``with SavedAdapters() as saved: trainer.train()`` then ``saved.paths``.
    """

    def __init__(self):
        super().__init__(logging.INFO)
        self.paths = []
        self._logger = logging.getLogger("higgs_trainer")

    def emit(self, record):
        if record.getMessage().startswith("Saved LoRA adapter to "):
            self.paths.append(record.args[0])

    def __enter__(self):
        self._old_level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info):
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)


# Text + audio training of the whole DualFFN model (Higgs stack), for modules_to_save and LoRA on audio_mlp.
# On the newest stack the same helpers fall back to the text-only model above (no audio head there).

AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS = 251, 252, 253  # the tiny HiggsAudioConfig's special tokens (tiny_base_model)
CODEBOOKS, CODEBOOK_SIZE = 4, 32


def heads_to_save(model: nn.Module) -> list[str]:
    """``modules_to_save`` names for the heads and embeddings a voice run trains fully, as far as ``model`` has them.

    HiggsAudioModel: the audio head, the text head and the codebook embeddings. A model without an
    audio head (the newest stack's Llama, whose lm_head is tied to its embeddings): its final norm.
    """
    present = dict(model.named_modules())
    higgs = ["audio_decoder_proj.audio_lm_head", "audio_decoder_proj.text_lm_head", "audio_codebook_embeddings"]
    native = [
        "audio_lm_head",
        "text_lm_head",
        "model.embed_audio_tokens",
    ]  # transformers' HiggsAudioV2ForConditionalGeneration
    for names in (higgs, native):
        found = [name for name in names if name in present]
        if found:
            return found
    return ["model.norm"]


def speech_lora_config(targets, modules_to_save=None, r: int = 4) -> LoraConfig:
    """``lora_config`` with other target modules (a list or a regex) and optional ``modules_to_save``."""
    config = lora_config(r)
    config.target_modules = targets if isinstance(targets, str) else set(targets)
    config.modules_to_save = modules_to_save
    return config


def speech_loss(outputs, label_audio_ids) -> torch.Tensor:
    """HiggsAudioModel's text + audio next-token loss, as examples/train_higgs_lora.py computes it."""
    text_loss = causal_lm_loss(outputs.logits, outputs.expanded_labels)
    audio_logits = outputs.audio_logits  # (audio positions, codebooks, codebook size + 2)
    targets = label_audio_ids[:, 1:].T
    audio_loss = nn.functional.cross_entropy(
        audio_logits[:-1].reshape(-1, audio_logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )
    return text_loss + audio_loss


class SpeechWrapper(nn.Module):
    """The community wrapper around HiggsAudioModel, with its text + audio loss; returns text and audio logits."""

    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, label_ids=None, audio_out_ids=None, audio_out_ids_start=None,
                audio_out_ids_start_group_loc=None, label_audio_ids=None):  # fmt: skip
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, label_ids=label_ids, audio_out_ids=audio_out_ids,
            audio_out_ids_start=audio_out_ids_start, audio_out_ids_start_group_loc=audio_out_ids_start_group_loc,
            label_audio_ids=label_audio_ids,
        )  # fmt: skip
        result = {"logits": out.logits, "audio_logits": out.audio_logits}
        if label_audio_ids is not None:  # a text-only batch (tests.testing_models.probe_batch) just gives logits
            result["loss"] = speech_loss(out, label_audio_ids)
        return result


def make_speech_model(targets, modules_to_save=None, seed: int = 0, r: int = 4) -> nn.Module:
    """A wrapper whose ``.model`` is the PeftModel: text + audio loss on the Higgs stack, text loss on the newest."""
    base = tiny_base_model(seed)
    peft_model = get_peft_model(base, speech_lora_config(targets, modules_to_save, r))
    return SpeechWrapper(peft_model) if HIGGS_STACK else Wrapper(peft_model)


class SpeechSamples(torch.utils.data.Dataset):
    """TTS-shaped ChatMLDatasetSamples (prompt, one audio-out segment of random codes, text); tokens on the newest stack."""

    def __init__(self, n: int = 16, seed: int = 1, audio_len: int = 6):
        self.tokens = RandomTokens(n, seed)
        gen = torch.Generator().manual_seed(seed)
        self.codes = torch.randint(0, CODEBOOK_SIZE, (n, CODEBOOKS, audio_len), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        if not HIGGS_STACK:
            return self.tokens[i]
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

        ids = self.tokens.ids[i].clone()
        ids[4], ids[5], ids[6] = AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS
        labels = ids.clone()
        labels[:4] = -100
        return ChatMLDatasetSample(
            input_ids=ids, label_ids=labels, audio_ids_concat=self.codes[i].clone(),
            audio_ids_start=torch.tensor([0]), audio_waveforms_concat=torch.zeros(0),
            audio_waveforms_start=torch.zeros(0, dtype=torch.long), audio_sample_rate=torch.zeros(0),
            audio_speaker_indices=torch.zeros(0, dtype=torch.long),
        )  # fmt: skip


def speech_collator():
    """boson_multimodal's HiggsAudioSampleCollator for the tiny config (Higgs stack); None (Trainer's default) elsewhere."""
    if not HIGGS_STACK:
        return None
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    config = tiny_base_model().config
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, encode_whisper_embed=False, audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx, audio_stream_bos_id=config.audio_stream_bos_id,
        audio_stream_eos_id=config.audio_stream_eos_id, pad_token_id=config.pad_token_id, return_audio_in_tokens=False,
        use_delay_pattern=config.use_delay_pattern, audio_num_codebooks=config.audio_num_codebooks, round_to=8,
    )  # fmt: skip
    fields = ("input_ids", "attention_mask", "audio_out_ids", "audio_out_ids_start", "audio_out_ids_start_group_loc",
              "label_ids", "label_audio_ids")  # fmt: skip

    def collate(samples):
        batch = collator(samples)
        return {name: getattr(batch, name) for name in fields}

    return collate


def speech_probe(n: int = 2) -> dict[str, torch.Tensor]:
    """A fixed batch for comparing models (fresh samples: the collator writes into label_ids)."""
    samples = SpeechSamples(n=n, seed=99)
    collate = speech_collator()
    if collate is None:
        return probe_batch(n)
    return collate([samples[i] for i in range(n)])


@torch.no_grad()
def speech_logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"text": ..., "audio": ...}`` logits of a wrapper, or of a bare (Peft)HiggsAudioModel given the same batch."""
    model.eval()
    out = model(**batch)
    if not isinstance(out, dict):  # a bare model's output object
        out = {"logits": out.logits, "audio_logits": getattr(out, "audio_logits", None)}
    result = {"text": out["logits"].float()}
    if out.get("audio_logits") is not None:
        result["audio"] = out["audio_logits"].float()
    return result


def trained_like(model: nn.Module, amount: float = 0.05) -> nn.Module:
    """``model`` with every lora_B moved off peft's zero init, as training moves it (verify fails and merge refuses an
    adapter still at that init)."""
    from higgs_trainer import find_lora_model

    with torch.no_grad():
        for name, param in find_lora_model(model).model.named_parameters():
            if "lora_B" in name:
                param.add_(amount)
    return model
