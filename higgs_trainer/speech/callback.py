"""Hear every checkpoint: `SpeechSamplesCallback` speaks fixed prompts with the model as trained so far at every save.

At every ``checkpoint-N`` (after Trainer has written it completely) and at the final ``save_model``, each prompt is
generated (greedy by default) on the process that saves and written as ``speech/<name>.wav``, ``speech/<name>.png``
(mel spectrogram) and ``speech/speech.json`` (prompt, seconds, frames, sha256 of the codes, flags, scores), the
``speech/`` directory atomically. Training is not disturbed: eval mode and no_grad while sampling, train modes and
RNG states restored after; under DDP the other processes wait. TensorBoard and W&B, when in ``report_to``, get the
audio and the spectrogram at that step. Degenerate samples (see `higgs_trainer.speech.flags`) are WARNINGs; a
sample that fails is an ERROR, recorded, and training goes on.

Examples:
    ```python
    from higgs_trainer import HiggsLoraTrainer
    from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback

    speech = SpeechSamplesCallback([SpeechPrompt("hello", "Hello there.")])  # backend from processing_class
    trainer = HiggsLoraTrainer(model=wrapper, args=args, train_dataset=ds, processing_class=processor, callbacks=[speech])
    trainer.train()  # checkpoint-N/speech/hello.wav, hello.png, speech.json
    ```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import UsageError, first_line
from ..files.atomic import staged_directory
from ..files.runs import is_complete_checkpoint
from ..training.discovery import find_lora_model
from .audio_files import require_speech_extra
from .backend import SpeechBackend, SpeechPrompt
from .flags import DEFAULT_THRESHOLDS, FLAG_MEANINGS, FlagThresholds
from .records import RECORD_NAME, SPEECH_DIRNAME, SampleRecord, write_records
from .sampling import Sample, Scorer, generate_sample, thresholds_json, undisturbed, write_sample_files
from .trackers import log_to_trackers

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256


def as_prompts(prompts: Sequence[SpeechPrompt | str] | Mapping[str, str] | None) -> list[SpeechPrompt]:
    """``prompts`` as `SpeechPrompt` objects: a list of prompts or texts (named ``prompt0``, ...), or name -> text.

    Examples:
        >>> [p.name for p in as_prompts(["Hello.", SpeechPrompt("bye", "Bye.")])]
        ['prompt0', 'bye']
        >>> as_prompts([])
        Traceback (most recent call last):
        higgs_trainer.errors.UsageError: SpeechSamplesCallback got no prompts: pass at least one, e.g. [SpeechPrompt("hello", "Hello there.")]
    """
    if isinstance(prompts, Mapping):
        prompts = [SpeechPrompt(name, text) for name, text in prompts.items()]
    if isinstance(prompts, str | SpeechPrompt):
        prompts = [prompts]
    result = [p if isinstance(p, SpeechPrompt) else SpeechPrompt(f"prompt{i}", p) for i, p in enumerate(prompts or [])]
    if not result:
        raise UsageError(
            'SpeechSamplesCallback got no prompts: pass at least one, e.g. [SpeechPrompt("hello", "Hello there.")]'
        )
    names = [p.name for p in result]
    if len(set(names)) != len(names):
        raise UsageError(f"speech prompt names must differ (they name the files): got {names}")
    return result


def default_backend(processing_class: Any) -> SpeechBackend:
    """The backend for transformers' Higgs model when ``processing_class`` is its processor with a codec."""
    if processing_class is None or getattr(processing_class, "audio_tokenizer", None) is None:
        raise UsageError(
            "SpeechSamplesCallback has no codec to decode audio: pass backend=... (TransformersSpeechBackend(processor) "
            "for HiggsAudioV2ForConditionalGeneration, BosonSpeechBackend(...) for boson's HiggsAudioModel), or give "
            "the trainer processing_class=<HiggsAudioV2Processor with its audio_tokenizer>"
        )
    from .transformers_backend import TransformersSpeechBackend

    return TransformersSpeechBackend(processing_class)


def _sharded(args: Any) -> str | None:
    """'DeepSpeed ZeRO-3' or 'FSDP' when parameters are sharded across processes (generation would need them whole)."""
    if getattr(args, "fsdp", None):  # transformers 4.46: a list of options ([] when off); 5.x: True / None
        return "FSDP"
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None and hf_config.is_zero3():
        return "DeepSpeed ZeRO-3"
    return None


class SpeechSamplesCallback(TrainerCallback):
    """Speak ``prompts`` with the model at every checkpoint and final save; write, flag and log the samples.

    Pass it with ``callbacks=[...]`` to `HiggsLoraTrainer` or any trainer with `LoraAdapterSavingMixin`.

    Args:
        prompts: `SpeechPrompt` objects, texts, or a name -> text mapping; at least one.
        backend: the stack's `SpeechBackend`; default: `TransformersSpeechBackend` of the trainer's
            ``processing_class`` (a ``HiggsAudioV2Processor``). For boson's HiggsAudioModel pass its backend.
        max_new_tokens: generation's length limit (a sample that hits it is flagged ``runaway``).
        generation_kwargs: passed to generation; greedy (``do_sample=False``) unless they say otherwise.
        thresholds: where a sample counts as silent or collapsed (`FlagThresholds`).
        scorers: callables ``(prompt, waveform, sample_rate) -> {name: value}`` recorded under ``scores``.
        logits_processor: a ``LogitsProcessorList`` passed into generation (for tests and constrained decoding).
        log_audio: also log audio and spectrograms to TensorBoard / W&B when they are in ``report_to``.
    """

    def __init__(
        self,
        prompts: Sequence[SpeechPrompt | str] | Mapping[str, str],
        backend: SpeechBackend | None = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        generation_kwargs: Mapping[str, Any] | None = None,
        thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
        scorers: Sequence[Scorer] = (),
        logits_processor: Any = None,
        log_audio: bool = True,
    ) -> None:
        require_speech_extra()
        self.prompts = as_prompts(prompts)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.generation_kwargs = dict(generation_kwargs or {})
        self.thresholds = thresholds
        self.scorers = list(scorers)
        self.logits_processor = logits_processor
        self.log_audio = log_audio
        self.trainer: Any = None
        self.failed: list[str] = []  # "<save>/<prompt>: <cause>" of every failed sample
        self.seconds_spent = 0.0  # wall time spent sampling, all saves together
        self._skipped_reason: str | None = None

    # wiring

    def bind_trainer(self, trainer: Any) -> None:
        """Called by `LoraAdapterSavingMixin` when the trainer is constructed with this callback."""
        self.trainer = trainer

    def on_init_end(
        self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None, **kwargs: Any
    ) -> None:
        """Check what sampling needs when the trainer is constructed: the mixin, a LoRA model with audio output, a codec."""
        if self.trainer is None:
            raise UsageError(
                "SpeechSamplesCallback needs a trainer with LoraAdapterSavingMixin: use HiggsLoraTrainer or "
                "class MyTrainer(LoraAdapterSavingMixin, <your Trainer>)"
            )
        if self.backend is None:
            self.backend = default_backend(processing_class)
        if model is not None:  # with model_init the model exists only once train() starts
            self._check_model(model)
        self._skipped_reason = _sharded(args)

    def _check_model(self, model: torch.nn.Module) -> None:
        peft_model = find_lora_model(model, getattr(self.trainer, "lora_model_path", None)).model
        check = getattr(self.backend, "check_model", None)
        if check is not None:
            check(peft_model)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._skipped_reason:
            logger.warning(
                "speech samples are skipped under %s: generation needs the whole model on one process (sample from "
                "a saved checkpoint with `higgs-trainer speak` instead)",
                self._skipped_reason,
            )

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """After Trainer wrote ``checkpoint-N`` completely: sample into ``checkpoint-N/speech``."""
        checkpoint = Path(self.trainer._get_output_dir(trial=None)) / f"checkpoint-{state.global_step}"
        self.sample_into(checkpoint, global_step=state.global_step, require_checkpoint=True)

    def on_final_save(self, trainer: Any, output_dir: str | None) -> None:
        """Called by `LoraAdapterSavingMixin.save_model` after a save that is not a checkpoint (the final model)."""
        directory = Path(output_dir if output_dir is not None else trainer.args.output_dir)
        failed_before = len(self.failed)
        self.sample_into(directory, global_step=trainer.state.global_step, require_checkpoint=False)
        if len(self.failed) > failed_before:
            logger.error(
                "%d speech sample(s) failed at the final save of %s", len(self.failed) - failed_before, directory
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.should_save:
            return
        if self.failed:
            logger.error(
                "%d speech sample(s) failed during training (see speech.json in the checkpoints): %s",
                len(self.failed), "; ".join(self.failed[:3]) + (" ..." if len(self.failed) > 3 else ""),
            )  # fmt: skip
        else:
            logger.info("speech samples: none failed; %.1f s spent sampling", self.seconds_spent)

    # sampling

    def sample_into(self, directory: Path, *, global_step: int, require_checkpoint: bool) -> list[SampleRecord] | None:
        """Generate every prompt and write ``directory/speech`` (on the saving process; the others wait)."""
        trainer = self.trainer
        if self._skipped_reason:
            return None
        records = None
        if trainer.args.should_save:
            if require_checkpoint and not is_complete_checkpoint(directory):
                logger.warning("speech samples not written: %s is missing or incomplete", directory)
            else:
                started = time.perf_counter()
                records = self._sample_and_write(directory, global_step)
                self.seconds_spent += time.perf_counter() - started
        if trainer.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the others wait while the saving process samples
        return records

    def _sample_and_write(self, directory: Path, global_step: int) -> list[SampleRecord]:
        trainer = self.trainer
        root = trainer.model
        peft_model = find_lora_model(root, getattr(trainer, "lora_model_path", None)).model
        samples: list[Sample] = []
        records: list[SampleRecord] = []
        with undisturbed(root):
            for prompt in self.prompts:
                try:
                    sample = generate_sample(
                        peft_model, prompt, self.backend, max_new_tokens=self.max_new_tokens,
                        generation_kwargs=self.generation_kwargs, thresholds=self.thresholds, scorers=self.scorers,
                        logits_processor=self.logits_processor,
                    )  # fmt: skip
                except Exception as exc:  # an observation must not end the run: recorded, counted, reported
                    cause = f"{type(exc).__name__}: {first_line(exc)}"
                    logger.error("speech sample %r at %s failed: %s", prompt.name, directory.name, cause)
                    self.failed.append(f"{directory.name}/{prompt.name}: {cause}")
                    records.append(SampleRecord(name=prompt.name, text=prompt.text, reference_audio=prompt.reference_audio,
                                                reference_text=prompt.reference_text, error=cause))  # fmt: skip
                    continue
                samples.append(sample)
                records.append(sample.record)
        for sample in samples:
            for flag in sample.record.flags:
                logger.warning(
                    "speech sample %r at %s is degenerate (%s): %s", sample.record.name, directory.name, flag,
                    FLAG_MEANINGS[flag],
                )  # fmt: skip
        sample_rate = self.backend.sample_rate
        try:
            with staged_directory(directory / SPEECH_DIRNAME) as staging:
                for sample in samples:
                    write_sample_files(sample, staging, sample_rate, title=f"{directory.name} · {sample.record.name}")
                write_records(
                    staging / RECORD_NAME, records, checkpoint=directory.name, global_step=global_step,
                    sample_rate=sample_rate, generation=self.generation_settings(), thresholds=thresholds_json(self.thresholds),
                )  # fmt: skip
        except OSError as exc:
            cause = f"{type(exc).__name__}: {first_line(exc)}"
            logger.error("speech samples of %s could not be written: %s", directory.name, cause)
            self.failed.append(f"{directory.name}: {cause}")
            return records
        logger.info("speech samples of %s: %s", directory.name, directory / SPEECH_DIRNAME)
        if self.log_audio:
            log_to_trackers(trainer, samples, sample_rate, global_step)
        return records

    def generation_settings(self) -> dict[str, Any]:
        """How samples are generated, as recorded in ``speech.json``."""
        return {"do_sample": False, **self.generation_kwargs, "max_new_tokens": self.max_new_tokens}
