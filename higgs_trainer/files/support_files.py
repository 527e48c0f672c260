"""The files copied beside a model's (or an adapter's) weights when a command writes a new one: one list for all.

``merge`` writes the merged model beside the base's tokenizer, processor and generation files, and
``convert`` copies the same files next to the converted model or adapter: they hold nothing that
depends on the weights' layout (the text vocabulary and the generation settings are the same in
boson_multimodal's and transformers' Higgs layouts). ``README.md`` (a model card: its license
applies to what is derived from the weights) goes with them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Never weights: *.safetensors, *.bin and *.index.json are left out whatever the patterns match.
SUPPORT_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt")


def copy_support_files(source: Path, directory: Path) -> list[str]:
    """Copy the files of ``source`` that `SUPPORT_FILES` names (never weights) into ``directory``; their names.

    Examples:
        >>> _ = Path("base").mkdir(), Path("base/tokenizer.json").write_text("{}"), Path("out").mkdir()
        >>> _ = Path("base/generation_config.json").write_text("{}"), Path("base/model.safetensors").write_text("")
        >>> copy_support_files(Path("base"), Path("out"))
        ['generation_config.json', 'tokenizer.json']
    """
    copied = set()
    for pattern in SUPPORT_FILES:
        for file in sorted(source.glob(pattern)):
            if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(file, directory / file.name)
                copied.add(file.name)
    return sorted(copied)


__all__ = ["SUPPORT_FILES", "copy_support_files"]
