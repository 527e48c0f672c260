"""What the speech scorers cost at each save: load time, memory, and seconds per sample, on CPU.

    python benchmarks/bench_speech_scoring.py [--asr whisper-base] [--speaker wavlm-base-plus-sv] [--seconds 3]

Builds random models of the real shapes from their configs (nothing downloaded; the weights do not
change the cost): a Whisper ASR model (``whisper-tiny``, ``whisper-base`` or ``whisper-small``, with
the multilingual vocabulary of 51,865 tokens) and a WavLM x-vector speaker model shaped like
``microsoft/wavlm-base-plus-sv``; saves each, then in a fresh process per measurement: the import floor,
and loading each scorer the way `SpeechScoring` does and scoring one sample of ``--seconds`` seconds.
A random Whisper never stops on its own, so its generation is capped at ``--tokens`` new tokens (about
what a few seconds of speech transcribes to); tokens outside the test tokenizer's 265 are suppressed.
Peak RSS from ``ru_maxrss``, sampled anonymous memory from ``/proc`` (`bench_extract_merge.measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_extract_merge import measure as measure_child

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WHISPER_SHAPES = {  # d_model, layers (encoder = decoder), heads, ffn
    "whisper-tiny": (384, 4, 6, 1536),
    "whisper-base": (512, 6, 8, 2048),
    "whisper-small": (768, 12, 12, 3072),
}
WHISPER_VOCAB = 51865
SAMPLE_RATE = 24000  # the Higgs codec's


def build_whisper(directory: Path, shape: str) -> None:
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from tests.testing_speech_models import save_tiny_whisper

    save_tiny_whisper(directory)  # tokenizer, feature extractor and generation settings of the test model
    d_model, layers, heads, ffn = WHISPER_SHAPES[shape]
    tiny = WhisperConfig.from_pretrained(directory)
    config = WhisperConfig(
        **{k: getattr(tiny, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")},
        vocab_size=WHISPER_VOCAB, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
    )  # fmt: skip
    generation = WhisperForConditionalGeneration.from_pretrained(directory).generation_config
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = generation
    model.save_pretrained(directory)


def build_speaker(directory: Path) -> None:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    WavLMForXVector(WavLMConfig(xvector_output_dim=512)).save_pretrained(directory)  # base: 768 wide, 12 layers
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(directory)


def child(mode: str, args: list[str]) -> None:
    """Runs in the measured process; prints its result as JSON on the last line."""
    if mode == "build":
        build_whisper(Path(args[0]), args[1])
        build_speaker(Path(args[2]))
        print(json.dumps({}))
        return
    import numpy as np

    from higgs_trainer.speech.error_rate import ErrorRateScorer
    from higgs_trainer.speech.similarity import SpeakerSimilarityScorer

    if mode == "import":
        print(json.dumps({}))
        return
    seconds, tokens = float(args[1]), int(args[2])
    rng = np.random.default_rng(0)
    sample = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "asr":
        suppressed = list(range(265, WHISPER_VOCAB))
        scorer = ErrorRateScorer(args[0], generate_kwargs={"max_new_tokens": tokens, "suppress_tokens": suppressed})
        loaded, cpu_loaded = time.perf_counter(), time.process_time()
        for _ in range(3):
            scorer.score(sample, SAMPLE_RATE, "one two three four five six seven eight nine ten")
    else:
        reference = Path(args[0]) / "reference.wav"
        import soundfile

        soundfile.write(reference, sample, SAMPLE_RATE)
        scorer = SpeakerSimilarityScorer(args[0])
        scorer.add_reference(reference)
        loaded, cpu_loaded = time.perf_counter(), time.process_time()
        for _ in range(3):
            scorer.score(sample, SAMPLE_RATE, reference)
    done, cpu_done = time.perf_counter(), time.process_time()
    parameters = sum(p.numel() for p in (scorer._pipeline.model if mode == "asr" else scorer._model).parameters())
    print(
        json.dumps(
            {
                "load_seconds": loaded - start,
                "load_cpu_seconds": cpu_loaded - cpu_start,
                "score_seconds": (done - loaded) / 3,
                "score_cpu_seconds": (cpu_done - cpu_loaded) / 3,
                "parameters": parameters,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asr", default="whisper-base", choices=sorted(WHISPER_SHAPES))
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the scored sample")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens the random Whisper generates")
    parser.add_argument("--work", default="/tmp/bench-speech-scoring")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    work = Path(args.work)
    asr, speaker = work / args.asr, work / "wavlm-base-plus-sv"
    if not (asr / "model.safetensors").is_file() or not (speaker / "model.safetensors").is_file():
        measure_child("build", str(asr), args.asr, str(speaker), script=__file__)
    floor = measure_child("import", script=__file__)
    rows = []
    for mode, directory in (("asr", asr), ("speaker", speaker)):
        result = measure_child(mode, str(directory), str(args.seconds), str(args.tokens), script=__file__)
        result["added_peak_mb"] = result["peak_rss_mb"] - floor["peak_rss_mb"]
        rows.append(result)
    print(json.dumps({"import_floor_mb": floor["peak_rss_mb"], "results": rows}, indent=2))
    print(f"\nimport floor: {floor['peak_rss_mb']:.0f} MiB peak RSS")
    print(
        f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times stretch with it; CPU times less)"
    )
    print(
        "| scorer | parameters | load (CPU) | score one sample (CPU) | CPU per second of audio | memory added (peak RSS) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row, name in zip(rows, (f"{args.asr} (ASR)", "wavlm-base-plus-sv shape (speaker)"), strict=True):
        print(
            f"| {name} | {row['parameters'] / 1e6:.0f}M | {row['load_seconds']:.1f} s ({row['load_cpu_seconds']:.1f} s) | "
            f"{row['score_seconds']:.2f} s ({row['score_cpu_seconds']:.2f} s) | "
            f"{row['score_cpu_seconds'] / args.seconds:.2f} s | {row['added_peak_mb']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
