"""`higgs-trainer extract` and `merge` on a synthetic multi-GB checkpoint: time and peak memory, next to the naive way.

    python benchmarks/bench_extract_merge.py [--params 1.5e9] [--rank 10] [--work /tmp/bench-extract-merge]

Builds once (reused while the sizes match) a bf16 Llama-shaped base of about ``--params``
parameters saved with ``save_pretrained``, and a checkpoint written the old, broken way: one
``model.safetensors`` with the whole wrapper state dict, i.e. every base weight plus fp32 LoRA
tensors (r=``--rank`` on q/k/v/o/gate/up/down, about 1e7 parameters by default) under
``model.base_model.model.``. Then runs, each in a fresh process and after evicting the files it
reads from the page cache (``posix_fadvise(DONTNEED)``; the host may still cache the virtual disk):

* ``import torch`` alone, and ``import higgs_trainer.cli.extract, higgs_trainer.cli.merge`` (the commands' import floor);
* naive: ``safetensors.torch.load_file`` of the whole checkpoint, keep the ``lora_`` tensors, save them;
* ``higgs-trainer extract`` of the same checkpoint;
* ``higgs-trainer merge`` of the base and the extracted adapter.

Peak RSS is the child's ``ru_maxrss`` (``os.wait4``), which counts file pages mapped by
safetensors' mmap as well as anonymous memory; peak anonymous memory is sampled from
``/proc/PID/status`` every 5 ms. Time is the work itself (after imports) and the whole process.

Targets (issue 3): extract peak RSS within about 100 MB of bare ``import torch`` whatever the
checkpoint size, at least 20x less time than the naive way on a cold read; merge peak RSS at most
1.3x the model's bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 2048, 5632, 32000, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA = 20
_MEASURED = (
    "mode",
    "process_seconds",
    "peak_rss_mb",
    "sampled_hwm_mb",
    "peak_anon_mb",
    "peak_file_mb",
    "device_read_mb",
)


# building the inputs


def layers_for(params: float) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    return max(1, round((params - 2 * VOCAB * HIDDEN) / per_layer))


def build(work: Path, layers: int, rank: int) -> dict:
    """Write work/base (save_pretrained) and work/run/checkpoint-1/model.safetensors (the old full checkpoint)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    stamp = work / "built.json"
    wanted = {"layers": layers, "rank": rank, "files": ["base", "run", "run-bin"]}
    if stamp.is_file() and json.loads(stamp.read_text()).get("sizes") == wanted:
        return json.loads(stamp.read_text())
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False,
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.uniform_(-0.02, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # computed buffers, not loaded
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(str(work / "base"))

    state = {}
    lora_params = 0
    modules = dict(model.named_modules())
    for key, value in model.state_dict().items():
        module_name, _, param = key.rpartition(".")
        if module_name.rsplit(".", 1)[-1] in TARGETS and param == "weight":
            module = modules[module_name]
            prefix = f"model.base_model.model.{module_name}"
            state[f"{prefix}.base_layer.weight"] = value
            a = torch.randn(rank, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"] = a, b
            lora_params += a.numel() + b.numel()
        else:
            state[f"model.base_model.model.{key}"] = value
    checkpoint = work / "run" / "checkpoint-1"
    checkpoint.mkdir(parents=True, exist_ok=True)
    save_file(state, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    pickled = work / "run-bin" / "checkpoint-1"  # the same, as Trainer writes it with save_safetensors=False
    pickled.mkdir(parents=True, exist_ok=True)
    torch.save(state, pickled / "pytorch_model.bin")
    info = {
        "sizes": wanted,
        "base_params": sum(p.numel() for p in model.parameters()),
        "base_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "lora_params": lora_params,
        "checkpoint_bytes": (checkpoint / "model.safetensors").stat().st_size,
    }
    del model, state
    gc.collect()
    stamp.write_text(json.dumps(info))
    return info


# measuring


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (after flushing them), so the next read is from disk."""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _io_bytes(pid: int) -> dict[str, int]:
    """Bytes the process has read so far: ``rchar`` (every read and page fault served, cached or not), ``read_bytes`` (from the device)."""
    try:
        with open(f"/proc/{pid}/io") as handle:
            return {
                line.split(":")[0]: int(line.split()[1]) for line in handle if line.startswith(("rchar", "read_bytes"))
            }
    except (OSError, ValueError, IndexError):
        return {}


def _status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = ("RssAnon", "RssFile", "VmHWM")
            return {line.split(":")[0]: int(line.split()[1]) for line in handle if line.startswith(fields)}
    except (OSError, ValueError, IndexError):
        return {}


def measure(mode: str, *args: str, script: str = __file__) -> dict:
    """Run ``script``'s child ``mode`` in a fresh process; its peak RSS, peak anonymous RSS, times and result.

    The benchmarks of this folder each pass their own ``script``, whose ``--child MODE ARGS`` does one
    thing and prints its result as JSON on its last line.
    """
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, "--child", mode, *args], stdout=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "rchar": 0, "read_bytes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in {**_status_kb(proc.pid), **_io_bytes(proc.pid)}.items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed with status {proc.returncode}")
    result = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
    result.update(
        mode=mode,
        process_seconds=time.perf_counter() - start,
        peak_rss_mb=usage.ru_maxrss / 1024,
        sampled_hwm_mb=peaks["VmHWM"] / 1024,
        peak_anon_mb=peaks["RssAnon"] / 1024,
        peak_file_mb=peaks["RssFile"] / 1024,
        device_read_mb=peaks["read_bytes"] / 2**20,
    )
    return result


def child(mode: str, args: list[str]) -> None:
    """Runs in the measured process: do one thing, print how long the work took (imports excluded)."""
    if mode == "build":
        print(json.dumps(build(Path(args[0]), int(args[1]), int(args[2]))))
        return
    if mode == "machine":
        print(json.dumps(machine()))
        return
    if mode == "torch":
        import torch  # noqa: F401

        print(json.dumps({}))
        return
    if mode == "import":
        import higgs_trainer.cli.extract  # noqa: F401  (the command modules import the library)
        import higgs_trainer.cli.merge  # noqa: F401

        print(json.dumps({}))
        return
    if mode in ("naive", "naive_pickle"):
        import torch
        from safetensors.torch import load_file, save_file

        start = time.perf_counter()
        state = load_file(args[0]) if mode == "naive" else torch.load(args[0], map_location="cpu", weights_only=True)
        lora = {k.replace("model.", "", 1).replace(".default", ""): v for k, v in state.items() if ".lora_" in k}
        del state
        save_file(lora, args[1])
        print(json.dumps({"work_seconds": time.perf_counter() - start, "tensors": len(lora)}))
        return
    from higgs_trainer.cli import main

    start = time.perf_counter()
    code = main(args)
    print(json.dumps({"work_seconds": time.perf_counter() - start, "exit": code}))
    if code:
        raise SystemExit(code)


def machine() -> dict:
    import peft
    import safetensors
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory_gib": round(mem / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1.5e9, help="base model parameters (bf16)")
    parser.add_argument("--rank", type=int, default=10, help="LoRA rank on all seven projections")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-extract-merge"))
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return

    # The parent stays small (no torch): a forked child's ru_maxrss starts from its parent's RSS.
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"building inputs in {args.work} ...", file=sys.stderr)
    info = measure("build", str(args.work), str(layers_for(args.params)), str(args.rank))
    print(f"built in {info['process_seconds']:.0f} s", file=sys.stderr)
    checkpoint = args.work / "run" / "checkpoint-1"
    weights = checkpoint / "model.safetensors"
    adapter, merged, naive_out = args.work / "adapter", args.work / "merged", args.work / "naive.safetensors"

    results = {}
    results["torch"] = measure("torch")
    results["import"] = measure("import")
    lora_alpha = ["--lora-alpha", str(LORA_ALPHA), "--overwrite"]
    for tag in ("cold", "warm"):
        if tag == "cold":
            evict(weights)
        results[f"naive_{tag}"] = measure("naive", str(weights), str(naive_out))
        if tag == "cold":
            evict(weights)
        results[f"extract_{tag}"] = measure("extract", "extract", str(checkpoint), "-o", str(adapter), *lora_alpha)
    pickled = args.work / "run-bin" / "checkpoint-1"
    evict(pickled)
    results["naive_pickle_cold"] = measure("naive_pickle", str(pickled / "pytorch_model.bin"), str(naive_out))
    evict(pickled)
    results["extract_pickle_cold"] = measure(
        "extract", "extract", str(pickled), "-o", str(adapter) + "-bin", *lora_alpha
    )
    evict(args.work / "base")
    results["merge"] = measure(
        "merge", "merge", "--base", str(args.work / "base"), "--adapter", str(adapter), "-o", str(merged), "--overwrite"
    )

    mb = 2**20
    torch_mb = results["torch"]["peak_rss_mb"]
    base_mb = info["base_bytes"] / mb
    ratio = {
        "extract_peak_rss_over_import_torch_mb": results["extract_cold"]["peak_rss_mb"] - torch_mb,
        "naive_over_extract_cold_work_time": results["naive_cold"]["work_seconds"]
        / results["extract_cold"]["work_seconds"],
        "naive_over_extract_cold_process_time": results["naive_cold"]["process_seconds"]
        / results["extract_cold"]["process_seconds"],
        "naive_pickle_over_extract_pickle_cold_work_time": results["naive_pickle_cold"]["work_seconds"]
        / results["extract_pickle_cold"]["work_seconds"],
        "merge_peak_rss_over_model_bytes": results["merge"]["peak_rss_mb"] / base_mb,
        "merge_peak_anon_over_model_bytes": results["merge"]["peak_anon_mb"] / base_mb,
    }
    inputs = {k: info[k] for k in ("sizes", "base_params", "base_bytes", "lora_params", "checkpoint_bytes")}
    machine_info = {k: v for k, v in measure("machine").items() if k not in _MEASURED}
    summary = {"machine": machine_info, "inputs": inputs, "results": results, "ratios": ratio}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))

    print(
        f"\nbase {info['base_params'] / 1e9:.2f}e9 params ({base_mb:,.0f} MiB bf16); checkpoint "
        f"{info['checkpoint_bytes'] / mb:,.0f} MiB; LoRA {info['lora_params'] / 1e6:.1f}M params"
    )
    print("| run | work s | process s | peak RSS MiB | peak anon MiB | read from disk MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        work = f"{r['work_seconds']:.2f}" if "work_seconds" in r else "-"
        print(
            f"| {name} | {work} | {r['process_seconds']:.2f} | {r['peak_rss_mb']:,.0f} | {r['peak_anon_mb']:,.0f} "
            f"| {r['device_read_mb']:,.0f} |"
        )
    for name, value in ratio.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
