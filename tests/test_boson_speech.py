"""Speech on the Higgs stack: boson's HiggsAudioModel.generate and boson's audio tokenizer, tiny and random."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

from higgs_trainer.errors import UsageError
from higgs_trainer.speech.backend import SpeechPrompt
from tests.testing_models import HIGGS_STACK

pytestmark = pytest.mark.skipif(not HIGGS_STACK, reason="boson_multimodal's HiggsAudioModel runs on transformers 4.46")
PROMPT = SpeechPrompt("hello", "Hello there.")
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def speech():
    from tests import testing_boson_speech

    return testing_boson_speech


@pytest.fixture(scope="module")
def backend(speech):
    return speech.tiny_backend()


@pytest.fixture(scope="module")
def model(speech):
    return speech.tiny_speech_model()


class AudioScores(LogitsProcessor):
    """Rewrites the audio steps' scores (boson's loop calls processors with input_ids=None there)."""

    def __init__(self, rewrite):
        self.rewrite = rewrite
        self.audio_steps = 0

    def __call__(self, input_ids, scores):
        if input_ids is None:
            self.audio_steps += 1
            scores = self.rewrite(scores.clone())
        return scores


def stream_eos_at_once(scores):
    scores[:] = -float("inf")
    scores[:, -1] = 0.0  # the stream EOS, codebook_size + 1
    return scores


def never_stream_eos(scores):
    scores[:, -1] = -float("inf")
    return scores


def generate(backend, model, prompt=PROMPT, **kwargs):
    return backend.generate(model, prompt, max_new_tokens=MAX_NEW_TOKENS, generation_kwargs={}, **kwargs)


def test_generation_decodes_to_a_float32_waveform_at_the_codec_rate(backend, model, speech):
    result = generate(backend, model)
    assert result.audio_started and result.codes.dtype == torch.long
    assert result.codes.shape[0] == speech.CODEBOOKS and 0 < result.codes.shape[1] <= MAX_NEW_TOKENS
    assert int(result.codes.max()) < speech.CODES  # no stream BOS/EOS left in the codes
    waveform = backend.decode(result.codes)
    assert backend.sample_rate == speech.SAMPLE_RATE
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert len(waveform) == result.codes.shape[1] * int(np.prod(speech.RATIOS))
    assert np.isfinite(waveform).all() and np.abs(waveform).max() > 0


def test_greedy_generation_is_reproducible(backend, model):
    first, second = generate(backend, model), generate(backend, model)
    assert torch.equal(first.codes, second.codes) and first.ended == second.ended


def test_a_lora_adapter_that_changed_weights_changes_the_codes(backend, speech):
    peft_model = get_peft_model(
        speech.tiny_speech_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    with peft_model.disable_adapter():
        base_codes = generate(backend, peft_model).codes
    assert torch.equal(base_codes, generate(backend, speech.tiny_speech_model()).codes)
    adapted = generate(backend, peft_model)  # the PeftModel itself, LoRA active
    assert not torch.equal(adapted.codes, base_codes)


def test_audio_end_at_once_is_no_audio(backend, model):
    forced = AudioScores(stream_eos_at_once)
    result = generate(backend, model, logits_processor=LogitsProcessorList([forced]))
    assert forced.audio_steps > 0  # it ran inside boson's generation loop
    assert (result.ended, result.audio_started, result.codes.shape) == (True, False, (4, 0))
    assert backend.decode(result.codes).shape == (0,)


def test_an_audio_end_after_some_frames_ends_the_clip_there(backend, model, speech):
    frames = 5

    def first_codebook_ends_after_frames(scores):
        scores = never_stream_eos(scores)
        if forced.audio_steps > frames:  # as a trained model ends: codebook 0 first, boson's loop ends the others
            scores[0] = -float("inf")
            scores[0, -1] = 0.0
        return scores

    forced = AudioScores(first_codebook_ends_after_frames)
    result = generate(backend, model, logits_processor=LogitsProcessorList([forced]))
    assert (result.ended, result.audio_started) == (True, True)
    assert result.codes.shape == (speech.CODEBOOKS, frames)  # the stream EOS columns are not codes
    # boson's loop stops the codebooks one by one (delay pattern), then <|audio_eos|> ends generation
    assert forced.audio_steps == frames + speech.CODEBOOKS


def test_generation_kwargs_reach_boson_generate(backend, model):
    greedy = generate(backend, model)
    as_dict = backend.generate(
        model, PROMPT, max_new_tokens=MAX_NEW_TOKENS, generation_kwargs={"return_dict_in_generate": True}
    )
    assert torch.equal(as_dict.codes, greedy.codes)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": None, "seed": 7}
    sampled = [
        backend.generate(model, PROMPT, max_new_tokens=MAX_NEW_TOKENS, generation_kwargs=sampling) for _ in range(2)
    ]
    assert torch.equal(sampled[0].codes, sampled[1].codes)  # boson's loop seeds its own generator
    assert not torch.equal(sampled[0].codes, greedy.codes)


def test_no_audio_end_runs_away_to_the_length_limit(backend, model, speech):
    forced = AudioScores(never_stream_eos)
    result = generate(backend, model, logits_processor=LogitsProcessorList([forced]))
    assert (result.ended, result.audio_started) == (False, True)
    # one step opens the stream (BOS column); the delay pattern holds back the last CODEBOOKS - 1 columns
    assert forced.audio_steps == MAX_NEW_TOKENS - 1
    assert result.codes.shape == (speech.CODEBOOKS, MAX_NEW_TOKENS - speech.CODEBOOKS)


@pytest.mark.parametrize("transcript", ["Reference words.", None])
def test_a_reference_clip_conditions_generation(backend, model, speech, tmp_path, transcript):
    import soundfile  # the Higgs stack's, with boson's codec

    clip = tmp_path / "voice.wav"
    rate = 8000  # not the codec's rate: the backend resamples
    soundfile.write(clip, np.random.default_rng(0).uniform(-0.5, 0.5, rate // 10).astype(np.float32), rate)
    prompt = SpeechPrompt("cloned", "Hello there.", reference_audio=str(clip), reference_text=transcript)
    inputs = backend.prompt_inputs(model, prompt)
    # 0.1 s at 50 frames a second, with stream BOS and EOS, in the delay pattern (CODEBOOKS - 1 more columns)
    reference_columns = 5 + 2 + speech.CODEBOOKS - 1
    if transcript is not None:  # the clip is the assistant's earlier speech: audio-out context
        assert inputs["audio_out_ids"].shape == (4, reference_columns)
    else:  # the clip describes SPEAKER0 in the system turn: audio-in codes
        assert inputs["audio_in_ids"].shape == (4, reference_columns) and inputs["audio_out_ids"].numel() == 0
    result = generate(backend, model, prompt)
    assert result.audio_started
    assert not torch.equal(result.codes, generate(backend, model).codes[:, : result.codes.shape[1]])


def test_bad_inputs_fail_with_one_line(backend, speech, model, tmp_path):
    from higgs_trainer.speech.boson_backend import BosonSpeechBackend, load_audio_tokenizer, load_boson_speaker

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "?": 1}, unk_token="?")))
    with pytest.raises(UsageError, match=r"lacks boson's special tokens <\|start_header_id\|>"):
        BosonSpeechBackend(plain, backend.audio_tokenizer)
    other_codec = speech.tiny_speech_model()
    other_codec.config.audio_codebook_size = 1024
    with pytest.raises(UsageError, match="4 codebooks of 32 codes but the model 4 of 1024"):
        generate(backend, other_codec)
    with pytest.raises(UsageError, match="not boson's HiggsAudioModel"):
        generate(backend, torch.nn.Linear(2, 2))
    with pytest.raises(UsageError, match="no boson audio tokenizer at .*: pass --codec DIR"):
        load_boson_speaker("missing-base")
    codec = tmp_path / "codec"
    codec.mkdir()
    (codec / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"codec is not a boson audio tokenizer: cannot read config.json \(Expecting"):
        load_audio_tokenizer(codec)
    (codec / "config.json").write_text(json.dumps(speech.AUDIO_TOKENIZER_CONFIG))
    torch.save({"not": Exception("a pickled object")}, codec / "model.pth")
    with pytest.raises(
        UsageError, match=r"cannot read model.pth as a state dict \(weights_only=True refused it: [^\n]*\)$"
    ):
        load_audio_tokenizer(codec)
    with pytest.raises(UsageError, match="pass a WAV file"):
        generate(backend, model, SpeechPrompt("x", "Hi.", reference_audio="missing.wav"))


def test_samples_through_the_boson_backend_are_flagged_and_written(backend, model, speech, tmp_path):
    from higgs_trainer.speech.sampling import generate_sample, write_sample_files

    def sample(rewrite):
        processors = LogitsProcessorList([AudioScores(rewrite)])
        return generate_sample(model, PROMPT, backend, max_new_tokens=MAX_NEW_TOKENS, logits_processor=processors)

    assert sample(stream_eos_at_once).record.flags == ["no_audio"]
    runaway = sample(never_stream_eos)
    assert "runaway" in runaway.record.flags and runaway.record.frames == MAX_NEW_TOKENS - speech.CODEBOOKS

    def one_frame_repeated(scores):
        scores[:] = -float("inf")
        scores[:, 7] = 0.0
        return scores

    collapsed = sample(one_frame_repeated)
    assert "collapse" in collapsed.record.flags
    write_sample_files(runaway, tmp_path, backend.sample_rate, title="checkpoint-1 / hello")
    assert soundfile_rate(tmp_path / "hello.wav") == speech.SAMPLE_RATE and (tmp_path / "hello.png").stat().st_size


def soundfile_rate(path):
    import soundfile

    return soundfile.info(str(path)).samplerate


def test_speak_on_a_checkpoint_gives_the_codes_and_audio_the_callback_heard(backend, speech, tmp_path, capsys):
    """HiggsLoraTrainer + SpeechSamplesCallback on boson's HiggsAudioModel, then `higgs-trainer speak` on checkpoint-2
    with the base, its tokenizer and the codec loaded back from boson's formats."""
    import soundfile
    import transformers

    from higgs_trainer import HiggsLoraTrainer
    from higgs_trainer.speech import SpeechSamplesCallback
    from higgs_trainer.speech.boson_backend import save_audio_tokenizer
    from tests.testing_cli import run_cli
    from tests.testing_models import RandomTokens, Wrapper, lora_config

    base = speech.tiny_speech_model()
    base_dir = tmp_path / "base_model"  # what `speak --base` loads: the base before LoRA, its tokenizer and codec
    base.save_pretrained(base_dir)
    backend.tokenizer.save_pretrained(base_dir)
    save_audio_tokenizer(backend.audio_tokenizer, speech.AUDIO_TOKENIZER_CONFIG, base_dir / "audio_tokenizer")
    assert sorted(p.name for p in (base_dir / "audio_tokenizer").iterdir()) == [
        "config.json", "model.pth", "semantic_model",
    ]  # fmt: skip
    clip = tmp_path / "voice.wav"
    soundfile.write(clip, np.random.default_rng(1).uniform(-0.5, 0.5, 1600).astype(np.float32), 16000)
    cloned = SpeechPrompt("cloned", PROMPT.text, reference_audio=str(clip), reference_text="Reference words.")
    short = 8  # 4 frames: decoding is most of the cost
    callback = SpeechSamplesCallback([cloned], backend, max_new_tokens=short)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = HiggsLoraTrainer(
        model=Wrapper(get_peft_model(base, lora_config())), args=args, train_dataset=RandomTokens(n=4, audio=False),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert callback.failed == []
    heard = [
        json.loads((tmp_path / "run" / f"checkpoint-{step}" / "speech" / "speech.json").read_text())["samples"]
        for step in (1, 2)
    ]
    assert heard[0][0]["frames"] > 0 and heard[0][0]["codes_sha256"] != heard[1][0]["codes_sha256"]  # it trained
    # speak with the reference clip: the same codes need the model, the tokenizer and the codec's encoder (the clip's
    # codes) loaded back; the same audio needs its decoder
    code, stdout, err = run_cli(
        capsys, "speak", "--base", base_dir, "--adapter", tmp_path / "run" / "checkpoint-2", "--text", cloned.text,
        "--reference", clip, "--reference-text", cloned.reference_text, "--output", tmp_path / "cloned.wav",
        "--max-new-tokens", short, "--json",
    )  # fmt: skip
    assert code == 0, err
    spoken, sample = json.loads(stdout), heard[1][0]
    assert (spoken["codes_sha256"], spoken["frames"]) == (sample["codes_sha256"], sample["frames"])
    heard_wav = tmp_path / "run" / "checkpoint-2" / "speech" / "cloned.wav"
    assert soundfile.read(tmp_path / "cloned.wav")[0].tolist() == soundfile.read(heard_wav)[0].tolist()


def test_the_best_checkpoint_follows_the_speech_metric_not_the_loss(backend, speech, tmp_path):
    """boson's HiggsAudioModel in HiggsLoraTrainer with metric_for_best_model="speech_wer": the trainer keeps (and
    reloads) the checkpoint whose samples scored best, from samples generated once per save at the evaluation."""
    import transformers

    from higgs_trainer import HiggsLoraTrainer
    from higgs_trainer.speech import SpeechSamplesCallback
    from tests.testing_models import RandomTokens, Wrapper, lora_config
    from tests.testing_speech_models import LossMirroringScoring, assert_best_follows_the_speech_metric

    scoring = LossMirroringScoring()
    callback = SpeechSamplesCallback([PROMPT], backend, max_new_tokens=8, scoring=scoring)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, save_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, eval_strategy="steps", eval_steps=1,
        per_device_eval_batch_size=2, load_best_model_at_end=True, metric_for_best_model="speech_wer",
        greater_is_better=False,
    )  # fmt: skip
    trainer = HiggsLoraTrainer(
        model=Wrapper(get_peft_model(speech.tiny_speech_model(), lora_config())), args=args,
        train_dataset=RandomTokens(n=6, audio=False), eval_dataset=RandomTokens(n=2, audio=False),
        callbacks=[callback],
    )  # fmt: skip
    scoring.trainer = trainer
    trainer.train()
    trainer.save_model()
    assert callback.failed == []
    assert_best_follows_the_speech_metric(trainer, scoring, tmp_path, steps=3)
