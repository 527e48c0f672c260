"""`higgs-trainer convert` of a synthetic multi-GB Higgs model: peak memory against the largest tensor.

    python benchmarks/bench_convert.py [--layers 12] [--hidden 2048] [--work /tmp/bench-convert]

Builds once a bf16 boson-layout (``higgs_audio``) model with exactly the weights its config implies
(`higgs_trainer.convert.configs.expected_shapes`; vocabulary 128256 as in Higgs Audio v2, so the largest
tensors are the text embedding and the text head), in 2 safetensors shards, its embedding split as
boson's ``freeze_embed_until_idx`` saves it (so one output tensor is joined from two). Then, each in a
fresh process: ``import higgs_trainer.cli.convert`` alone (the command's import floor), and ``higgs-trainer convert --to transformers``.
Peak RSS is ``ru_maxrss``; peak anonymous memory (what is not file pages of the mmapped inputs) is
sampled from ``/proc/PID/status`` every 5 ms.

Target (issue 11): convert's peak anonymous memory over the import floor within about 2x the largest
tensor (a joined tensor holds both halves and the result), whatever the model's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench_extract_merge import measure as measure_child

VOCAB, HEADS, KV_HEADS = 128256, 16, 4


def config(layers: int, hidden: int) -> dict:
    return {
        "model_type": "higgs_audio", "audio_adapter_type": "dual_ffn", "audio_dual_ffn_layers": list(range(layers)),
        "skip_audio_tower": True, "audio_num_codebooks": 8, "audio_codebook_size": 1024, "torch_dtype": "bfloat16",
        "text_config": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden,
                        "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": HEADS,
                        "num_key_value_heads": KV_HEADS, "head_dim": hidden // HEADS},
    }  # fmt: skip


def build(work: Path, layers: int, hidden: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from higgs_trainer.convert import configs

    source = work / f"boson-{layers}x{hidden}"
    if (source / "config.json").is_file():
        return {"source": str(source)}
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    cfg = config(layers, hidden)
    shapes = configs.expected_shapes(cfg, "boson")
    del shapes["embed_tokens.weight"]
    shapes["embed_tokens.embedding_frozen.weight"] = (VOCAB - 256, hidden)
    shapes["embed_tokens.embedding_trainable.weight"] = (256, hidden)
    keys = sorted(shapes)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: torch.full(shapes[k], 0.5, dtype=torch.bfloat16) for k in part}, str(source / name))
        weight_map.update(dict.fromkeys(part, name))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (source / "config.json").write_text(json.dumps(cfg))
    return {"source": str(source)}


def measure(mode: str, *args: str) -> dict:
    """This script's child ``mode`` in a fresh process, measured (`bench_extract_merge.measure`)."""
    return measure_child(mode, *args, script=__file__)


def child(mode: str, args: list[str]) -> None:
    if mode == "build":
        print(json.dumps(build(Path(args[0]), int(args[1]), int(args[2]))))
        return
    import higgs_trainer.cli.convert  # noqa: F401  (the command module imports the library)
    from higgs_trainer.cli import main

    if mode == "import":
        print(json.dumps({}))
        return
    start = time.perf_counter()
    code = main(args)
    print(json.dumps({"work_seconds": round(time.perf_counter() - start, 2), "exit": code}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--work", default="/tmp/bench-convert")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    work = Path(args.work)
    source = Path(measure("build", str(work), str(args.layers), str(args.hidden))["source"])
    model_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    largest = VOCAB * args.hidden * 2  # embed_tokens / text_lm_head, bf16
    output = work / "converted"
    shutil.rmtree(output, ignore_errors=True)
    floor = measure("import")
    run = measure("convert", "convert", str(source), "--to", "transformers", "--output", str(output))
    shutil.rmtree(output, ignore_errors=True)
    mib = 2**20
    report = {
        "model_mib": round(model_bytes / mib),
        "largest_tensor_mib": round(largest / mib),
        "import_floor": floor,
        "convert": run,
        "anon_over_floor_mib": round(run["peak_anon_mb"] - floor["peak_anon_mb"]),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
