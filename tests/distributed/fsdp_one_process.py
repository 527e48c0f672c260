"""FSDP1 on one CPU gloo process (FSDP turns FULL_SHARD into NO_SHARD), frozen root parameters, state dicts after training.

Run by tests/test_fsdp.py: torchrun --nproc_per_node=1 tests/distributed/fsdp_one_process.py OUTPUT_DIR
Wrapped as accelerate wraps it (per decoder layer, use_orig_params=True): after a backward pass the root unit's
frozen parameters (embeddings, norm, heads) are left as plain tensors, so ``state_dict()`` misses them and FSDP's
own hook raises inside ``Trainer.save_model`` (_compat.reregister_fsdp1_original_parameters). Writes what it saw
to OUTPUT_DIR/result.json for the test to check.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from higgs_trainer._compat import reregister_fsdp1_original_parameters
from tests.testing_models import make_model, probe_batch

output_dir = sys.argv[1]
dist.init_process_group("gloo")
wrapper = make_model("model")
expected = set(wrapper.state_dict())
layers = {type(m) for m in wrapper.modules() if type(m).__name__.endswith("DecoderLayer")}
root = FullyShardedDataParallel(
    wrapper, auto_wrap_policy=ModuleWrapPolicy(layers), use_orig_params=True, device_id=torch.device("cpu")
)
optimizer = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2)


def train_step() -> None:
    batch = probe_batch()
    root(**batch, labels=batch["input_ids"])["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()


def full_state_dict() -> dict[str, torch.Tensor]:
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        return root.state_dict()


result = {}
for step in range(2):
    train_step()
    try:
        full_state_dict()
        result[f"unfixed_{step}"] = "ok"
    except AssertionError as exc:
        result[f"unfixed_{step}"] = str(exc)[:200]
    result[f"fixed_units_{step}"] = reregister_fsdp1_original_parameters(root)
    state = full_state_dict()
    result[f"keys_{step}"] = sorted(state) == sorted(expected)
    result[f"frozen_still_frozen_{step}"] = all(
        not p.requires_grad for n, p in root.named_parameters() if "lora_" not in n
    )
os.makedirs(output_dir, exist_ok=True)
with open(os.path.join(output_dir, "result.json"), "w") as handle:
    json.dump(result, handle)
dist.destroy_process_group()
