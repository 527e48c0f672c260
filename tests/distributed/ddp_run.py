"""Train with HiggsLoraTrainer under DDP on 2 CPU processes (gloo); run by tests/test_distributed_ddp.py.

Usage: torchrun --nproc_per_node=2 tests/distributed/ddp_run.py OUTPUT_DIR [RESUME_FROM_CHECKPOINT]
Every rank writes OUTPUT_DIR/rank-N.json listing the adapters it wrote (from the library's own
"Saved LoRA adapter" log lines); rank 0 also writes the trained model's probe logits. With
RESUME_FROM_CHECKPOINT the run resumes from that checkpoint-N (of another run) instead of starting.
"""

import json
import os
import sys

import torch

from higgs_trainer import HiggsLoraTrainer
from tests.testing_models import RandomTokens, SavedAdapters, logits_of, make_model, probe_batch, training_args

output_dir = sys.argv[1]
resume_from = sys.argv[2] if len(sys.argv) > 2 else None
rank = int(os.environ["RANK"])
model = make_model("model")
trainer = HiggsLoraTrainer(
    model=model, args=training_args(output_dir, ddp_backend="gloo"), train_dataset=RandomTokens()
)
assert trainer.args.world_size == 2, trainer.args.world_size
with SavedAdapters() as saved:
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model()
if rank == 0:
    torch.save(logits_of(model, probe_batch()), os.path.join(output_dir, "trained_logits.pt"))
with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as handle:
    json.dump({"rank": rank, "saved": saved.paths, "global_step": trainer.state.global_step}, handle)
# Leave the process group before exiting: a gloo group torn down at interpreter exit can abort a rank
# ("terminate called without an active exception") after all the work is done.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
