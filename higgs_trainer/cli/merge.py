"""``higgs-trainer merge --base B --adapter A -o OUT``: merge an adapter into its base (`merge_adapter`)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

from ..files.sizes import human_size
from ..merge.merging import merge_adapter

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Merge ``args.adapter`` into ``args.base``, write ``args.output`` and say what was written."""
    echo = args.echo
    result = merge_adapter(
        args.base,
        args.adapter,
        args.output,
        dtype=args.dtype,
        compare=args.compare,
        overwrite=args.overwrite,
        allow_untrained=args.allow_untrained,
        streaming=False if args.in_memory else None,
        max_shard_size=args.max_shard_size,
    )
    comparison = result.compare
    if comparison and comparison["base_vs_merged"]["max_abs"] == 0:
        logger.warning("the merge changed no logit on the probe: is the adapter trained?")
    if args.json:
        echo(json.dumps(asdict(result), indent=2))
        return 0
    saved = f", {len(result.modules_to_save)} modules_to_save" if result.modules_to_save else ""
    echo(
        f"Merged {result.adapter} ({result.merged_modules} LoRA modules{saved}) into {result.base} ({result.model_class}, "
        f"{result.dtype}) -> {result.path} ({human_size(result.num_bytes)}) in {result.seconds:.1f} s ({result.method})"
    )
    if comparison:
        base, adapter = comparison["base_vs_merged"], comparison["adapter_vs_merged"]
        echo(
            f"  logits on a {comparison['probe_tokens']}-token probe: base vs merged max |diff| {base['max_abs']:.4g} "
            f"(mean {base['mean_abs']:.4g}); adapter vs merged max |diff| {adapter['max_abs']:.4g}"
        )
    return 0
