"""Speech samples at every save on the newest stack (examples/speak_with_adapter.py, `scripts/demo.sh --stack newest`).

Real components throughout: transformers' HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor and a tiny
random HiggsAudioV2TokenizerModel, HiggsLoraTrainer, peft; degenerate speech is forced through the model's own
generation loop by a logits processor, silence by a codec whose decoder outputs nothing.
"""

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from higgs_trainer import HiggsLoraTrainer, verify_adapter
from higgs_trainer.errors import LoraModelNotFoundError, MissingExtraError, UsageError
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_models import HIGGS_STACK

newest_stack = pytest.mark.skipif(
    HIGGS_STACK, reason="HiggsAudioV2ForConditionalGeneration ships with transformers 5.x"
)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "speak_with_adapter.py"
MAX_NEW = 12  # generation steps per sample: enough for a few frames, fast


def load_example():
    spec = importlib.util.spec_from_file_location("speak_with_adapter", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = load_example() if not HIGGS_STACK else None


def build_trainer(
    output_dir,
    callbacks,
    *,
    max_steps=2,
    save_steps=1,
    processor=None,
    report_to=(),
    seed=0,
    dropout=0.0,
    base_dir=None,
    eval_dataset=None,
    **arguments,
):
    """The example's tiny model, processor and data in HiggsLoraTrainer with ``callbacks`` (``arguments``: more
    TrainingArguments)."""
    processor = processor if processor is not None else ex.tiny_processor(ex.tiny_codec(seed))
    torch.manual_seed(seed)
    base = transformers.HiggsAudioV2ForConditionalGeneration(ex.tiny_model_config(processor), use_text_head=True)
    if base_dir is not None:  # what `speak --base` loads: the base before LoRA layers are injected
        ex.save_base(base_dir, base, processor)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    wrapper = ex.HiggsAudioModelWrapper(get_peft_model(base, lora))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=list(report_to), logging_steps=1,
        use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **arguments,
    )  # fmt: skip
    return HiggsLoraTrainer(
        model=wrapper, args=args, train_dataset=ex.ToneRequests(), data_collator=ex.Collator(processor),
        processing_class=processor, callbacks=list(callbacks), eval_dataset=eval_dataset,
    )  # fmt: skip


# Evaluate at every save, keep the best checkpoint by the speech WER (docs/choosing.md).
BEST_BY_WER = dict(
    eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="speech_wer",
    greater_is_better=False, per_device_eval_batch_size=2, label_names=["audio_labels"], prediction_loss_only=True,
)  # fmt: skip


def eval_tones():
    return torch.utils.data.Subset(ex.ToneRequests(), range(2))


def speech_callback(prompts=None, **kwargs):
    from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback

    prompts = prompts or [SpeechPrompt("high", ex.PROMPTS["high"])]
    return SpeechSamplesCallback(prompts, **{"max_new_tokens": MAX_NEW, **kwargs})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two steps saving at each, TensorBoard on, then the final save: samples in checkpoint-1, -2 and the output."""
    out = tmp_path_factory.mktemp("speech_run")
    callback = speech_callback()
    trainer = build_trainer(out, [callback], report_to=["tensorboard"], base_dir=out / "base_model")
    trainer.train()
    trainer.save_model()
    return out, callback


@newest_stack
def test_samples_are_written_into_every_checkpoint_and_the_final_save(trained_run):
    import soundfile

    out, callback = trained_run
    for directory in (out / "checkpoint-1", out / "checkpoint-2", out):
        speech = directory / "speech"
        assert sorted(p.name for p in speech.iterdir()) == ["high.png", "high.wav", "speech.json"]
        record = json.loads((speech / "speech.json").read_text())
        assert record["checkpoint"] == directory.name and record["sample_rate"] == ex.SAMPLE_RATE
        assert record["generation"] == {"do_sample": False, "max_new_tokens": MAX_NEW}
        (sample,) = record["samples"]
        assert sample["text"] == ex.PROMPTS["high"] and sample["scores"] == {} and sample["error"] is None
        waveform, rate = soundfile.read(speech / "high.wav")
        assert rate == ex.SAMPLE_RATE and len(waveform) / rate == pytest.approx(sample["seconds"], abs=1e-3)
        assert sample["frames"] * ex.tiny_codec().config.hop_length == len(waveform) > 0
        assert len(sample["codes_sha256"]) == 64 and "silence" not in sample["flags"]
        assert (speech / "high.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not list(directory.glob(".speech*"))  # no staging left behind
    verify_adapter(out / "checkpoint-2" / "lora_adapters")
    assert callback.failed == [] and callback.seconds_spent > 0


@newest_stack
def test_nothing_is_written_into_an_incomplete_checkpoint(trained_run, caplog):
    out, callback = trained_run
    torn = out / "checkpoint-7"
    torn.mkdir()  # as if the save had died before Trainer wrote trainer_state.json
    with caplog.at_level(logging.WARNING, logger="higgs_trainer"):
        assert callback.sample_into(torn, global_step=7, require_checkpoint=True) is None
    assert list(torn.iterdir()) == []
    assert any(
        "speech samples not written: " in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records
    )


@newest_stack
def test_samples_are_skipped_with_one_warning_under_zero3_and_fsdp(tmp_path, caplog):
    from higgs_trainer.speech.callback import _sharded

    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    sharded = {
        "DeepSpeed ZeRO-3": transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, deepspeed=zero3),
        "FSDP": transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True),
        None: transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
    }
    for expected, args in sharded.items():
        assert _sharded(args) == expected
    callback = speech_callback()
    callback._skipped_reason = "FSDP"
    with caplog.at_level(logging.WARNING, logger="higgs_trainer"):
        callback.on_train_begin(sharded["FSDP"], None, None)
    (record,) = [r for r in caplog.records if r.name.startswith("higgs_trainer")]
    assert "speech samples are skipped under FSDP" in record.getMessage()
    assert callback.sample_into(tmp_path, global_step=1, require_checkpoint=False) is None


@newest_stack
def test_tensorboard_gets_the_audio_and_spectrogram_at_each_save(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained_run
    (run,) = {p.parent for p in (out / "runs").rglob("events.out.tfevents.*")}  # TensorBoardCallback's default
    events = EventAccumulator(str(run), size_guidance={"audio": 0, "images": 0}).Reload()
    # checkpoint-1 and checkpoint-2 (the final save comes after train(), when TensorBoardCallback has closed its writer)
    assert [e.step for e in events.Audio("speech/high")] == [1, 2]
    assert events.Audio("speech/high")[0].sample_rate == ex.SAMPLE_RATE
    assert [e.step for e in events.Images("speech/high_mel")] == [1, 2]


@newest_stack
def test_speak_on_a_checkpoint_gives_the_codes_its_callback_heard(trained_run, capsys, tmp_path):
    out, _ = trained_run
    heard = json.loads((out / "checkpoint-1" / "speech" / "speech.json").read_text())["samples"][0]
    code, stdout, err = run_cli(
        capsys, "speak", "--base", out / "base_model", "--adapter", out / "checkpoint-1", "--text", ex.PROMPTS["high"],
        "--output", tmp_path / "high.wav", "--max-new-tokens", MAX_NEW, "--json",
    )  # fmt: skip
    assert code == 0, err
    spoken = json.loads(stdout)
    assert spoken["codes_sha256"] == heard["codes_sha256"] and spoken["frames"] == heard["frames"]
    assert spoken["adapter"] == str(out / "checkpoint-1" / "lora_adapters")
    assert (tmp_path / "high.wav").is_file() and (tmp_path / "high.png").is_file()
    # the run directory stands for its final adapter, which checkpoint-2 also holds: same codes as checkpoint-2's
    final = json.loads((out / "checkpoint-2" / "speech" / "speech.json").read_text())["samples"][0]
    code, stdout, err = run_cli(
        capsys, "speak", "--base", out / "base_model", "--adapter", out, "--text", ex.PROMPTS["high"],
        "--output", tmp_path / "final.wav", "--max-new-tokens", MAX_NEW,
    )  # fmt: skip
    assert code == 0 and final["codes_sha256"] in stdout, err


@newest_stack
def test_speak_errors_are_one_line(trained_run, capsys, tmp_path):
    out, _ = trained_run
    code, _, err = run_cli(capsys, "speak", "--base", out / "checkpoint-1" / "lora_adapters", "--adapter", out,
                           "--text", "say a tone", "--output", tmp_path / "x.wav")  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "is not a model directory")
    code, _, err = run_cli(capsys, "speak", "--base", out / "base_model", "--adapter", out,
                           "--text", "say a tone", "--output", tmp_path / "x.mp3")  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "must name a .wav file")


@newest_stack
def test_under_ddp_rank_0_samples_and_scores_the_other_rank_waits_and_agrees(tmp_path):
    from tests.testing_launch import torchrun

    torchrun("ddp_speech.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["sampled_until"]) == 2 and ranks[1]["sampled_until"] == []  # only rank 0 samples
    for step in range(2):  # rank 1 leaves on_save only once rank 0 has finished sampling that checkpoint
        assert ranks[1]["returned_at"][step] >= ranks[0]["sampled_until"][step]
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        assert (tmp_path / checkpoint / "speech" / "high.wav").is_file()
    # with scoring and metric_for_best_model="speech_wer": rank 0 scores, both ranks log its metrics and agree
    assert ranks[0]["scored"] == 2 and ranks[1]["scored"] == 0
    assert len(ranks[0]["wer"]) == 2 and ranks[1]["wer"] == ranks[0]["wer"]
    assert ranks[0]["best"] is not None and ranks[1]["best"] == ranks[0]["best"]


@newest_stack
def test_a_processor_with_a_chat_template_prompts_through_it(tmp_path):
    """With a chat template (as real checkpoints' processors have), prompts and reference clips go through it."""
    import soundfile

    from higgs_trainer.speech import SpeechPrompt, TransformersSpeechBackend

    processor = ex.tiny_processor()
    model = get_peft_model(ex_base().eval(), LoraConfig(r=2, target_modules=["q_proj"]))
    soundfile.write(tmp_path / "ref.wav", ex.tone("low"), 16000)  # another rate: resampled to the codec's
    prompts = [SpeechPrompt("a", "say a high tone"), SpeechPrompt("b", "say a high tone", str(tmp_path / "ref.wav"), "say a low tone")]  # fmt: skip

    def codes():
        backend = TransformersSpeechBackend(processor)
        return [backend.generate(model, p, max_new_tokens=8, generation_kwargs={}).codes for p in prompts]

    plain = codes()
    processor.chat_template = (  # renders the same text as the plain prompt
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% else %}"
        "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|> {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}<|audio_out_bos|>{% endif %}"
    )
    chat = codes()
    assert all(c.shape[1] > 0 for c in chat)
    assert [torch.equal(a, b) for a, b in zip(plain, chat, strict=True)] == [True, True]
    assert not torch.equal(chat[0], chat[1])  # the reference clip is in the prompt


@newest_stack
def test_sampling_does_not_disturb_training(tmp_path):
    """Sampled (with do_sample=True, dropout on) or not, the trained adapter is the same: RNG and train modes restored."""
    from safetensors.torch import load_file

    adapters = []
    for name, callbacks in (("plain", []), ("sampled", [speech_callback(generation_kwargs={"do_sample": True})])):
        trainer = build_trainer(tmp_path / name, callbacks, max_steps=2, save_steps=1, dropout=0.3)
        trainer.train()
        assert trainer.model.training
        adapters.append(load_file(tmp_path / name / "checkpoint-2" / "lora_adapters" / "adapter_model.safetensors"))
    assert (tmp_path / "sampled" / "checkpoint-1" / "speech" / "high.wav").is_file()
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


class ScriptedAudio(transformers.InfNanRemoveLogitsProcessor):
    """Forces degenerate audio through HiggsAudioV2's own generation loop, by the prompt's word.

    transformers' Higgs generation accepts only the score-only processors it lists (subclasses included); this one
    runs after its delay-pattern processor on per-codebook scores, and leaves the rows that processor forced alone.
    "low": stream EOS at once (no audio); "high": code 5 in every codebook, then EOS (collapse); "please": never
    EOS (run-away).
    """

    def __init__(self, processor, eos):
        self.ids = {w: processor.tokenizer.convert_tokens_to_ids(w) for w in ("low", "high", "please")}
        self.audio_bos = processor.audio_bos_token_id
        self.eos = eos

    def __call__(self, input_ids, scores):
        free = torch.isfinite(scores).sum(-1) > 1  # rows the delay pattern did not force to stream BOS/EOS
        words = set(input_ids[0].tolist())
        steps = input_ids.shape[1] - 1 - int((input_ids[0] == self.audio_bos).nonzero()[-1, 0])
        forced = scores.clone()
        if self.ids["low"] in words:
            forced[free] = -float("inf")
            forced[free, self.eos] = 0.0
        elif self.ids["high"] in words:
            code = 5 if steps < 10 else self.eos
            forced[free] = -float("inf")
            forced[free, code] = 0.0
        elif self.ids["please"] in words:
            forced[free, self.eos] = -float("inf")
        return forced


@newest_stack
def test_degenerate_speech_is_flagged_from_real_generations(tmp_path, caplog):
    from higgs_trainer.speech import SpeechPrompt

    processor = ex.tiny_processor(ex.tiny_codec())
    prompts = [SpeechPrompt("noaudio", "low"), SpeechPrompt("collapse", "high"), SpeechPrompt("runaway", "please")]
    scripted = transformers.LogitsProcessorList([ScriptedAudio(processor, ex.STREAM_EOS)])
    callback = speech_callback(prompts, logits_processor=scripted)
    trainer = build_trainer(tmp_path, [callback], max_steps=1, save_steps=1, processor=processor)
    with caplog.at_level(logging.WARNING, logger="higgs_trainer"):
        trainer.train()
    samples = {s["name"]: s for s in json.loads((tmp_path / "checkpoint-1/speech/speech.json").read_text())["samples"]}
    assert samples["noaudio"]["flags"] == ["no_audio"] and samples["noaudio"]["frames"] == 0
    assert samples["collapse"]["flags"] == ["collapse"] and samples["collapse"]["ended"] is True
    assert "runaway" in samples["runaway"]["flags"] and samples["runaway"]["ended"] is False
    for name, flag in (("noaudio", "no_audio"), ("collapse", "collapse"), ("runaway", "runaway")):
        assert any(f"'{name}' at checkpoint-1 is degenerate ({flag})" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoint-1/speech/collapse.wav").is_file()


@newest_stack
def test_silence_from_a_codec_that_outputs_nothing_is_flagged(tmp_path, caplog):
    codec = ex.tiny_codec()
    with torch.no_grad():
        for parameter in codec.acoustic_decoder.parameters():
            parameter.zero_()  # the decoder outputs zeros: silence whatever the codes
    trainer = build_trainer(
        tmp_path, [speech_callback()], max_steps=1, save_steps=1, processor=ex.tiny_processor(codec)
    )
    with caplog.at_level(logging.WARNING, logger="higgs_trainer"):
        trainer.train()
    (sample,) = json.loads((tmp_path / "checkpoint-1/speech/speech.json").read_text())["samples"]
    assert "silence" in sample["flags"] and sample["frames"] > 0
    assert any("'high' at checkpoint-1 is degenerate (silence)" in r.getMessage() for r in caplog.records)


@newest_stack
def test_a_failing_sample_is_recorded_and_training_goes_on(tmp_path, caplog):
    from higgs_trainer.speech import SpeechPrompt

    prompts = [SpeechPrompt("cloned", "say a tone", reference_audio=str(tmp_path / "missing.wav")),
               SpeechPrompt("high", ex.PROMPTS["high"])]  # fmt: skip
    callback = speech_callback(prompts)
    trainer = build_trainer(tmp_path / "run", [callback], max_steps=2, save_steps=1)
    with caplog.at_level(logging.WARNING, logger="higgs_trainer"):
        trainer.train()
    assert trainer.state.global_step == 2
    samples = {
        s["name"]: s for s in json.loads((tmp_path / "run/checkpoint-2/speech/speech.json").read_text())["samples"]
    }
    assert "cannot read the reference clip" in samples["cloned"]["error"] and samples["cloned"]["wav"] is None
    assert samples["high"]["error"] is None and (tmp_path / "run/checkpoint-2/speech/high.wav").is_file()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("'cloned' at checkpoint-1 failed: UsageError: cannot read the reference clip" in m for m in errors)
    assert any(m.startswith("2 speech sample(s) failed during training") for m in errors)


@newest_stack
def test_bad_input_is_caught_when_the_trainer_is_constructed(tmp_path):
    from higgs_trainer.speech import SpeechSamplesCallback

    with pytest.raises(UsageError, match="got no prompts"):
        SpeechSamplesCallback([])
    with pytest.raises(UsageError, match="has no codec to decode audio: pass backend="):
        build_trainer(tmp_path, [speech_callback()], processor=ex.tiny_processor()).__class__(
            model=ex.HiggsAudioModelWrapper(get_peft_model(ex_base(), LoraConfig(r=2, target_modules=["q_proj"]))),
            args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            callbacks=[speech_callback()],
        )  # fmt: skip
    text_only = torch.nn.Module()
    text_only.model = get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
        LoraConfig(r=2, target_modules=["q_proj"]))  # fmt: skip
    with pytest.raises(UsageError, match="need a model with audio output, but the LoRA model wraps LlamaForCausalLM"):
        HiggsLoraTrainer(
            model=text_only, args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            processing_class=ex.tiny_processor(), callbacks=[speech_callback()],
        )  # fmt: skip
    with pytest.raises(UsageError, match="needs a trainer with LoraAdapterSavingMixin"):
        transformers.Trainer(
            model=text_only, args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            callbacks=[speech_callback()],
        )  # fmt: skip
    with pytest.raises(LoraModelNotFoundError):
        HiggsLoraTrainer(
            model=ex_base(), args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            processing_class=ex.tiny_processor(), callbacks=[speech_callback()],
        )  # fmt: skip


def ex_base():
    return transformers.HiggsAudioV2ForConditionalGeneration(ex.tiny_model_config(ex.tiny_processor()))


def test_without_the_speech_extra_callback_and_speak_fail_at_once(monkeypatch, tmp_path, capsys):
    from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback

    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile raises ImportError
    with pytest.raises(
        MissingExtraError, match=r'need soundfile, which is not installed: pip install "higgs-trainer\[speech\]"'
    ):
        SpeechSamplesCallback([SpeechPrompt("a", "b")])
    code, _, err = run_cli(
        capsys, "speak", "--base", tmp_path, "--adapter", tmp_path, "--text", "hi", "--output", tmp_path / "a.wav"
    )
    assert code == 1
    assert_one_line_error(err, 'pip install "higgs-trainer[speech]"')


def test_the_library_imports_without_the_speech_extra():
    code = (
        "import sys; sys.modules['soundfile'] = sys.modules['matplotlib'] = None\n"  # as if not installed
        "import higgs_trainer, higgs_trainer.speech, higgs_trainer.cli.speak; print('imported')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("imported"), result.stderr


@newest_stack
def test_the_demo_prints_where_the_samples_of_every_save_are(tmp_path, capsys):
    assert ex.main(["--output-dir", str(tmp_path), "--max-steps", "2", "--max-new-tokens", str(MAX_NEW)]) == 0
    out = capsys.readouterr().out
    for directory in (tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", tmp_path):
        assert f"  {directory / 'speech'}: low.wav " in out and (directory / "speech" / "high.wav").is_file()
    assert "same codes as checkpoint-2/speech/high.wav: True" in out
    page = tmp_path / "speech.html"  # rewritten by the callback after each save: checkpoint-1, -2 and the final save
    assert f"Listening page (every checkpoint side by side, opens from disk): {page}\n" in out
    assert page.read_text().count('<tr class="checkpoint') == 3
    assert f"higgs-trainer speak --base {tmp_path}/base_model --adapter {tmp_path / 'checkpoint-2'}" in out


def test_flags_on_codes_and_waveforms():
    from higgs_trainer.speech.backend import GeneratedSpeech
    from higgs_trainer.speech.flags import speech_flags

    varied = torch.arange(40).reshape(4, 10) % 7
    loud = np.full(4800, 0.1, dtype=np.float32)
    assert speech_flags(GeneratedSpeech(varied, ended=True, audio_started=True), loud) == []
    assert speech_flags(GeneratedSpeech(varied, ended=True, audio_started=True), loud * 1e-3) == ["silence"]
    assert speech_flags(GeneratedSpeech(varied[:, :0], ended=True, audio_started=False), loud) == ["no_audio"]


@newest_stack
def test_the_best_checkpoint_follows_the_speech_metric_not_the_loss(tmp_path):
    """metric_for_best_model="speech_wer": the trainer keeps (and reloads) the checkpoint whose samples score best,
    from samples generated once per save, at the evaluation, and written into that checkpoint."""
    from tests.testing_speech_models import LossMirroringScoring, assert_best_follows_the_speech_metric

    scoring = LossMirroringScoring()
    trainer = build_trainer(
        tmp_path, [speech_callback(scoring=scoring)], max_steps=3, eval_dataset=eval_tones(), **BEST_BY_WER
    )
    scoring.trainer = trainer
    trainer.train()
    trainer.save_model()
    assert_best_follows_the_speech_metric(trainer, scoring, tmp_path, steps=3)


@newest_stack
def test_a_real_tiny_whisper_scores_every_save_through_the_callback(tmp_path):
    """SpeechScoring with a Whisper model saved to disk: scores in speech.json, eval_speech_* in the metrics the trainer
    chose from, speech_* logged at a save without evaluation, and the page rewritten after each save."""
    from higgs_trainer.speech import SpeechPrompt, SpeechScoring
    from tests.testing_speech_models import save_tiny_whisper

    prompts = [SpeechPrompt("high", ex.PROMPTS["high"])]
    scoring = SpeechScoring(prompts, asr_model=save_tiny_whisper(tmp_path / "whisper"))
    trainer = build_trainer(
        tmp_path / "run", [speech_callback(prompts, scoring=scoring)], max_steps=2, eval_dataset=eval_tones(),
        **BEST_BY_WER,
    )  # fmt: skip
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_speech_wer" in e]
    assert [e["step"] for e in logged] == [1, 2]
    for entry in logged:
        record = json.loads((tmp_path / "run" / f"checkpoint-{entry['step']}" / "speech" / "speech.json").read_text())
        (sample,) = record["samples"]
        scores = sample["scores"]
        assert sorted(scores) == ["cer", "transcript", "wer"] and isinstance(scores["transcript"], str)
        assert (entry["eval_speech_wer"], entry["eval_speech_cer"]) == (scores["wer"], scores["cer"])
        assert entry["eval_speech_degenerate"] == float(bool(sample["flags"]))
    best = min(logged, key=lambda e: e["eval_speech_wer"])["step"]  # the first of equals, as the trainer's np.less
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{best}"
    page = (tmp_path / "run" / "speech.html").read_text()
    assert page.count('<tr class="checkpoint') == 2 and f'data-checkpoint="checkpoint-{best}"' in page
    # without evaluation, the scores of each save are logged as speech_*
    plain = build_trainer(tmp_path / "plain", [speech_callback(prompts, scoring=scoring)], max_steps=1)
    plain.train()
    (entry,) = [e for e in plain.state.log_history if "speech_wer" in e]
    assert entry["step"] == 1 and not any(k.startswith("eval_") for k in entry)


@newest_stack
def test_a_speech_best_metric_nothing_produces_fails_when_the_trainer_is_constructed(tmp_path):
    from higgs_trainer.errors import SpeechScorerError
    from tests.testing_speech_models import LossMirroringScoring

    no_similarity = r"no configured speech score produces 'speech_similarity'.*speaker_model="
    with pytest.raises(SpeechScorerError, match=no_similarity):
        build_trainer(tmp_path, [speech_callback(scoring=LossMirroringScoring())], eval_dataset=eval_tones(),
                      **{**BEST_BY_WER, "metric_for_best_model": "speech_similarity", "greater_is_better": True})  # fmt: skip
    with pytest.raises(SpeechScorerError, match="no configured speech score produces 'speech_wer'"):
        build_trainer(tmp_path, [speech_callback()], eval_dataset=eval_tones(), **BEST_BY_WER)  # no scoring at all
    with pytest.raises(UsageError, match="eval_strategy is 'no': set eval_strategy to the save_strategy"):
        build_trainer(tmp_path, [speech_callback(scoring=LossMirroringScoring())], metric_for_best_model="speech_wer")
