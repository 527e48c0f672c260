"""Speech from boson's ``HiggsAudioModel`` (the Higgs stack), through boson's own prompt, generation loop and codec.

The prompt is boson's ChatML, built the way its ``examples/generation.py`` and ``HiggsAudioServeEngine`` build it
(``prepare_chatml_sample``, then ``HiggsAudioSampleCollator``), ending in ``<|audio_out_bos|>`` as the serve engine's
``force_audio_gen=True`` does, so the model speaks at once. ``HiggsAudioModel.generate`` runs its own loop (text and
audio modes, delay pattern); the audio codes it returns lose their delay pattern through boson's
``revert_delay_pattern`` and are decoded by boson's ``HiggsAudioTokenizer``. boson_multimodal is imported here only
when a backend is used, never at ``import higgs_trainer``.

Examples:
    ```python
    from higgs_trainer.speech.backend import SpeechPrompt
    from higgs_trainer.speech.boson_backend import BosonSpeechBackend

    backend = BosonSpeechBackend(tokenizer, audio_tokenizer)  # AutoTokenizer of the base, boson's audio tokenizer
    speech = backend.generate(peft_model, SpeechPrompt("hello", "Hello there."), max_new_tokens=200,
                              generation_kwargs={})
    waveform = backend.decode(speech.codes)  # float32, backend.sample_rate
    ```
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessorList

from .._compat import boson_semantic_teacher
from ..errors import UsageError, first_line
from ..files.atomic import staged_directory
from .backend import GeneratedSpeech, SpeechPrompt

logger = logging.getLogger(__name__)

SYSTEM_MESSAGE = "Generate audio following instruction."  # boson's examples/generation.py
ASSISTANT_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
AUDIO_OUT_BOS = "<|audio_out_bos|>"
AUDIO_EOS = "<|audio_eos|>"
SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", AUDIO_OUT_BOS, AUDIO_EOS)


def audio_tokenizer_from_config(config: dict[str, Any], semantic_model: nn.Module, device: str = "cpu") -> nn.Module:
    """boson's ``HiggsAudioTokenizer`` from its config (``config.json``'s keys), with ``semantic_model`` as its teacher.

    boson's own loader (``load_higgs_audio_tokenizer``) fetches the teacher from the Hub inside the constructor; here
    the constructor gets ``semantic_model`` (e.g. a ``transformers.HubertModel`` built from a ``HubertConfig``), so
    nothing is downloaded. The teacher's hidden size must be the 768 boson's constructor assumes. Load trained
    weights afterwards with ``load_state_dict`` (boson keeps the teacher's weights in ``model.pth`` too).

    Args:
        config: keyword arguments of ``HiggsAudioTokenizer`` (``n_q``, ``bins``, ``ratios``, ``sample_rate``,
            ``semantic_techer``, ...), as in the tokenizer's ``config.json``.
        semantic_model: the semantic teacher, in place of the one the constructor would download.
        device: where its encode/decode put their inputs, as boson's ``device`` argument.

    Returns:
        The tokenizer, in eval mode, on ``device``.

    Examples:
        ```python
        teacher = transformers.HubertModel(transformers.HubertConfig(num_hidden_layers=1))
        audio_tokenizer = audio_tokenizer_from_config(
            {"n_q": 4, "bins": 32, "semantic_techer": "hubert_base"}, teacher)
        ```
    """
    from boson_multimodal.audio_processing import higgs_audio_tokenizer

    with boson_semantic_teacher(higgs_audio_tokenizer, semantic_model):
        tokenizer = higgs_audio_tokenizer.HiggsAudioTokenizer(**{**config, "device": device})
    return tokenizer.to(device).eval()


SEMANTIC_DIRNAME = "semantic_model"  # optional: the teacher's transformers config, when not the named Hub model's
_TEACHERS = {"hubert_base": "HubertConfig", "hubert_base_general": "HubertConfig", "wavlm_base_plus": "WavLMConfig"}


def save_audio_tokenizer(audio_tokenizer: nn.Module, config: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write boson's tokenizer format: ``config.json`` (constructor keywords), ``model.pth`` (state dict), and the
    teacher's config in ``semantic_model/config.json`` so that `load_audio_tokenizer` rebuilds it without the Hub.

    The directory is written whole or not at all (it replaces ``directory``).

    Args:
        audio_tokenizer: the ``HiggsAudioTokenizer``.
        config: the keywords it was built with (`audio_tokenizer_from_config`'s ``config``).
        directory: where to write it.
    """
    with staged_directory(directory) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / SEMANTIC_DIRNAME).mkdir()
        (staging / SEMANTIC_DIRNAME / "config.json").write_text(audio_tokenizer.semantic_model.config.to_json_string())
        torch.save(audio_tokenizer.state_dict(), staging / "model.pth")
    return Path(directory)


def load_audio_tokenizer(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """boson's ``HiggsAudioTokenizer`` from a local directory in boson's format, nothing downloaded, no code run.

    ``config.json`` gives the constructor's keywords, ``model.pth`` the weights (read with ``weights_only=True``;
    keys it lacks are named in a WARNING, as boson's own loader loads non-strictly). The semantic teacher is built
    from ``semantic_model/config.json`` when present (`save_audio_tokenizer` writes it), else from the transformers
    default config of the teacher ``semantic_techer`` names (HuBERT base or WavLM base), its weights from ``model.pth``.

    Args:
        directory: the tokenizer's directory (e.g. ``bosonai/higgs-audio-v2-tokenizer`` downloaded beforehand).
        device: where it runs.
    """
    import transformers

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{directory} is not a boson audio tokenizer: cannot read config.json ({first_line(error)})"
        ) from error
    teacher_file = directory / SEMANTIC_DIRNAME / "config.json"
    if teacher_file.is_file():
        teacher_config = transformers.AutoConfig.from_pretrained(teacher_file.parent, trust_remote_code=False)
    else:
        teacher = config.get("semantic_techer", "hubert_base_general")
        if teacher not in _TEACHERS:
            raise UsageError(
                f"{directory}: semantic teacher {teacher!r} is not one of {', '.join(_TEACHERS)}; put its transformers "
                f"config in {teacher_file}"
            )
        teacher_config = getattr(transformers, _TEACHERS[teacher])()
    try:
        state = torch.load(directory / "model.pth", map_location=device, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:  # weights_only refuses anything but tensors
        raise UsageError(f"{directory}: cannot read model.pth as a state dict ({first_line(error)})") from error
    audio_tokenizer = audio_tokenizer_from_config(config, transformers.AutoModel.from_config(teacher_config), device)
    missing = audio_tokenizer.load_state_dict(state, strict=False).missing_keys
    if missing:
        logger.warning("%s/model.pth lacks %d weights of the tokenizer (%s, ...)", directory, len(missing), missing[0])
    return audio_tokenizer.eval()


def load_boson_speaker(base: str | os.PathLike, codec: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """boson's ``HiggsAudioModel`` from ``base`` and a `BosonSpeechBackend` over its tokenizer and audio tokenizer.

    Args:
        base: the base model directory (``config.json`` of model_type ``higgs_audio``, its text tokenizer).
        codec: the audio tokenizer's directory, ``base/audio_tokenizer`` unless given.
    """
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers import AutoTokenizer

    base = Path(base)
    codec = Path(codec) if codec is not None else base / "audio_tokenizer"
    if not (codec / "config.json").is_file():
        raise UsageError(f"no boson audio tokenizer at {codec}: pass --codec DIR (config.json and model.pth)")
    model = HiggsAudioModel.from_pretrained(base)
    backend = BosonSpeechBackend(AutoTokenizer.from_pretrained(base), load_audio_tokenizer(codec))
    return model, backend


def higgs_audio_model(model: nn.Module) -> nn.Module:
    """The ``HiggsAudioModel`` itself: ``model``, or the base of a ``PeftModel`` (its LoRA layers stay in place)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if not hasattr(config, "audio_out_token_idx") or not hasattr(base, "generate"):
        raise UsageError(
            f"{type(base).__name__} is not boson's HiggsAudioModel: pass the HiggsAudioModel (or the PeftModel "
            f"around it) to the boson speech backend"
        )
    return base


def codes_from_audio_sequence(sequence: torch.Tensor, *, use_delay_pattern: bool, codebook_size: int) -> torch.Tensor:
    """The codec codes of one generated audio stream: delay pattern reverted, stream BOS/EOS columns dropped.

    ``sequence`` is one entry of ``HiggsAudioModel.generate``'s audio output, ``[num_codebooks, steps]``, starting with
    the stream-BOS column. The columns where the stream ends (any codebook at the stream EOS, ``codebook_size + 1``)
    are dropped, and what is left is clipped to ``[0, codebook_size)``, as boson's serve engine does.

    Examples:
        ```python
        bos, eos = 32, 33
        delayed = torch.tensor([[bos, 5, 6, eos, eos], [bos, bos, 7, 8, eos]])
        codes_from_audio_sequence(delayed, use_delay_pattern=True, codebook_size=32)  # [[5, 6], [7, 8]]
        ```
    """
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    num_codebooks, steps = sequence.shape
    if use_delay_pattern:
        if steps < num_codebooks:  # stopped before every codebook had started
            return sequence.new_zeros((num_codebooks, 0))
        sequence = revert_delay_pattern(sequence)
    codes = sequence[:, 1:]
    ending = (codes == codebook_size + 1).any(dim=0)
    while codes.shape[1] and ending[codes.shape[1] - 1]:
        codes = codes[:, :-1]
    return codes.clip(0, codebook_size - 1).long()


class BosonSpeechBackend:
    """Generate speech with boson's ``HiggsAudioModel.generate`` and decode it with boson's ``HiggsAudioTokenizer``.

    Args:
        tokenizer: the base model's text tokenizer (with boson's special tokens: ``<|audio_out_bos|>``, ...).
        audio_tokenizer: boson's ``HiggsAudioTokenizer`` (`audio_tokenizer_from_config`, or boson's own loader).
        system_message: the system turn, boson's default for generation unless given.

    Examples:
        ```python
        backend = BosonSpeechBackend(tokenizer, audio_tokenizer)
        speech = backend.generate(model, SpeechPrompt("a", "Hello."), max_new_tokens=100, generation_kwargs={})
        ```
    """

    def __init__(self, tokenizer: Any, audio_tokenizer: nn.Module, *, system_message: str = SYSTEM_MESSAGE):
        self.tokenizer = tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.system_message = system_message
        self.sample_rate = int(audio_tokenizer.sampling_rate)
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in SPECIAL_TOKENS if token not in vocabulary]
        if missing:
            raise UsageError(
                f"the text tokenizer lacks boson's special tokens {', '.join(missing)}: pass the tokenizer saved "
                f"with the Higgs Audio base model"
            )
        self.audio_out_bos_id = vocabulary[AUDIO_OUT_BOS]
        self.audio_eos_id = vocabulary[AUDIO_EOS]

    def generate(
        self,
        model: nn.Module,
        prompt: SpeechPrompt,
        *,
        max_new_tokens: int,
        generation_kwargs: dict,
        logits_processor: LogitsProcessorList | None = None,
    ) -> GeneratedSpeech:
        """One prompt through ``HiggsAudioModel.generate`` (greedy unless ``generation_kwargs`` say otherwise).

        ``logits_processor`` goes into boson's loop, which calls it with ``(input_ids, scores)`` for text steps and
        ``(None, scores)`` with ``scores`` of shape ``[num_codebooks, codebook_size + 2]`` for audio steps.
        Generation stops at ``<|audio_eos|>`` (``ended``) or after ``max_new_tokens`` steps.
        """
        higgs = higgs_audio_model(model)
        config = higgs.config
        self._check_codec_matches(config)
        inputs = self.prompt_inputs(higgs, prompt)
        kwargs = {"do_sample": False, "use_cache": True, **generation_kwargs}
        stop_ids = kwargs.pop("eos_token_id", None)
        stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        if logits_processor is not None:
            kwargs["logits_processor"] = logits_processor
        kwargs |= {
            "max_new_tokens": max_new_tokens,
            "audio_out_bos_token_id": self.audio_out_bos_id,
            "audio_eos_token_id": self.audio_eos_id,
            "eos_token_id": [self.audio_eos_id, *stop_ids],  # one clip per prompt: stop where its audio ends
        }
        prompt_length = inputs["input_ids"].shape[1]
        output = higgs.generate(**inputs, **kwargs)
        if hasattr(output, "audio_sequences"):  # return_dict_in_generate=True
            text_ids, audio_sequences = output.sequences, output.audio_sequences
        else:
            text_ids, audio_sequences = output
        ended = bool((text_ids[0, prompt_length:] == self.audio_eos_id).any())
        streams = [
            codes_from_audio_sequence(
                sequence, use_delay_pattern=config.use_delay_pattern, codebook_size=config.audio_codebook_size
            )
            for sequence in audio_sequences
        ]
        codes = torch.cat(streams, dim=1) if streams else torch.zeros((config.audio_num_codebooks, 0), dtype=torch.long)
        codes = codes.detach().cpu()
        return GeneratedSpeech(codes=codes, ended=ended, audio_started=codes.shape[1] > 0)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """``[num_codebooks, frames]`` codes to a float32 mono waveform at `sample_rate` (boson's decoder)."""
        if codes.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            waveform = self.audio_tokenizer.decode(codes.long().unsqueeze(0))
        return np.ascontiguousarray(waveform[0, 0], dtype=np.float32)

    def prompt_inputs(self, model: nn.Module, prompt: SpeechPrompt) -> dict[str, Any]:
        """The keyword arguments of ``HiggsAudioModel.generate`` for ``prompt``: boson's ChatML through its collator."""
        from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
        from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

        higgs = higgs_audio_model(model)
        config = higgs.config
        messages = [Message(role="system", content=self.system_message)]
        audio_ids = []
        if prompt.reference_audio is not None:
            audio_ids.append(self.encode_reference(prompt.reference_audio))
            clip = AudioContent(audio_url=str(prompt.reference_audio))
            if prompt.reference_text is not None:  # examples/generation.py: the transcript, then the clip as speech
                messages += [
                    Message(role="user", content=prompt.reference_text),
                    Message(role="assistant", content=clip),
                ]
            else:  # its ref_audio_in_system_message: the clip describes SPEAKER0 in the system turn
                scene = [TextContent(f"{self.system_message}\n\n<|scene_desc_start|>\nSPEAKER0: "), clip]
                messages[0] = Message(role="system", content=[*scene, TextContent("\n<|scene_desc_end|>")])
        messages.append(Message(role="user", content=prompt.text))
        input_ids, _, _, _ = prepare_chatml_sample(ChatMLSample(messages=messages), self.tokenizer)
        input_ids += self.tokenizer.encode(ASSISTANT_PROMPT + AUDIO_OUT_BOS, add_special_tokens=False)
        sample = ChatMLDatasetSample(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            label_ids=None,
            audio_ids_concat=torch.cat(audio_ids, dim=1) if audio_ids else None,
            audio_ids_start=torch.tensor([0], dtype=torch.long) if audio_ids else None,
            audio_waveforms_concat=None,
            audio_waveforms_start=None,
            audio_sample_rate=None,
            audio_speaker_indices=None,
        )
        collator = HiggsAudioSampleCollator(  # as boson's serve engine and examples/generation.py set it up
            whisper_processor=None,
            encode_whisper_embed=config.encode_whisper_embed,
            audio_in_token_id=config.audio_in_token_idx,
            audio_out_token_id=config.audio_out_token_idx,
            audio_stream_bos_id=config.audio_stream_bos_id,
            audio_stream_eos_id=config.audio_stream_eos_id,
            pad_token_id=config.pad_token_id,
            return_audio_in_tokens=config.encode_audio_in_tokens,
            use_delay_pattern=config.use_delay_pattern,
            audio_num_codebooks=config.audio_num_codebooks,
            round_to=1,
        )
        device = next(higgs.parameters()).device
        batch = asdict(collator([sample]))
        return {key: value.contiguous().to(device) if torch.is_tensor(value) else value for key, value in batch.items()}

    def encode_reference(self, path: str) -> torch.Tensor:
        """A reference clip (any WAV soundfile reads) to ``[num_codebooks, frames]`` codes with boson's encoder."""
        import soundfile
        import torchaudio

        try:
            waveform, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as error:  # soundfile.LibsndfileError is a RuntimeError
            raise UsageError(f"cannot read the reference clip {path}: {first_line(error)}; pass a WAV file") from error
        mono = torch.from_numpy(waveform.mean(axis=1))
        if rate != self.sample_rate:
            mono = torchaudio.functional.resample(mono, rate, self.sample_rate)
        with torch.no_grad():
            codes = self.audio_tokenizer.encode(mono.numpy(), sr=self.sample_rate)
        return codes.detach().long().cpu()

    def _check_codec_matches(self, config: Any) -> None:
        codec = self.audio_tokenizer
        bins = getattr(codec.quantizer, "bins", config.audio_codebook_size)  # an RVQ codec's codebook size
        if (codec.num_codebooks, bins) != (config.audio_num_codebooks, config.audio_codebook_size):
            raise UsageError(
                f"the audio tokenizer has {codec.num_codebooks} codebooks of {bins} codes but the model "
                f"{config.audio_num_codebooks} of {config.audio_codebook_size}: pass the audio tokenizer the model "
                f"was trained with"
            )
