"""The directories a user names (an input that must exist, an output that may be written), and reading an adapter's files.

Which adapter directories a run or checkpoint holds is `runs`' concern.

Examples:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
    >>> sorted(read_adapter_tensors(existing_directory("out/lora_adapters", "adapter")))
    ['base_model.model.q_proj.lora_A.weight', 'base_model.model.q_proj.lora_B.weight']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterVerificationError, HiggsTrainerError, UsageError, first_line
from ..names import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME

# directories the user names


def existing_directory(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a ``Path``; `UsageError` when it does not exist or is not a directory.

    Examples:
        >>> existing_directory("/", "base model")
        PosixPath('/')
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{what} {path} is a file; pass the directory that holds it")
    return path


def output_directory(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` as a ``Path`` after checking it may be written: absent, empty, or ``overwrite`` given.

    Refuses (`UsageError`) an output that is a file or a symbolic link, that is or contains the
    current directory, or that is, contains or lies inside one of ``inputs`` (`check_apart`):
    writing it replaces the whole directory, so ``--overwrite`` must never reach what is being read,
    and a new directory inside an input would change what a later command reads there.

    Examples:
        >>> output_directory("/tmp/does-not-exist-yet", overwrite=False)
        PosixPath('/tmp/does-not-exist-yet')
    """
    path = Path(path)
    if path.is_symlink():
        raise UsageError(f"output {path} is a symbolic link; name the directory it points to ({path.resolve()})")
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is a file")
    resolved = path.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise UsageError(f"output {path} is (or contains) the current directory; name a new directory")
    check_apart(path, inputs)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output directory {path} exists and is not empty; choose another or pass --overwrite")
    return path if path.name not in ("", ".", "..") else resolved


def check_apart(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """`UsageError` when ``output`` is, contains, or lies inside one of ``inputs`` (symbolic links resolved).

    The one check every command that writes a directory (extract, merge, convert) makes before it
    reads anything: an output that is or contains an input would replace it (``--overwrite``), and
    one inside an input (``convert RUN --output RUN/hf``) adds to or replaces part of what it reads.

    Examples:
        >>> check_apart("merged", ["base", "run/lora_adapters"])
        >>> check_apart("run/checkpoint-2/lora_adapters", ["run"])
        Traceback (most recent call last):
        ...
        higgs_trainer.errors.UsageError: output run/checkpoint-2/lora_adapters lies inside the input run; choose a directory outside it
    """
    resolved = Path(output).resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if source_resolved.is_relative_to(resolved):
            raise UsageError(f"output {output} would replace the input {source}; choose another output directory")
        if resolved.is_relative_to(source_resolved):
            raise UsageError(f"output {output} lies inside the input {source}; choose a directory outside it")


# reading an adapter's files


def read_json_object(path: Path, error: type[HiggsTrainerError]) -> dict:
    """The JSON object in the file at ``path``; ``error`` with a one-line message when it is unreadable or not an object.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("out/lora_adapters")
        >>> read_json_object(Path("out/lora_adapters/adapter_config.json"), AdapterVerificationError)["r"]
        2
    """
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise error(f"{path} does not hold a JSON object")
    return value


def read_adapter_config(directory: Path) -> dict:
    """Parse ``adapter_config.json`` of an adapter directory."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterVerificationError(f"{path} is missing: not an adapter directory")
    return read_json_object(path, AdapterVerificationError)


def read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Load the adapter weights of a directory: safetensors, or a pickle read with ``weights_only=True``."""
    safe_path, pickle_path = directory / SAFETENSORS_NAME, directory / PICKLE_NAME
    if safe_path.is_file():
        try:
            with safe_open(str(safe_path), framework="pt", device="cpu") as reader:
                return {key: reader.get_tensor(key) for key in reader.keys()}
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise AdapterVerificationError(f"cannot read {safe_path} (truncated or corrupt?): {exc}") from exc
    if pickle_path.is_file():
        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterVerificationError(
                f"cannot read {pickle_path} safely (weights_only=True refused it or it is corrupt): {exc}"
            ) from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterVerificationError(f"{pickle_path} does not hold a dict of tensors")
        return state
    raise AdapterVerificationError(f"{directory} has no {SAFETENSORS_NAME} (or {PICKLE_NAME})")


__all__ = [
    "check_apart",
    "existing_directory",
    "output_directory",
    "read_adapter_config",
    "read_adapter_tensors",
    "read_json_object",
]
