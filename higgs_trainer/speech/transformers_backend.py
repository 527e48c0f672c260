"""Speech from transformers' ``HiggsAudioV2ForConditionalGeneration`` through its own processor and codec.

Prompts go through ``HiggsAudioV2Processor`` (its chat template when it has one, else
``"<reference_text> <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|> <text> <|audio_out_bos|>"``), generation is the
model's own ``generate`` (its delay-pattern logits processor and audio stop), and codes are decoded by the
processor's ``HiggsAudioV2TokenizerModel``. Needs torchaudio (transformers' Higgs codec imports it).

Examples:
    ```python
    from higgs_trainer.speech import SpeechSamplesCallback, SpeechPrompt
    from higgs_trainer.speech.transformers_backend import TransformersSpeechBackend

    backend = TransformersSpeechBackend(processor)  # a HiggsAudioV2Processor with its audio_tokenizer
    callback = SpeechSamplesCallback([SpeechPrompt("hello", "Hello there.")], backend=backend)
    ```
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .backend import GeneratedSpeech, SpeechPrompt

logger = logging.getLogger(__name__)


class TransformersSpeechBackend:
    """`SpeechBackend` for ``HiggsAudioV2ForConditionalGeneration`` (transformers 5.x) and its processor.

    Args:
        processor: a ``HiggsAudioV2Processor`` holding the tokenizer, feature extractor and audio tokenizer (codec).
    """

    def __init__(self, processor: Any):
        if processor is None or getattr(processor, "audio_tokenizer", None) is None:
            raise UsageError(
                "speech samples on HiggsAudioV2ForConditionalGeneration need its codec: pass "
                "backend=TransformersSpeechBackend(processor) with a HiggsAudioV2Processor that holds an audio_tokenizer"
            )
        self.processor = processor
        self.codec = processor.audio_tokenizer
        self.sample_rate = int(self.codec.config.sample_rate)

    @staticmethod
    def check_model(model: torch.nn.Module) -> None:
        """Raise `UsageError` unless ``model`` (the PeftModel's base) generates audio codes."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "audio_lm_head") or not hasattr(base.config, "audio_stream_eos_id"):
            raise UsageError(
                f"speech samples need a model with audio output, but the LoRA model wraps {type(base).__name__}: "
                "wrap HiggsAudioV2ForConditionalGeneration (or pass a backend for your model)"
            )

    def _inputs(self, prompt: SpeechPrompt, device: torch.device) -> dict[str, torch.Tensor]:
        processor = self.processor
        audio = None
        if prompt.reference_audio is not None:
            from .audio_files import read_wav  # the speech extra: only where a reference clip is given

            audio = [read_wav(prompt.reference_audio, self.sample_rate)]
        if getattr(processor, "chat_template", None):
            conversation = []
            if audio is not None:
                conversation.append(
                    {"role": "user", "content": [{"type": "text", "text": prompt.reference_text or ""}]}
                )
                conversation.append({"role": "assistant", "content": [{"type": "audio", "audio": audio[0]}]})
            conversation.append({"role": "user", "content": [{"type": "text", "text": prompt.text}]})
            inputs = processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        else:
            bos, out, eos = processor.audio_bos_token, processor.audio_token, processor.audio_eos_token
            text = f"{prompt.text} {bos}"
            if audio is not None:
                text = f"{prompt.reference_text or ''} {bos}{out}{eos} {text}".strip()
            inputs = processor(text=text, audio=audio, return_tensors="pt")
        return {k: v.to(device) for k, v in inputs.items()}

    def generate(
        self,
        model: torch.nn.Module,
        prompt: SpeechPrompt,
        *,
        max_new_tokens: int,
        generation_kwargs: dict[str, Any],
        logits_processor: Any = None,
    ) -> GeneratedSpeech:
        """Generate ``prompt``'s codes with ``model`` (greedy unless ``generation_kwargs`` say otherwise).

        ``logits_processor`` runs inside transformers' Higgs generation loop after its delay-pattern processor, on
        per-codebook scores ``[batch * num_codebooks, codebook_size]``; transformers accepts only subclasses of the
        score-only processors it lists (``HiggsAudioV2GenerationMixin._supported_logits_processor_types``).
        """
        device = next(model.parameters()).device
        inputs = self._inputs(prompt, device)
        prompt_frames = inputs["audio_input_ids"].shape[1] if "audio_input_ids" in inputs else 0
        kwargs = {"do_sample": False, **generation_kwargs, "max_new_tokens": max_new_tokens}
        if logits_processor is not None:
            kwargs["logits_processor"] = logits_processor
        audio = model.generate(**inputs, **kwargs)
        if not isinstance(audio, torch.Tensor):  # return_dict_in_generate=True in generation_kwargs
            audio = audio.audio_sequences
        return self._to_speech(audio[0, prompt_frames:].cpu(), model)

    def _to_speech(self, stream: torch.Tensor, model: torch.nn.Module) -> GeneratedSpeech:
        """Codes of one generated stream ``[steps, num_codebooks]``, cut as ``HiggsAudioV2Processor.batch_decode`` does.

        After the stream-BOS frame, up to the first all-EOS frame, delay pattern undone, codes clipped to the codebook.
        """
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        bos, eos, codebooks = config.audio_stream_bos_id, config.audio_stream_eos_id, config.num_codebooks
        if stream.shape[0] and bool((stream[0] == bos).all()):
            stream = stream[1:]  # the stream-BOS frame the delay pattern forces first
        all_eos = (stream == eos).all(-1).nonzero()
        end = int(all_eos[0, 0]) if len(all_eos) else stream.shape[0]
        ended = bool((stream == eos).any())  # the model began the audio end (the delay pattern completes it)
        if end - (codebooks - 1) <= 0:
            return GeneratedSpeech(codes=torch.zeros(codebooks, 0, dtype=torch.long), ended=ended, audio_started=False)
        aligned = self.processor.revert_delay_pattern(stream[:end])
        codes = aligned.clip(0, bos - 1).T.contiguous().to(torch.int64)
        return GeneratedSpeech(codes=codes, ended=ended, audio_started=True)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Decode ``[num_codebooks, frames]`` codes with the codec to a float32 mono waveform."""
        if codes.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        device = next(self.codec.parameters()).device
        waveform = self.codec.decode(codes[None].to(device)).audio_values
        return waveform.reshape(-1).float().cpu().numpy()
