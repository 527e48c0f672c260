"""Copy a model directory's support files (tokenizer, generation and processor configs; never weights) beside new weights."""

from __future__ import annotations

import shutil
from pathlib import Path

# Files of the base copied next to the merged weights (tokenizer, generation and processor configs).
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
)


def copy_support_files(base_dir: Path, directory: Path, patterns: tuple[str, ...] = SUPPORT_FILES) -> list[str]:
    """Copy the files of ``base_dir`` matching ``patterns`` (tokenizer, processor, ...; never weights) into ``directory``.

    Examples:
        >>> _ = Path("base").mkdir(), Path("base/tokenizer.json").write_text("{}"), Path("out").mkdir()
        >>> copy_support_files(Path("base"), Path("out"))
        ['tokenizer.json']
    """
    copied = []
    for pattern in patterns:
        for source in sorted(base_dir.glob(pattern)):
            if source.is_file() and not source.name.endswith((".safetensors", ".bin", ".index.json")):
                shutil.copy2(source, directory / source.name)
                copied.append(source.name)
    return sorted(set(copied))
