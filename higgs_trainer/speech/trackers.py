"""Audio and spectrograms to the trackers already in ``report_to``, through transformers' own integrations.

TensorBoard: the ``tb_writer`` of transformers' ``TensorBoardCallback`` (``add_audio``, ``add_figure``).
W&B: the ``wandb`` module held by ``WandbCallback`` (``wandb.Audio``, ``wandb.Image``), logged with
``train/global_step`` as the integration logs its metrics.

Examples:
    ```python
    log_to_trackers(trainer, samples, sample_rate=24000, global_step=500)
    ```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import first_line
from .audio_files import require_speech_extra, spectrogram_figure

logger = logging.getLogger(__name__)


def _callback(trainer: Any, name: str) -> Any:
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == name:
            return callback
    return None


def log_to_trackers(trainer: Any, samples: Sequence[Any], sample_rate: int, global_step: int) -> None:
    """Log each sample's audio and spectrogram to TensorBoard and W&B where their callbacks are active."""
    tensorboard = _callback(trainer, "TensorBoardCallback")
    writer = getattr(tensorboard, "tb_writer", None)
    wandb_callback = _callback(trainer, "WandbCallback")
    wandb = getattr(wandb_callback, "_wandb", None) if wandb_callback is not None else None
    if writer is None and (wandb is None or getattr(wandb, "run", None) is None):
        return
    _, pyplot = require_speech_extra()
    for sample in samples:
        name, text = sample.record.name, sample.record.text
        figure = spectrogram_figure(sample.waveform, sample_rate, title=f"step {global_step} · {name}")
        try:
            if writer is not None:
                writer.add_audio(f"speech/{name}", torch.from_numpy(sample.waveform)[None], global_step, sample_rate)
                writer.add_figure(f"speech/{name}_mel", figure, global_step, close=False)
                writer.flush()
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.log({
                    f"speech/{name}": wandb.Audio(sample.waveform, sample_rate=sample_rate, caption=text),
                    f"speech/{name}_mel": wandb.Image(figure),
                    "train/global_step": global_step,
                })  # fmt: skip
        except Exception as exc:  # a tracker's failure must not end the run
            logger.error("logging speech sample %r to the trackers failed: %s", name, first_line(exc))
        finally:
            pyplot.close(figure)
