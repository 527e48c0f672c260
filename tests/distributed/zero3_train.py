"""Train with HiggsLoraTrainer under DeepSpeed ZeRO-3 on 2 CPU processes (run by tests/test_zero3.py).

Usage: torchrun --nproc_per_node=2 tests/distributed/zero3_train.py OUTPUT_DIR [--no-gather] [--adapter-only]
       [--resume CKPT] [--heads]
Rank 0 writes OUTPUT_DIR/trained_logits.pt; every rank writes OUTPUT_DIR/rank-N.json with the
adapters it wrote. With --heads the model also trains its heads through modules_to_save (on the
Higgs stack HiggsAudioModel with its text + audio loss) and rank 0 writes OUTPUT_DIR/trained_speech_logits.pt.
"""

import argparse
import json
import os

import torch
from accelerate import PartialState

from higgs_trainer import HiggsLoraTrainer
from tests.testing_models import (
    TARGET_MODULES,
    EarliestIsBest,
    RandomTokens,
    SavedAdapters,
    SpeechSamples,
    heads_to_save,
    logits_of,
    make_model,
    make_speech_model,
    probe_batch,
    speech_collator,
    speech_logits_of,
    speech_probe,
    tiny_base_model,
    training_args,
)

parser = argparse.ArgumentParser()
parser.add_argument("output_dir")
parser.add_argument("--no-gather", action="store_true", help="stage3_gather_16bit_weights_on_model_save: false")
parser.add_argument("--adapter-only", action="store_true", help="HiggsLoraTrainer(adapter_only_checkpoints=True)")
parser.add_argument("--resume", help="checkpoint to resume from")
parser.add_argument("--heads", action="store_true", help="modules_to_save heads, text + audio loss")
parser.add_argument(
    "--no-deepspeed-attribute",
    action="store_true",
    help="a trainer that drops Trainer's backward-compatibility `self.deepspeed = self.model_wrapped`",
)
parser.add_argument("--best-is-earliest", action="store_true", help="evaluate every 2 steps; load_best_model_at_end")
options = parser.parse_args()
output_dir, gather = options.output_dir, not options.no_gather
rank = int(os.environ["RANK"])
deepspeed_config = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": gather},
    # DeepSpeed's own AdamW on CPU tensors; its CPU-offload optimizer is not forced.
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True, "weight_decay": 0.0}},
    "zero_force_ds_cpu_optimizer": False,
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}
# CPU only: transformers 5.x passes no backend to accelerate for DeepSpeed, and on a machine without GPUs accelerate
# then reports one process on every rank (so every rank would think it is the writer). On GPUs NCCL is found and this
# is not needed. Configure the state with gloo first and let TrainingArguments use it.
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
PartialState(backend="gloo")
args = training_args(
    output_dir,
    deepspeed=deepspeed_config,
    use_cpu=False,
    warmup_steps=1,
    accelerator_config={"use_configured_state": True},
    **(
        dict(
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="step_score",
            greater_is_better=True,
        )
        if options.best_is_earliest
        else {}
    ),
)
if options.heads:
    model = make_speech_model(TARGET_MODULES, heads_to_save(tiny_base_model()))
    data = dict(train_dataset=SpeechSamples(), data_collator=speech_collator())
else:
    model = make_model("model")
    data = dict(train_dataset=RandomTokens())


class WithoutDeepspeedAttribute(HiggsLoraTrainer):
    """A trainer on which Trainer's "backward compatibility" `self.deepspeed = self.model_wrapped` runs nothing.

    Reading `self.deepspeed` still gives the engine (transformers 4.46's save_model reads it); only the assignment,
    made right before Trainer loads a checkpoint into the engine, is gone.
    """

    deepspeed = property(lambda self: self.model_wrapped if self.is_deepspeed_enabled else None, lambda self, _: None)


trainer = (WithoutDeepspeedAttribute if options.no_deepspeed_attribute else HiggsLoraTrainer)(
    model=model,
    args=args,
    **data,
    adapter_only_checkpoints=options.adapter_only,
    **(dict(eval_dataset=RandomTokens(n=4, seed=5), callbacks=[EarliestIsBest()]) if options.best_is_earliest else {}),
)
with SavedAdapters() as saved:
    trainer.train(resume_from_checkpoint=options.resume)
    trainer.save_model()
# every rank runs the forward: ZeRO-3 gathers layer by layer
logits = speech_logits_of(model, speech_probe()) if options.heads else logits_of(model, probe_batch())
if rank == 0:
    torch.save(logits, os.path.join(output_dir, "trained_speech_logits.pt" if options.heads else "trained_logits.pt"))
with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as handle:
    json.dump({"rank": rank, "saved": saved.paths}, handle)
# Leave the process group before exiting: a gloo group torn down at interpreter exit can abort a rank
# ("terminate called without an active exception") after all the work is done.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
