"""Speech samples under DDP on 2 CPU processes (gloo); run by tests/test_speech.py (newest stack).

Usage: torchrun --nproc_per_node=2 tests/distributed/ddp_speech.py OUTPUT_DIR
The example's tiny HiggsAudioV2 trains 2 steps saving and evaluating at each, with SpeechSamplesCallback scoring
(metric_for_best_model="speech_wer"); every rank writes OUTPUT_DIR/rank-N.json: when each on_save returned, (rank 0)
when its sampling ended, the eval_speech_wer it logged and the best checkpoint it chose.
"""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from higgs_trainer import HiggsLoraTrainer
from higgs_trainer.speech import SpeechPrompt, SpeechSamplesCallback
from tests.testing_speech_models import LossMirroringScoring

spec = importlib.util.spec_from_file_location("example", Path(__file__).parents[2] / "examples/speak_with_adapter.py")
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)


class TimedSpeech(SpeechSamplesCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled_until, self.returned_at = [], []

    def _write(self, directory, saved):
        super()._write(directory, saved)
        time.sleep(1.0)  # a slow sample: the other rank must still be waiting for it
        self.sampled_until.append(time.time())

    def on_save(self, *args, **kwargs):
        super().on_save(*args, **kwargs)
        self.returned_at.append(time.time())


output_dir = sys.argv[1]
rank = int(os.environ["RANK"])
processor = ex.tiny_processor(ex.tiny_codec(0))
torch.manual_seed(0)
base = transformers.HiggsAudioV2ForConditionalGeneration(ex.tiny_model_config(processor), use_text_head=True)
wrapper = ex.HiggsAudioModelWrapper(get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
scoring = LossMirroringScoring()
speech = TimedSpeech([SpeechPrompt("high", ex.PROMPTS["high"])], max_new_tokens=8, scoring=scoring)
args = transformers.TrainingArguments(
    output_dir=output_dir, max_steps=2, save_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
    ddp_backend="gloo", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1, label_names=["audio_labels"],
    prediction_loss_only=True, metric_for_best_model="speech_wer", greater_is_better=False,
)  # fmt: skip
trainer = HiggsLoraTrainer(
    model=wrapper, args=args, train_dataset=ex.ToneRequests(), data_collator=ex.Collator(processor),
    processing_class=processor, callbacks=[speech], eval_dataset=torch.utils.data.Subset(ex.ToneRequests(), range(2)),
)  # fmt: skip
scoring.trainer = trainer
assert trainer.args.world_size == 2, trainer.args.world_size
trainer.train()
with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as handle:
    wer = [entry["eval_speech_wer"] for entry in trainer.state.log_history if "eval_speech_wer" in entry]
    json.dump(
        {"sampled_until": speech.sampled_until, "returned_at": speech.returned_at, "wer": wer,
         "best": trainer.state.best_model_checkpoint, "scored": len(scoring.calls)},
        handle,
    )  # fmt: skip
torch.distributed.barrier()
torch.distributed.destroy_process_group()
