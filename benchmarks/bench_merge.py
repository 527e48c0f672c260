"""`higgs-trainer merge`: streaming vs in-memory vs the community ``merger.py`` way, next to the disk bound.

    python benchmarks/bench_merge.py --shape llama --params 1.5e9 --rank 10 [--work /tmp/bench-merge]
    python benchmarks/bench_merge.py --shape llama --params 5.8e9 --rank 2
    python benchmarks/bench_merge.py --shape higgs --rank 2      # real-size HiggsAudioModel layout (Higgs stack)

Builds (reused while the sizes match) a bf16 base of random weights written as ``save_pretrained``
writes it (``config.json``, safetensors sharded at 5GB with an index), with the Llama shapes of
``bench_extract_merge.py`` (``--shape llama``) or the real Higgs Audio v2 layout built from
boson_multimodal's ``HiggsAudioModel`` on the meta device (``--shape higgs``: Llama-3.2-3B text
backbone, dual-FFN audio layers in all 28 layers, 8 codebooks), and a peft adapter of fp32 LoRA
weights with rank ``--rank`` on q/k/v/o/gate/up/down (audio FFNs too). Then, each in a fresh
process after evicting the base from the page cache (``posix_fadvise(DONTNEED)``):

* ``import torch`` alone (the memory floor);
* copy: the base's weight files copied to the same disk with ``shutil.copyfile`` and fsynced (the disk bound);
* ``higgs-trainer merge`` (streaming, the default);
* ``higgs-trainer merge --in-memory`` (peft's ``merge_and_unload`` on the loaded base);
* community: what the community ``merger.py`` does: load the base in float32, ``PeftModel.from_pretrained``,
  ``merge_and_unload``, ``save_pretrained`` (skipped when the machine's memory cannot hold it).

Peak RSS is the child's ``ru_maxrss``; peak anonymous memory and device reads are sampled every 5 ms.
The copy and the streaming merge alternate ``--rounds`` times; their median work times are compared.
As root, the whole page cache is dropped before each run as well (``--no-drop-caches`` to keep it).
Targets (issue 12): streaming peak RSS at most ``import torch`` + 2x the largest tensor + 256 MiB;
streaming time at most 1.5x the copy; at least 4x faster than in-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_extract_merge import HEADS, HIDDEN, INTERMEDIATE, TARGETS, VOCAB, evict, layers_for
from bench_extract_merge import machine as machine_info
from bench_extract_merge import measure as measure_child

SHARD_BYTES = 5 * 10**9  # transformers 4.46's save_pretrained default, "5GB"
LORA_ALPHA = 20


# building the inputs


def _config(shape: str, layers: int):
    import transformers

    if shape == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False,
            torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
        )  # fmt: skip
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    text = dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=128001,
    )  # fmt: skip
    return HiggsAudioConfig(
        text_config=text, audio_adapter_type="dual_ffn_fast_forward", audio_dual_ffn_layers=list(range(28)),
        audio_ffn_hidden_size=3072, audio_ffn_intermediate_size=8192, skip_audio_tower=True,
        audio_num_codebooks=8, audio_codebook_size=1024, use_delay_pattern=True, encode_audio_in_tokens=True,
        torch_dtype="bfloat16", architectures=["HiggsAudioModel"],
    )  # fmt: skip


def build(work: Path, shape: str, layers: int, rank: int) -> dict:
    """Write work/base (config.json + sharded safetensors + index) and work/adapter (peft's files)."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from safetensors.torch import save_file

    stamp = work / "built.json"
    wanted = {"shape": shape, "layers": layers, "rank": rank}
    if stamp.is_file() and json.loads(stamp.read_text()).get("sizes") == wanted:
        return json.loads(stamp.read_text())
    shutil.rmtree(work / "base", ignore_errors=True)
    shutil.rmtree(work / "adapter", ignore_errors=True)
    config = _config(shape, layers)
    if shape == "llama":
        import transformers

        cls = transformers.LlamaForCausalLM
    else:
        from boson_multimodal.model.higgs_audio import HiggsAudioModel as cls
    with init_empty_weights():
        model = cls(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    base = work / "base"
    base.mkdir(parents=True)
    config.save_pretrained(str(base))
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    total = 0
    # The same grouping as save_pretrained: in state-dict order, a new shard when the next tensor does not fit.
    groups, group, size = [], [], 0
    for name in shapes:
        n = 2 * int(torch.Size(shapes[name]).numel())
        if group and size + n > SHARD_BYTES:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += n
    groups.append(group)
    for i, group in enumerate(groups, 1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            n: torch.empty(shapes[n], dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=generator) for n in group
        }
        save_file(tensors, str(base / file), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = file
            total += t.numel() * 2
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    adapter = work / "adapter"
    lora, lora_params = {}, 0
    for name, module in modules.items():
        if name.rsplit(".", 1)[-1] in TARGETS and hasattr(module, "in_features"):
            a = torch.randn(rank, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"] = a, b
            lora_params += a.numel() + b.numel()
    adapter.mkdir(parents=True)
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=list(TARGETS)).save_pretrained(str(adapter))
    info = {
        "sizes": wanted,
        "base_params": sum(int(torch.Size(s).numel()) for s in shapes.values()),
        "base_bytes": total,
        "largest_tensor_bytes": max(2 * int(torch.Size(s).numel()) for s in shapes.values()),
        "weight_files": len(groups),
        "lora_params": lora_params,
        "lora_modules": len(lora) // 2,
    }
    stamp.write_text(json.dumps(info))
    return info


# measuring


def measure(mode: str, *args: str) -> dict:
    """This script's child ``mode`` in a fresh process, measured (`bench_extract_merge.measure`)."""
    return measure_child(mode, *args, script=__file__)


def _weight_files(base: Path) -> list[Path]:
    return sorted(base.glob("*.safetensors"))


def child(mode: str, args: list[str]) -> None:
    """Runs in the measured process: do one thing, print how long the work took (imports excluded)."""
    if mode == "build":
        print(json.dumps(build(Path(args[0]), args[1], int(args[2]), int(args[3]))))
        return
    if mode == "machine":
        print(json.dumps(machine_info()))
        return
    if mode == "torch":
        import torch  # noqa: F401

        print(json.dumps({}))
        return
    if mode == "copy":
        base, target = Path(args[0]), Path(args[1])
        start = time.perf_counter()
        target.mkdir(parents=True)
        for file in _weight_files(base):
            shutil.copyfile(file, target / file.name)
            fd = os.open(target / file.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        print(json.dumps({"work_seconds": time.perf_counter() - start}))
        return
    if mode == "same":  # are two merged outputs the same tensors, bit for bit? one tensor at a time
        import torch
        from safetensors import safe_open

        def tensors(directory: Path) -> dict[str, Path]:
            found = {}
            for file in _weight_files(directory):
                with safe_open(str(file), framework="pt") as reader:
                    found.update(dict.fromkeys(reader.keys(), file))
            return found

        a, b = tensors(Path(args[0])), tensors(Path(args[1]))
        different = [] if set(a) == set(b) else ["(keys)"]
        for key in sorted(set(a) & set(b)):
            with safe_open(str(a[key]), framework="pt") as ra, safe_open(str(b[key]), framework="pt") as rb:
                if not torch.equal(ra.get_tensor(key), rb.get_tensor(key)):
                    different.append(key)
        print(json.dumps({"tensors": len(a), "different": different[:5], "bit_equal": not different}))
        return
    if mode == "community":
        import torch
        from peft import PeftModel

        from higgs_trainer.merge.base_model import model_class_for

        start = time.perf_counter()
        config, cls = model_class_for(args[0])
        model = cls.from_pretrained(args[0], config=config, torch_dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, args[1]).merge_and_unload()
        merged.save_pretrained(args[2])
        print(json.dumps({"work_seconds": time.perf_counter() - start}))
        return
    from higgs_trainer.cli import main

    start = time.perf_counter()
    code = main(args)
    print(json.dumps({"work_seconds": time.perf_counter() - start, "exit": code}))
    if code:
        raise SystemExit(code)


def drop_page_cache() -> None:
    """Empty the whole page cache (root only): every run then starts with the same free memory.

    A page cache left full by the runs before (the base read, the outputs written) makes the next
    run reclaim pages as it reads and writes: on the benchmark machine the same merge took 8 s
    with 19 GiB cached and 5 s after dropping it.
    """
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


def _available_mib() -> float:
    return next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["llama", "higgs"], default="llama")
    parser.add_argument("--params", type=float, default=1.5e9, help="base parameters, --shape llama (bf16)")
    parser.add_argument("--rank", type=int, default=10, help="LoRA rank on all seven projections")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--rounds", type=int, default=3, help="copy and streaming runs, alternating (medians kept)")
    parser.add_argument(
        "--drop-caches",
        action=argparse.BooleanOptionalAction,
        default=os.access("/proc/sys/vm/drop_caches", os.W_OK),
        help="empty the page cache before each run (default: when this process may, i.e. as root)",
    )
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out: inmemory, community")
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    parser.add_argument("--clean", action="store_true", help="delete the fixtures when done")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return

    args.work.mkdir(parents=True, exist_ok=True)
    print(f"building inputs in {args.work} ...", file=sys.stderr)
    info = measure("build", str(args.work), args.shape, str(layers_for(args.params)), str(args.rank))
    print(f"built in {info['process_seconds']:.0f} s", file=sys.stderr)
    base, adapter = args.work / "base", args.work / "adapter"
    skip = set(filter(None, args.skip.split(",")))
    mb = 2**20
    results = {"torch": measure("torch")}

    def run(name: str, *child_args: str, output: Path, keep: bool = False) -> None:
        shutil.rmtree(output, ignore_errors=True)
        evict(base)
        if args.drop_caches:
            drop_page_cache()
        print(f"running {name} ...", file=sys.stderr)
        results[name] = measure(*child_args)
        if not keep:
            shutil.rmtree(output, ignore_errors=True)  # room on the disk for the next run

    out, streamed = args.work / "out", args.work / "streamed"
    merge = ["merge", "--base", str(base), "--adapter", str(adapter), "--overwrite", "-o"]
    # The copy and the streaming merge alternate, --rounds times: on a virtual disk the same copy
    # takes 2x longer from one run to the next (the host's cache), so one pair cannot settle a ratio.
    rounds, peak_mb = [], 0.0
    for number in range(1, args.rounds + 1):
        last = number == args.rounds
        run("copy", "copy", str(base), str(out), output=out)
        run("streaming", "merge", *merge, str(streamed), output=streamed, keep=last and "inmemory" not in skip)
        rounds.append({"copy": results["copy"]["work_seconds"], "streaming": results["streaming"]["work_seconds"]})
        peak_mb = max(peak_mb, results["streaming"]["peak_rss_mb"])
        print(
            f"round {number}: copy {rounds[-1]['copy']:.2f} s, streaming {rounds[-1]['streaming']:.2f} s",
            file=sys.stderr,
        )
    results["copy"]["work_seconds"] = statistics.median(r["copy"] for r in rounds)
    results["streaming"]["work_seconds"] = statistics.median(r["streaming"] for r in rounds)
    results["streaming"]["peak_rss_mb"] = peak_mb  # the highest of the rounds
    if "inmemory" not in skip:
        run("in-memory", "merge", *merge, str(out), "--in-memory", output=out, keep=True)
        print("comparing the streamed and in-memory outputs ...", file=sys.stderr)
        same = measure("same", str(streamed), str(out))
        results["streaming"]["bit_equal_to_in_memory"] = same["bit_equal"]
        results["streaming"]["different_tensors"] = same["different"]
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(streamed, ignore_errors=True)
    need_mib = 3.2 * info["base_bytes"] / mb  # float32 weights (2x bf16) plus save_pretrained's copies
    if "community" not in skip and _available_mib() > need_mib:
        run("community", "community", str(base), str(adapter), str(out), output=out)
    elif "community" not in skip:
        results["community"] = {"skipped": f"needs about {need_mib:,.0f} MiB, {_available_mib():,.0f} available"}

    torch_mb = results["torch"]["peak_rss_mb"]
    stream = results["streaming"]
    ratios = {
        "streaming_rss_target_mb": torch_mb + 2 * info["largest_tensor_bytes"] / mb + 256,
        "streaming_over_copy_time": stream["work_seconds"] / results["copy"]["work_seconds"],
        "streaming_over_copy_time_per_round": [r["streaming"] / r["copy"] for r in rounds],
    }
    if "work_seconds" in results.get("in-memory", {}):
        ratios["in_memory_over_streaming_time"] = results["in-memory"]["work_seconds"] / stream["work_seconds"]
    if "work_seconds" in results.get("community", {}):
        ratios["community_over_streaming_time"] = results["community"]["work_seconds"] / stream["work_seconds"]
    machine = measure("machine")
    summary = {
        "machine": machine, "inputs": info, "results": results, "rounds": rounds, "ratios": ratios,
        "load": os.getloadavg(), "drop_caches": args.drop_caches,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))

    print(
        f"\n{args.shape}: base {info['base_params'] / 1e9:.2f}e9 params ({info['base_bytes'] / mb:,.0f} MiB bf16, "
        f"{info['weight_files']} files, largest tensor {info['largest_tensor_bytes'] / mb:,.0f} MiB); "
        f"LoRA {info['lora_params'] / 1e6:.1f}M params on {info['lora_modules']} modules (r={args.rank})"
    )
    print("| run | work s | process s | peak RSS MiB | peak anon MiB | read from disk MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        work = f"{r['work_seconds']:.2f}" if "work_seconds" in r else "-"
        print(
            f"| {name} | {work} | {r['process_seconds']:.2f} | {r['peak_rss_mb']:,.0f} | {r['peak_anon_mb']:,.0f} "
            f"| {r['device_read_mb']:,.0f} |"
        )
    print("\n| round | copy + fsync s | streaming s | streaming / copy |\n|---|---:|---:|---:|")
    for number, r in enumerate(rounds, 1):
        print(f"| {number} | {r['copy']:.2f} | {r['streaming']:.2f} | {r['streaming'] / r['copy']:.2f}x |")
    for name, value in ratios.items():
        if not isinstance(value, list):
            print(f"{name}: {value:.2f}")
    if "bit_equal_to_in_memory" in stream:
        print(f"streaming output bit-equal to the in-memory (peft) output: {stream['bit_equal_to_in_memory']}")
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
