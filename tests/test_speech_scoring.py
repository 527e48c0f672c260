"""ASR error rates and speaker similarity through tiny random Whisper and WavLM x-vector models (both stacks).

The models are saved to a directory and loaded through ``pipeline("automatic-speech-recognition")`` and
``AutoModelForAudioXVector.from_pretrained``, the path a user's model takes; their outputs are
meaningless, so the tests check what holds for any model: a transcript scored against itself is
perfect, a clip is most similar to itself, empty audio scores as nothing said, bad input is one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from higgs_trainer.errors import SpeechScorerError
from higgs_trainer.speech.error_rate import ErrorRateScorer, error_rates, normalizer
from higgs_trainer.speech.scoring import SpeechScoring, check_best_metric, summarize
from higgs_trainer.speech.similarity import SpeakerSimilarityScorer
from tests.testing_speech_models import save_tiny_whisper, save_tiny_xvector, tone

soundfile = pytest.importorskip("soundfile")


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    reference_audio: str | None = None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring-models")
    return {"asr": save_tiny_whisper(root / "whisper"), "speaker": save_tiny_xvector(root / "wavlm-sv")}


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "voice.wav"
    soundfile.write(path, tone(1.0, 180, 16000), 16000)
    return path


def test_error_rates_normalise_both_texts_alike_and_the_normalisation_is_configurable():
    assert error_rates("Hello, World!", "hello world") == (0.0, 0.0)
    assert error_rates("Hello, World!", "hello world", normalize="none") == (1.0, 4 / 13)  # H, W, "," and "!"
    assert error_rates("a b c d", "") == (1.0, 1.0)  # nothing heard
    assert error_rates("one two", "one two three four")[0] == 1.0  # insertions count: a rate can pass 1.0
    assert error_rates("Hi THERE", "hi there", normalize=str.upper) == (0.0, 0.0)
    with pytest.raises(SpeechScorerError, match="unknown text normalisation 'whisper'"):
        normalizer("whisper")


def test_asr_scorer_transcribes_through_the_pipeline_and_scores_against_the_prompt(models):
    scorer = ErrorRateScorer(models["asr"])
    assert scorer.sample_rate == 16000
    assert not any(p.requires_grad for p in scorer._pipeline.model.parameters()) and not scorer._pipeline.model.training
    sample = tone(0.8, 220, 24000)  # at the codec's rate: resampled to the model's
    heard = scorer.transcribe(sample, 24000)
    assert heard.strip(), "the tiny model transcribes something"
    assert scorer.score(sample, 24000, heard) == type(scorer.score(sample, 24000, heard))(0.0, 0.0, heard.strip())
    assert scorer.score(sample, 24000, heard + " and more words").wer > 0
    nothing = scorer.score(np.zeros(0, dtype=np.float32), 24000, "Hello there.")
    assert (nothing.wer, nothing.cer, nothing.transcript) == (1.0, 1.0, "")


def test_speaker_scorer_finds_a_clip_most_similar_to_itself(models, reference, tmp_path):
    scorer = SpeakerSimilarityScorer(models["speaker"])
    assert scorer.sample_rate == 16000 and not scorer._model.training
    same = tone(1.0, 180, 16000)
    assert scorer.score(same, 16000, reference) == pytest.approx(1.0, abs=1e-4)
    other = tone(0.7, 400, 24000) + 0.2 * np.random.default_rng(1).standard_normal(16800).astype(np.float32)
    assert -1.0 <= scorer.score(other, 24000, reference) < 0.9999
    assert scorer.score(np.zeros(0, dtype=np.float32), 24000, reference) == 0.0  # no audio: no voice
    assert scorer.score(tone(0.01, 180, 16000), 16000, reference) <= 1.0  # shorter than the model's first window


def test_scoring_produces_the_speech_metrics_from_the_configured_scorers(models, reference):
    prompts = [Prompt("cloned", "Hello there.", str(reference)), Prompt("plain", "Good bye.")]
    scoring = SpeechScoring(prompts, asr_model=models["asr"], speaker_model=models["speaker"])
    assert scoring.metrics == ("speech_wer", "speech_cer", "speech_similarity", "speech_degenerate")
    cloned = scoring.score(prompts[0], tone(1.0, 180, 16000), 16000)
    plain = scoring.score(prompts[1], np.zeros(0, dtype=np.float32), 24000)
    assert cloned.similarity == pytest.approx(1.0, abs=1e-4) and cloned.transcript is not None
    assert (plain.wer, plain.cer, plain.similarity, plain.transcript) == (1.0, 1.0, None, "")
    assert plain.as_record() == {"wer": 1.0, "cer": 1.0, "transcript": ""}
    metrics = summarize([cloned, plain], degenerate=1)
    assert metrics["speech_wer"] == pytest.approx((cloned.wer + 1.0) / 2)
    assert metrics["speech_similarity"] == pytest.approx(cloned.similarity) and metrics["speech_degenerate"] == 1.0
    asr_only = SpeechScoring(prompts, asr_model=models["asr"])
    assert asr_only.metrics == ("speech_wer", "speech_cer", "speech_degenerate")
    assert asr_only.score(prompts[0], tone(0.5, 180, 16000), 16000).similarity is None


def test_best_metric_must_be_one_a_configured_scorer_produces():
    produced = ("speech_wer", "speech_cer", "speech_degenerate")
    assert check_best_metric("speech_wer", produced) and check_best_metric("eval_speech_cer", produced)
    assert not check_best_metric("eval_loss", produced) and not check_best_metric(None, produced)
    with pytest.raises(SpeechScorerError, match=r"metric_for_best_model='speech_similarity' .*pass speaker_model="):
        check_best_metric("speech_similarity", produced)
    with pytest.raises(SpeechScorerError, match=r"'eval_speech_mos' .* speech metrics are speech_wer"):
        check_best_metric("eval_speech_mos", produced)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_models_that_cannot_load_are_one_line_errors(models, tmp_path):
    with pytest.raises(SpeechScorerError) as error:
        ErrorRateScorer(tmp_path / "no-such-whisper")
    assert "cannot load the ASR model" in _one_line(error) and "no such directory" in str(error.value)
    with pytest.raises(SpeechScorerError) as error:  # a speaker model is not an ASR model
        ErrorRateScorer(models["speaker"])
    # transformers 5 refuses to load it; 4.46 loads it with a random CTC head and no tokenizer
    assert re.search(r"cannot (load|transcribe with) the ASR model", _one_line(error))
    with pytest.raises(SpeechScorerError) as error:  # an ASR model is not an x-vector model
        SpeakerSimilarityScorer(models["asr"])
    assert "cannot load the speaker-embedding model" in _one_line(error)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(SpeechScorerError) as error:
        SpeechScoring([Prompt("a", "Hi.")], speaker_model=empty)
    assert "AutoModelForAudioXVector" in _one_line(error)


def test_bad_reference_clips_and_prompts_fail_when_scoring_is_set_up(models, reference, tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    for clip, reason in ((garbage, "not an audio file"), (tmp_path / "missing.wav", "no such file")):
        with pytest.raises(SpeechScorerError) as error:
            SpeechScoring([Prompt("voice", "Hello.", str(clip))], speaker_model=models["speaker"])
        assert f"cannot read the reference clip {clip} of prompt 'voice': {reason}" in _one_line(error)
    with pytest.raises(SpeechScorerError, match="no prompt has a reference_audio clip"):
        SpeechScoring([Prompt("plain", "Hello.")], speaker_model=models["speaker"])
    with pytest.raises(SpeechScorerError, match="prompt 'dots' has no words to score against"):
        SpeechScoring([Prompt("dots", "...!")], asr_model=models["asr"])
    # the same prompt and reference are fine when nothing needs them
    SpeechScoring([Prompt("dots", "...!", str(garbage))], asr_model=None, speaker_model=None)


def test_scoring_leaves_autograd_and_the_rng_alone(models, reference):
    scoring = SpeechScoring(
        [Prompt("cloned", "Hello.", str(reference))], asr_model=models["asr"], speaker_model=models["speaker"]
    )
    weight = torch.nn.Parameter(torch.ones(2))
    loss = (weight * 2).sum()  # a training graph in progress
    torch.manual_seed(7)
    scoring.score(Prompt("cloned", "Hello.", str(reference)), tone(0.5, 200, 16000), 16000)
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(1)), "greedy scoring draws no random numbers"
    loss.backward()
    assert torch.equal(weight.grad, torch.full((2,), 2.0))
