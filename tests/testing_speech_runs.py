"""A realistic training run with speech samples on disk, for the page, ``listen`` and browser tests.

What the speech callback leaves after training (``higgs_trainer.speech``, docs/listening.md): each
``checkpoint-N`` holds ``trainer_state.json`` (with ``log_history`` and ``best_model_checkpoint``) and
``speech/<name>.wav`` (16-bit PCM, written with soundfile), ``speech/<name>.png`` (a log-magnitude
spectrogram) and ``speech/speech.json`` in the callback's format (``higgs_trainer.speech.records``, format 1):
per sample the prompt, seconds, frames, a hash of the codes, flags, scores and error. The signals are short syllable-like harmonic tones, different per checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24000
FRAME_RATE = 25  # codec frames per second (Higgs' audio tokenizer)
PROMPTS = {
    "greeting": "Hello, and welcome to the show.",
    "question": "Could you tell me the way to the station?",
    "numbers": "One, two, three, four, five.",
}


def speech_like(seconds: float, pitch: float, seed: int) -> np.ndarray:
    """Harmonics of ``pitch`` with a syllable-rate envelope and a little noise: a short speech-like signal."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    glide = pitch * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(glide) / SAMPLE_RATE
    formants = (500, 1500, 2500)  # a vowel's resonances: the harmonics near them are loudest
    voice = sum(
        np.sin(k * phase) * (sum(np.exp(-(((k * pitch - f) / 300) ** 2)) for f in formants) + 1 / (4 * k))
        for k in range(1, 40)
    )
    voice /= np.abs(voice).max()
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, np.pi)), 0, None) ** 0.6
    wave = 0.25 * voice * envelope + 0.0005 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def write_png(path: Path, gray: np.ndarray) -> None:
    """Write a grayscale ``uint8`` image as a PNG (zlib and struct: the format, with no imaging library)."""
    height, width = gray.shape
    raw = b"".join(b"\x00" + gray[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def spectrogram_png(path: Path, audio: np.ndarray) -> None:
    """A log-magnitude spectrogram of ``audio`` (low frequencies at the bottom) as a PNG."""
    window, hop = 512, 128
    frames = [audio[i : i + window] * np.hanning(window) for i in range(0, max(1, audio.size - window), hop)]
    magnitude = np.abs(np.fft.rfft(np.array(frames) if frames else np.zeros((1, window)), axis=1)).T[:96]
    level = 20 * np.log10(magnitude / (window / 4) + 1e-6)  # dB below a full-scale sine
    level = np.clip((level + 70) / 70, 0, 1)  # -70 dBFS and quieter: white, so silence stays white
    write_png(path, (255 * (1 - level[::-1])).astype(np.uint8))


def write_samples(directory: Path, step: int, samples: dict[str, dict]) -> None:
    """Write ``directory/speech/``: a WAV, a PNG and a record per sample, and ``speech.json``."""
    import soundfile

    speech = directory / "speech"
    speech.mkdir(parents=True, exist_ok=True)
    records = []
    for name, sample in samples.items():
        # the record higgs_trainer.speech.records.SampleRecord writes
        record = {
            "name": name,
            "text": PROMPTS[name],
            "reference_audio": sample.get("reference"),
            "reference_text": None,
        }
        record |= {"wav": None, "png": None, "seconds": 0.0, "frames": 0, "codes_sha256": None, "ended": None}
        if "error" in sample:
            records.append({**record, "flags": [], "scores": {}, "error": sample["error"]})
            continue
        audio = sample["audio"]
        soundfile.write(speech / f"{name}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
        spectrogram_png(speech / f"{name}.png", audio)
        seconds = audio.size / SAMPLE_RATE
        record |= {
            "wav": f"{name}.wav",
            "png": f"{name}.png",
            "seconds": round(seconds, 3),
            "frames": int(seconds * FRAME_RATE),
            "codes_sha256": hashlib.sha256(audio.tobytes()).hexdigest(),
            "ended": True,
            "flags": sample.get("flags", []),
            "scores": sample.get("scores", {}),
            "error": None,
        }
        records.append(record)
    document = {
        "format_version": 1,
        "checkpoint": directory.name,
        "global_step": step,
        "sample_rate": SAMPLE_RATE,
        "generation": {"do_sample": False, "max_new_tokens": 256},
        "flag_thresholds": {"silence_rms": 0.001, "collapse_share": 0.8},
        "samples": records,
    }
    (speech / "speech.json").write_text(json.dumps(document, indent=2))


def _heard(text: str, missed: float) -> str:
    """What an ASR model might hear of ``text`` when it misses that share of the words (the last ones)."""
    words = text.lower().replace(",", "").rstrip(".?").split()
    return " ".join(words[: len(words) - round(missed * len(words))])


def make_run(run_dir: Path, steps: tuple[int, ...] = (2, 4, 6), best: int | None = 4, samples: bool = True) -> Path:
    """A run directory with a ``checkpoint-N`` per step, losses falling steadily, and samples whose scores say
    ``best`` sounds best (the last checkpoint has a silent sample and a failed one)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    history = []
    for index, step in enumerate(steps):
        history += [
            {"epoch": s / steps[-1], "step": s, "loss": round(4.0 / (1 + 0.4 * s), 4)}
            for s in range(step - 1, step + 1)
            if s > 0
        ]
        checkpoint = run_dir / f"checkpoint-{step}"
        checkpoint.mkdir()
        state = {"global_step": step, "max_steps": steps[-1], "log_history": list(history)}
        if best is not None and step >= best:
            state |= {"best_model_checkpoint": str(run_dir / f"checkpoint-{best}"), "best_metric": 0.25}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if not samples:
            continue
        quality = 1.0 - abs(step - (best or step)) / (2 * max(steps))
        per_prompt = {}
        for k, name in enumerate(PROMPTS):
            audio = speech_like(1.0 + 0.3 * k, 110 + 25 * k + 10 * index, seed=100 * step + k)
            per_prompt[name] = {
                "audio": audio,
                "scores": {
                    "wer": round(1 - quality, 3),
                    "cer": round((1 - quality) / 2, 3),
                    "similarity": round(0.5 + quality / 2, 3),
                    "transcript": _heard(PROMPTS[name], 1 - quality),
                },
            }
        if index == len(steps) - 1 and len(steps) > 1:
            per_prompt["numbers"] = {
                "audio": np.zeros(SAMPLE_RATE // 2, dtype=np.float32),
                "flags": ["silence"],
                "scores": {"wer": 1.0, "cer": 1.0, "similarity": 0.0, "transcript": ""},
            }
            per_prompt["question"] = {"error": "RuntimeError: generation failed (forced in this fixture)"}
        write_samples(checkpoint, step, per_prompt)
    return run_dir
