"""The DeepSpeed shims of higgs_trainer._compat on a real engine (run by tests/test_trainer_setup.py, 1 process).

Usage: torchrun --nproc_per_node=1 tests/distributed/deepspeed_shims.py OUTPUT_DIR
Prints "shims ok" at the end; any failed check raises.
"""

import sys

import deepspeed
import torch
import torch.distributed as dist

from higgs_trainer._compat import allow_missing_frozen_parameters, exclude_frozen_parameters_on_save
from tests.testing_models import make_model

output_dir = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
model = make_model()
config = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_force_ds_cpu_optimizer": False,
}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
)
trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}

# exclude_frozen_parameters_on_save: nested use, and whatever save_checkpoint was before comes back
with exclude_frozen_parameters_on_save(engine), exclude_frozen_parameters_on_save(engine):
    engine.save_checkpoint(output_dir, tag="adapter-only")
assert "save_checkpoint" not in vars(engine), "the class's save_checkpoint was not restored"
calls = []


def someone_elses_save_checkpoint(*args, **kwargs):
    calls.append(kwargs)


engine.save_checkpoint = someone_elses_save_checkpoint
with exclude_frozen_parameters_on_save(engine):
    engine.save_checkpoint(output_dir, tag="x")
assert engine.save_checkpoint is someone_elses_save_checkpoint, "an instance attribute was deleted, not restored"
assert calls == [{"tag": "x", "exclude_frozen_parameters": True}], calls
del engine.save_checkpoint

saved = torch.load(f"{output_dir}/adapter-only/mp_rank_00_model_states.pt", weights_only=False)["module"]
assert trainable <= set(saved), f"trainable parameters missing: {sorted(trainable - set(saved))[:3]}"
assert not set(saved) & frozen, f"frozen parameters in the checkpoint: {sorted(set(saved) & frozen)[:3]}"

# allow_missing_frozen_parameters: applying it twice is harmless; only frozen keys may be missing
allow_missing_frozen_parameters(engine)
allow_missing_frozen_parameters(engine)
engine.load_checkpoint(output_dir, tag="adapter-only", load_module_strict=True)
missing_trainable = {k: v for k, v in saved.items() if k != sorted(trainable)[0]}
try:
    engine.load_module_state_dict({"module": missing_trainable}, strict=True)
except RuntimeError as exc:
    assert sorted(trainable)[0] in str(exc), exc
else:
    raise AssertionError("a missing trainable parameter was accepted")
print("shims ok", flush=True)
dist.destroy_process_group()
