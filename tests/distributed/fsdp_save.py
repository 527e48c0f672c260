"""FSDP2 (torch ``fully_shard``) on 2 CPU gloo processes: adapters from the full and the sharded state dict.

Run by tests/test_fsdp.py: torchrun --nproc_per_node=2 tests/distributed/fsdp_save.py OUTPUT_DIR
accelerate falls back to DDP for FSDP on CPU, so this shards the wrapper with torch's own FSDP2
and saves the two ways the trainer does: (1) from the full state dict gathered to rank 0, as
``Trainer.save_model`` does with ``FULL_STATE_DICT`` before calling ``_save``; (2) by gathering
only the adapter's parameters, as with ``SHARDED_STATE_DICT`` (where ``_save`` is never called).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from higgs_trainer import find_lora_model
from higgs_trainer.gathering import gather_adapter_state_dict, is_sharded
from higgs_trainer.saving import write_lora_adapters
from tests.models import RandomTokens, logits_of, make_model, probe_batch

output_dir = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))

wrapper = make_model("model")
for layer in [m for m in wrapper.modules() if type(m).__name__.endswith("DecoderLayer")]:
    fully_shard(layer, mesh=mesh)
fully_shard(wrapper, mesh=mesh)
assert is_sharded(wrapper)

optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
data = RandomTokens()
wrapper.train()
for step in range(2):
    batch = {k: torch.stack([data[2 * step + rank][k]]) for k in ("input_ids", "attention_mask", "labels")}
    wrapper(**batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()

component = find_lora_model(wrapper)
# (1) FULL_STATE_DICT: the whole model gathered to rank 0 (collective), sliced by the component's path.
full = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    write_lora_adapters(component, os.path.join(output_dir, "full"), state_dict=full)
# (2) SHARDED_STATE_DICT: only the adapter's parameters are gathered (collective).
adapter_state = gather_adapter_state_dict(component, is_writer=rank == 0)
if rank == 0:
    write_lora_adapters(component, os.path.join(output_dir, "sharded"), state_dict=adapter_state)

logits = logits_of(wrapper, probe_batch())  # FSDP2 all-gathers during the forward
if rank == 0:
    torch.save(logits, os.path.join(output_dir, "trained_logits.pt"))
dist.barrier()
dist.destroy_process_group()
