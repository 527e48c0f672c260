"""End-to-end HiggsLoraTrainer run on GPUs with DeepSpeed ZeRO-3 or FSDP (run by scripts/gpu_check.sh).

Usage: torchrun --nproc_per_node=N tests/distributed/gpu_train.py OUTPUT_DIR zero3-gather|zero3-nogather|fsdp-full|fsdp-sharded
Trains the tiny wrapped model (tests/testing_models.py) through accelerate's real engine setup, then checks on rank 0
that every checkpoint's and the final adapter verify and that the final adapter reproduces the trained logits
on a bare base model. Exits non-zero on any failure. Needs CUDA (accelerate runs FSDP only on accelerators).
"""

import os
import sys

import torch
import torch.distributed as dist
from peft import PeftModel

from higgs_trainer import HiggsLoraTrainer, verify_adapter
from tests.testing_models import RandomTokens, logits_of, make_model, probe_batch, tiny_base_model, training_args

output_dir, mode = sys.argv[1], sys.argv[2]
engine = {}
if mode.startswith("zero3"):
    engine["deepspeed"] = {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": mode == "zero3-gather"},
        # torch's AdamW inside DeepSpeed: its fused CUDA Adam would need a compiler on the GPU machine
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.0, "torch_adam": True}},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
elif mode.startswith("fsdp"):
    engine["fsdp"] = "full_shard auto_wrap"
    engine["fsdp_config"] = {
        # The decoder layer classes this model has: accelerate >= 1.9 refuses a listed class the model lacks.
        "transformer_layer_cls_to_wrap": sorted(
            {type(m).__name__ for m in tiny_base_model().modules() if type(m).__name__.endswith("DecoderLayer")}
        ),
        "state_dict_type": "FULL_STATE_DICT" if mode == "fsdp-full" else "SHARDED_STATE_DICT",
        "use_orig_params": True,
    }
else:
    raise SystemExit(f"unknown mode {mode!r}")

model = make_model("model")
trainer = HiggsLoraTrainer(
    model=model, args=training_args(output_dir, use_cpu=False, **engine), train_dataset=RandomTokens()
)
trainer.train()
trainer.save_model()
batch = {k: v.to(trainer.args.device) for k, v in probe_batch().items()}
trained = logits_of(trainer.model_wrapped if mode.startswith("fsdp") else model, batch).cpu()
if dist.get_rank() == 0:
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        print(mode, sub, verify_adapter(os.path.join(output_dir, sub, "lora_adapters")))
    loaded = PeftModel.from_pretrained(tiny_base_model(), os.path.join(output_dir, "lora_adapters"))
    torch.testing.assert_close(logits_of(loaded, probe_batch()), trained, rtol=2e-3, atol=2e-3)
    print(f"{mode}: OK, adapters complete and the final one reproduces the trained logits")
dist.barrier()
dist.destroy_process_group()
