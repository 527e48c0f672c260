"""Hear every checkpoint: `SpeechSamplesCallback` speaks fixed prompts with the model as trained so far at every save.

At every ``checkpoint-N`` (after Trainer has written it completely) and at the final ``save_model``, each prompt is
generated (greedy by default) on the process that saves and written as ``speech/<name>.wav``, ``speech/<name>.png``
(mel spectrogram) and ``speech/speech.json`` (prompt, seconds, frames, sha256 of the codes, flags, scores), the
``speech/`` directory atomically. Training is not disturbed: eval mode and no_grad while sampling, train modes and
RNG states restored after; under DDP the other processes wait. TensorBoard and W&B, when in ``report_to``, get the
audio and the spectrogram at that step. Degenerate samples (see `higgs_trainer.speech.flags`) are WARNINGs; a
sample that fails is an ERROR, recorded, and training goes on.

With ``scoring=SpeechScoring(...)`` each sample is also scored (ASR error rates, speaker similarity), the scores go
into ``speech.json`` and their means (`higgs_trainer.speech.scoring`) are logged at that step. At an evaluation the
samples are generated and scored in ``on_evaluate`` (and kept for the checkpoint saved at that step), so the metrics
dict Trainer chooses the best checkpoint from holds ``eval_speech_wer``, ... : ``metric_for_best_model="speech_wer"``
with ``load_best_model_at_end=True`` keeps the checkpoint that reads its prompts best. After each save the saving
process rewrites ``OUTPUT_DIR/speech.html`` (`write_speech_page`).

Examples:
    ```python
    from higgs_trainer import HiggsLoraTrainer
    from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback

    prompts = [SpeechPrompt("hello", "Hello there.")]
    speech = SpeechSamplesCallback(prompts)  # backend from processing_class
    # or scored, to choose the checkpoint: metric_for_best_model="speech_wer", eval_strategy=save_strategy
    speech = SpeechSamplesCallback(prompts, scoring=SpeechScoring(prompts, asr_model="openai/whisper-base"))
    trainer = HiggsLoraTrainer(model=wrapper, args=args, train_dataset=ds, processing_class=processor, callbacks=[speech])
    trainer.train()  # checkpoint-N/speech/hello.wav, hello.png, speech.json
    ```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..errors import UsageError, first_line
from ..files.atomic import staged_directory
from ..files.runs import CHECKPOINT_PREFIX, is_complete_checkpoint
from ..training.discovery import find_lora_model
from .audio_files import require_speech_extra
from .backend import SpeechBackend, SpeechPrompt
from .flags import DEFAULT_THRESHOLDS, FLAG_MEANINGS, FlagThresholds
from .page import write_speech_page
from .records import RECORD_NAME, SPEECH_DIRNAME, SampleRecord, write_records
from .sampling import Sample, Scorer, generate_sample, thresholds_json, undisturbed, write_sample_files
from .scoring import DEGENERATE, SampleScores, SpeechScoring, as_eval_metrics, check_best_metric, summarize
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


@dataclass
class SavedSamples:
    """One save's samples (``samples``: the ones that generated; ``records``: every prompt's) and their metrics."""

    global_step: int
    samples: list[Sample]
    records: list[SampleRecord]
    metrics: dict[str, float]


def _eval_prefix(metrics: Mapping[str, Any]) -> str:
    """The prefix of an evaluation's metrics (``eval_``, or ``eval_<name>_`` for one of several eval datasets)."""
    runtime = next((key for key in metrics if key.endswith("_runtime")), None)
    return runtime.removesuffix("runtime") if runtime else "eval_"


def _agreed(metrics: dict[str, float] | None, args: Any) -> dict[str, float] | None:
    """``metrics`` of the saving process (rank 0) on every process, so all of them choose the same best checkpoint."""
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [metrics]
        torch.distributed.broadcast_object_list(shared, src=0)  # the others wait here while rank 0 samples
        return shared[0]
    return metrics


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
        scoring: a `SpeechScoring` (ASR and/or speaker model, built with the same prompts): each sample's scores
            go into ``speech.json`` and their means (``speech_wer``, ``speech_cer``, ``speech_similarity``,
            ``speech_degenerate``) are logged at each save, and added to the evaluation's metrics (``eval_speech_wer``
            ...) for ``metric_for_best_model``.
        write_page: rewrite ``OUTPUT_DIR/speech.html`` after each save.
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
        scoring: SpeechScoring | None = None,
        logits_processor: Any = None,
        log_audio: bool = True,
        write_page: bool = True,
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
        self.scoring = scoring
        self.logits_processor = logits_processor
        self.log_audio = log_audio
        self.write_page = write_page
        self.trainer: Any = None
        self.failed: list[str] = []  # "<save>/<prompt>: <cause>" of every failed sample
        self.seconds_spent = 0.0  # wall time spent sampling, all saves together
        self._skipped_reason: str | None = None
        self._at_evaluation = False  # generate and score at each evaluation (scoring, or a speech best metric)
        self._evaluated: SavedSamples | None = None  # the samples of the last evaluation, for its checkpoint

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
        self._check_best_metric(args)

    def _check_best_metric(self, args: Any) -> None:
        """A speech ``metric_for_best_model`` must be one we produce, at evaluations, on an unsharded model."""
        produced = self.scoring.metrics if self.scoring is not None else (DEGENERATE,)
        speech_best = check_best_metric(args.metric_for_best_model, produced)
        if speech_best and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise UsageError(
                f"metric_for_best_model={args.metric_for_best_model!r} is added to the evaluation's metrics, but "
                f"eval_strategy is 'no': set eval_strategy to the save_strategy ({args.save_strategy!r}), with "
                "eval_steps=save_steps, and pass eval_dataset"
            )
        if speech_best and self._skipped_reason:
            raise UsageError(
                f"metric_for_best_model={args.metric_for_best_model!r} needs speech samples, which are skipped under "
                f"{self._skipped_reason}: choose another metric, or train without sharding the parameters"
            )
        self._at_evaluation = self.scoring is not None or speech_best

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

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        """At an evaluation: generate and score (once per step), add ``eval_speech_*`` to ``metrics`` and log them.

        Trainer decides the best checkpoint from this very dict once the callbacks return, before ``on_save``;
        the samples are kept and written into the checkpoint saved at this step, not generated again.
        """
        if not self._at_evaluation or self._skipped_reason or metrics is None:
            return
        evaluated = self._evaluated if self._evaluated and self._evaluated.global_step == state.global_step else None
        if evaluated is None and args.should_save:
            started = time.perf_counter()
            evaluated = self._generate(f"step {state.global_step}", state.global_step)
            self.seconds_spent += time.perf_counter() - started
        self._evaluated = evaluated
        speech_metrics = _agreed(evaluated.metrics if evaluated else None, args) or {}
        named = as_eval_metrics(speech_metrics, prefix=_eval_prefix(metrics))
        metrics.update(named)
        if named:
            self.trainer.log(dict(named))

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """After Trainer wrote ``checkpoint-N`` completely: sample into ``checkpoint-N/speech``, rewrite the page."""
        output_dir = Path(self.trainer._get_output_dir(trial=None))
        checkpoint = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        self.sample_into(checkpoint, global_step=state.global_step, require_checkpoint=True)
        if self.write_page and args.should_save and not self._skipped_reason:
            self._write_page(output_dir)

    def on_final_save(self, trainer: Any, output_dir: str | None) -> None:
        """Called by `LoraAdapterSavingMixin.save_model` after a save that is not a checkpoint (the final model)."""
        directory = Path(output_dir if output_dir is not None else trainer.args.output_dir)
        failed_before = len(self.failed)
        self.sample_into(directory, global_step=trainer.state.global_step, require_checkpoint=False, log=False)
        if self.write_page and trainer.args.should_save and not self._skipped_reason:
            self._write_page(Path(trainer.args.output_dir))
        if len(self.failed) > failed_before:
            logger.error(
                "%d speech sample(s) failed at the final save of %s", len(self.failed) - failed_before, directory
            )

    def _write_page(self, run_dir: Path) -> None:
        try:
            page = write_speech_page(run_dir)
        except Exception as exc:  # the page is a view of what is on disk: it must not end the run
            logger.error("speech page of %s not written: %s: %s", run_dir, type(exc).__name__, first_line(exc))
            return
        logger.info("speech page: %s", page)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._evaluated = None  # load_best_model_at_end may have changed the weights at this step
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

    def sample_into(
        self, directory: Path, *, global_step: int, require_checkpoint: bool, log: bool = True
    ) -> list[SampleRecord] | None:
        """Write ``directory/speech``: the samples of this step's evaluation, or generated now (on the saving
        process; the others wait). With scoring and no evaluation at this step, ``speech_*`` are logged (``log``)."""
        trainer = self.trainer
        if self._skipped_reason:
            return None
        evaluated, self._evaluated = self._evaluated, None
        if evaluated is not None and evaluated.global_step != global_step:
            evaluated = None
        saved = None
        if trainer.args.should_save:
            if require_checkpoint and not is_complete_checkpoint(directory):
                logger.warning("speech samples not written: %s is missing or incomplete", directory)
            else:
                started = time.perf_counter()
                saved = evaluated or self._generate(directory.name, global_step)
                self._write(directory, saved)
                self.seconds_spent += time.perf_counter() - started
        metrics = saved.metrics if saved is not None and evaluated is None else None
        metrics = _agreed(metrics, trainer.args)  # every process waits for the saving one, and logs the same
        if metrics and log and self.scoring is not None:
            trainer.log(dict(metrics))
        return saved.records if saved is not None else None

    def _generate(self, where: str, global_step: int) -> SavedSamples:
        """Generate (and score) every prompt with the model as it is now; a failure is recorded, not raised."""
        trainer = self.trainer
        root = trainer.model
        peft_model = find_lora_model(root, getattr(trainer, "lora_model_path", None)).model
        samples: list[Sample] = []
        records: list[SampleRecord] = []
        scores: list[SampleScores] = []
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
                    logger.error("speech sample %r at %s failed: %s", prompt.name, where, cause)
                    self.failed.append(f"{where}/{prompt.name}: {cause}")
                    record = SampleRecord(name=prompt.name, text=prompt.text, reference_audio=prompt.reference_audio,
                                          reference_text=prompt.reference_text, error=cause)  # fmt: skip
                    records.append(record)
                    scores.extend(self._score(prompt, record, np.zeros(0, dtype=np.float32), where))
                    continue
                samples.append(sample)
                records.append(sample.record)
                scores.extend(self._score(prompt, sample.record, sample.waveform, where))
        for sample in samples:
            for flag in sample.record.flags:
                logger.warning(
                    "speech sample %r at %s is degenerate (%s): %s", sample.record.name, where, flag,
                    FLAG_MEANINGS[flag],
                )  # fmt: skip
        degenerate = sum(1 for record in records if record.flags or record.error)
        return SavedSamples(global_step, samples, records, summarize(scores, degenerate=degenerate))

    def _score(
        self, prompt: SpeechPrompt, record: SampleRecord, waveform: np.ndarray, where: str
    ) -> list[SampleScores]:
        """Score one sample (a failed one as no audio: what it is worth) into its record; [] without scoring."""
        if self.scoring is None:
            return []
        try:
            scores = self.scoring.score(prompt, waveform, self.backend.sample_rate)
        except Exception as exc:  # a scorer that fails must not end the run either: no audio's scores instead
            cause = f"{type(exc).__name__}: {first_line(exc)}"
            logger.error("speech sample %r at %s could not be scored: %s", prompt.name, where, cause)
            self.failed.append(f"{where}/{prompt.name}: scoring: {cause}")
            scores = self.scoring.score(prompt, np.zeros(0, dtype=np.float32), self.backend.sample_rate)
        record.scores.update(scores.as_record())
        return [scores]

    def _write(self, directory: Path, saved: SavedSamples) -> None:
        """Write ``directory/speech`` atomically, and log the audio to the trackers."""
        trainer, samples, records, global_step = self.trainer, saved.samples, saved.records, saved.global_step
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
            return
        logger.info("speech samples of %s: %s", directory.name, directory / SPEECH_DIRNAME)
        if self.log_audio:
            log_to_trackers(trainer, samples, sample_rate, global_step)

    def generation_settings(self) -> dict[str, Any]:
        """How samples are generated, as recorded in ``speech.json``."""
        return {"do_sample": False, **self.generation_kwargs, "max_new_tokens": self.max_new_tokens}
