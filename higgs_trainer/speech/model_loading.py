"""A scorer's model: found where the user named it (one-line error when it is not there), run outside training.

Examples:
    >>> local_or_hub("no/such/model-dir")
    Traceback (most recent call last):
    FileNotFoundError: no such directory
    >>> local_or_hub("openai/whisper-small")  # not a path on disk: a hub name, from the local cache or the hub
    'openai/whisper-small'
"""

from __future__ import annotations

import contextlib
import os

import torch


def local_or_hub(model: str | os.PathLike) -> str:
    """``model`` as transformers takes it: an existing directory, or a hub name (``owner/name``) left as it is.

    A name that looks like a path (absolute, ``./``, more than one ``/``, or an existing parent) and is
    not a directory is refused here, before transformers would ask the hub for it.
    """
    name = os.fspath(model)
    if os.path.isdir(name):
        return name
    looks_like_path = (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~"))
        or name.count("/") > 1
        or os.path.exists(name)
        or (os.sep in name and os.path.isdir(os.path.dirname(name)))
    )
    if looks_like_path:
        raise FileNotFoundError("no such directory")
    return name


def untouched_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which a scorer's model may draw random numbers without moving training's RNG streams.

    Some audio models draw from the global generator even in eval mode; a scorer running at a save must
    leave the next training step's dropout and sampling as they would have been without it.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> with untouched_rng(torch.device("cpu")):
        ...     _ = torch.rand(3)
        >>> torch.equal(torch.rand(1), torch.manual_seed(0) and torch.rand(1))
        True
    """
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
