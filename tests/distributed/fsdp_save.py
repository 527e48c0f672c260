"""FSDP2 (``fully_shard``) or FSDP1 on 2 CPU gloo processes: adapters from the full and the sharded state dict.

Run by tests/test_fsdp.py: torchrun --nproc_per_node=2 tests/distributed/fsdp_save.py OUTPUT_DIR fsdp2|fsdp1
accelerate falls back to DDP for FSDP on CPU, so this shards the wrapper with torch's own FSDP
(FSDP1 is what accelerate's default FSDP plugin uses) and saves the two ways the trainer does. The
model trains its heads through modules_to_save too (HiggsAudioModel's audio head, text head and codebook
embeddings with its text + audio loss on the Higgs stack), which must be gathered like the LoRA tensors: (1) from the full state dict gathered to rank 0, as
``Trainer.save_model`` does with ``FULL_STATE_DICT`` before calling ``_save``; (2) by gathering
only the adapter's parameters, as with ``SHARDED_STATE_DICT`` (where ``_save`` is never called).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType, fully_shard
from torch.distributed.fsdp._flat_param import FlatParamHandle
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from higgs_trainer import AdapterVerificationError, find_lora_model
from higgs_trainer.training.gathering import gather_adapter_state_dict, is_sharded
from higgs_trainer.training.saving import write_lora_adapters
from tests.testing_models import (
    TARGET_MODULES,
    SpeechSamples,
    heads_to_save,
    logits_of,
    make_speech_model,
    probe_batch,
    speech_collator,
    speech_logits_of,
    speech_probe,
    tiny_base_model,
)

output_dir, version = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))

# fsdp1-flat trains LoRA only: peft 0.16 reads a modules_to_save copy with its module's state_dict(), a collective
# once PEFT's wrap policy made that module an FSDP unit, which the one writing process cannot run.
HEADS = heads_to_save(tiny_base_model()) if version != "fsdp1-flat" else []
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast")
wrapper = make_speech_model(TARGET_MODULES, HEADS or None)
layers = [m for m in wrapper.modules() if type(m).__name__.endswith("DecoderLayer")]
if version == "fsdp2":
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    root = wrapper
elif version == "fsdp1":  # FSDP1, wrapped per decoder layer with use_orig_params (what PEFT needs), as accelerate does
    root = FullyShardedDataParallel(
        wrapper,
        auto_wrap_policy=ModuleWrapPolicy({type(layers[0])}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
else:  # fsdp1-flat: use_orig_params=False, with PEFT's own wrap policy (each trainable layer a unit of its own)
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = type(layers[0]).__name__
    root = FullyShardedDataParallel(
        wrapper, auto_wrap_policy=fsdp_auto_wrap_policy(wrapper), use_orig_params=False, device_id=torch.device("cpu")
    )
assert is_sharded(wrapper)

optimizer = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2)
data, collate = SpeechSamples(), speech_collator() or torch.utils.data.default_collate
wrapper.train()
for step in range(2):
    batch = collate([data[2 * step + rank]])
    root(**batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()

component = find_lora_model(root)


def save(component, how, state_dict):
    """Write the adapter; a refusal (AdapterVerificationError) is recorded in OUTPUT_DIR/<how>.refused for the test."""
    try:
        write_lora_adapters(component, os.path.join(output_dir, how), state_dict=state_dict)
    except AdapterVerificationError as exc:
        with open(os.path.join(output_dir, f"{how}.refused"), "w") as handle:
            handle.write(str(exc))


# (1) FULL_STATE_DICT: the whole model gathered to rank 0 (collective), sliced by the component's path; only the
# writer then saves (as Trainer calls _save on the writer only), so nothing in the save may be a collective.
if version == "fsdp2":
    full = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        full = root.state_dict()
if rank == 0:
    save(component, "full", full)
# (2) SHARDED_STATE_DICT: only the adapter's parameters are gathered (collective). Measured on every rank: how many
# FSDP1 flat parameters (whole units) were unsharded, and how many elements went through collectives.
unsharded, moved = [], []
real_unshard, real_collectives = FlatParamHandle.unshard, {n: getattr(dist, n) for n in COLLECTIVES}


def counting_unshard(handle, *args, **kwargs):
    unsharded.append(sum(handle.flat_param._numels))  # the unit's parameters, in full
    return real_unshard(handle, *args, **kwargs)


def counting(name):
    def collective(*args, **kwargs):
        moved.append(max(a.numel() for a in args if isinstance(a, torch.Tensor)))  # the full (output) tensor
        return real_collectives[name](*args, **kwargs)

    return collective


FlatParamHandle.unshard = counting_unshard
for name in COLLECTIVES:
    setattr(dist, name, counting(name))
try:
    adapter_state = gather_adapter_state_dict(
        component, is_writer=rank == 0, fsdp_root=None if version == "fsdp2" else root
    )
finally:
    FlatParamHandle.unshard = real_unshard
    for name, collective in real_collectives.items():
        setattr(dist, name, collective)
frozen = sum(p.numel() for p in tiny_base_model().parameters()) - sum(
    p.numel() for n, p in tiny_base_model().named_parameters() if any(n.startswith(h + ".") for h in HEADS)
)
adapter_numel = sum(
    p.numel() for n, p in make_speech_model(TARGET_MODULES, HEADS or None).named_parameters() if p.requires_grad
)
with open(os.path.join(output_dir, f"gather-rank{rank}.json"), "w") as handle:
    json.dump({"unsharded": unsharded, "moved": sum(moved), "adapter": adapter_numel, "frozen": frozen}, handle)
if rank == 0:
    save(component, "sharded", adapter_state)

# FSDP all-gathers during the forward. A text-only probe too: boson's HiggsAudioModel takes its DualFFN audio path
# only for layers that are `isinstance(layer, HiggsAudioDualFFNDecoderLayer)`, which an FSDP1 unit around each layer
# is not, so FSDP1's own forward of audio tokens is not the model's (FSDP2 keeps the class); text alone is the same.
logits = {"speech": speech_logits_of(root, speech_probe()), "text_only": logits_of(root, probe_batch())}
if rank == 0:
    torch.save(logits, os.path.join(output_dir, "trained_logits.pt"))
dist.barrier()
dist.destroy_process_group()
