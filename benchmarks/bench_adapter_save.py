"""The per-checkpoint adapter save against the bare write of the adapter's bytes, side by side in one process.

    python benchmarks/bench_adapter_save.py [--shape mha-1b] [--repeat 3]

Builds a bf16 ``LlamaForCausalLM`` of the given shape (``bench_checkpoint.SHAPES``) under a plain
``nn.Module`` wrapper with r=16 LoRA on q/k/v/o (random LoRA weights), then times, each to durable
on disk and the minimum of ``--repeat`` runs:

* bare: safetensors' ``save_file`` of the adapter's tensors (built beforehand) + fsync of the file and directory;
* ``write_lora_adapters(component, out)``: what an adapter-only checkpoint and the final save write;
* ``write_lora_adapters(component, out, state_dict=..., state_dict_is_live=True)``: what a full
  checkpoint's ``_save`` writes without DeepSpeed or FSDP (the whole model's own state dict handed
  over, the component's part sliced out);
* ``write_lora_adapters(component, out, state_dict=...)``: the same with a state dict DeepSpeed or
  FSDP gathered (the shapes it must have are read from the live model as well);
* ``save_lora_adapters(trainer, out)``: the same for scripts that keep their own Trainer (finds the
  component, checks for sharding first).

Run it against another checkout with ``PYTHONPATH=/that/checkout`` to compare before and after.
Target (issue 12): the adapter save at most 2x the bare write, verification and atomicity kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import SHAPES, build_model  # noqa: E402

import higgs_trainer  # noqa: E402
from higgs_trainer import HiggsLoraTrainer, find_lora_model, save_lora_adapters  # noqa: E402
from higgs_trainer.training.saving import write_lora_adapters  # noqa: E402


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mha-1b")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-adapter-save"))
    args = parser.parse_args(argv)
    wrapper = build_model(args.shape, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():
        for name, param in wrapper.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    component = find_lora_model(wrapper)
    trainer = HiggsLoraTrainer(
        model=wrapper,
        args=transformers.TrainingArguments(output_dir=str(args.out / "run"), report_to=[], use_cpu=True),
    )
    state_dict = wrapper.state_dict()
    adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(component.model).items()}
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    args.out.mkdir(parents=True, exist_ok=True)

    def bare() -> None:
        directory = args.out / "bare"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        save_file(adapter, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        _fsync(directory / "adapter_model.safetensors")
        _fsync(directory)

    runs = {
        "bare save_file + fsync": bare,
        "write_lora_adapters (adapter-only checkpoint, final save)": lambda: write_lora_adapters(
            component, args.out / "live"
        ),
        "write_lora_adapters(state_dict=..., state_dict_is_live=True) (full checkpoint)": lambda: write_lora_adapters(
            component, args.out / "full-live", state_dict=state_dict, state_dict_is_live=True
        ),
        "write_lora_adapters(state_dict=...) (full checkpoint, DeepSpeed / FSDP gathered)": lambda: write_lora_adapters(
            component, args.out / "full", state_dict=state_dict
        ),
        "save_lora_adapters(trainer)": lambda: save_lora_adapters(trainer, args.out / "script"),
    }
    for run in runs.values():  # warm up: first-call imports and allocations
        run()
    results = {name: best_of(args.repeat, run) for name, run in runs.items()}
    shutil.rmtree(args.out, ignore_errors=True)
    floor = results["bare save_file + fsync"]
    summary = {
        "higgs_trainer": str(Path(higgs_trainer.__file__).parent),
        "shape": args.shape,
        "parameters": sum(p.numel() for p in wrapper.parameters()),
        "adapter_bytes": adapter_bytes,
        "seconds": results,
        "over_bare": {name: seconds / floor for name, seconds in results.items()},
        "load": os.getloadavg(),
    }
    print(json.dumps(summary, indent=2))
    print(f"\n{args.shape}: {summary['parameters'] / 1e9:.2f}e9 parameters, adapter {adapter_bytes / 1e6:.1f} MB")
    print(f"| save | ms (min of {args.repeat}) | x bare |")
    print("|---|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
