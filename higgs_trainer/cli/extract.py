"""``higgs-trainer extract CHECKPOINT -o DIR``: rescue the adapter from a full checkpoint (`extract_adapter`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..extract.extraction import extract_adapter
from ..files.sizes import human_size


def run(args: argparse.Namespace) -> int:
    """Extract the adapter of ``args.checkpoint`` into ``args.output`` and say what was written."""
    echo = args.echo
    result = extract_adapter(
        args.checkpoint,
        args.output,
        lora_alpha=args.lora_alpha,
        adapter_config=args.adapter_config,
        prefix=args.prefix,
        overwrite=args.overwrite,
    )
    if args.json:
        echo(json.dumps(asdict(result), indent=2))
        return 0
    targets = result.target_modules if isinstance(result.target_modules, str) else ", ".join(result.target_modules)
    echo(
        f"Extracted {result.num_tensors} LoRA tensors ({result.num_parameters:,} parameters, "
        f"{human_size(result.num_bytes)}) from {result.checkpoint} (prefix {result.prefix!r}, "
        f"{human_size(result.checkpoint_bytes)} of weights) into {result.path} in {result.seconds:.2f} s"
    )
    echo(f"  r={result.r}, lora_alpha={result.lora_alpha:g} (from {result.alpha_source}); targets {targets}")
    if result.modules_to_save:
        echo(f"  modules_to_save (trained copies taken whole): {', '.join(result.modules_to_save)}")
    echo(f"  load it with PeftModel.from_pretrained(base_model, {result.path!r})")
    return 0
