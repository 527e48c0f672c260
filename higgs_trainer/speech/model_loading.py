"""Loading a scorer's model from where the user named it, with a one-line error when it cannot be loaded.

Examples:
    >>> local_or_hub("no/such/model-dir")
    Traceback (most recent call last):
    FileNotFoundError: no such directory
    >>> local_or_hub("openai/whisper-small")  # not a path on disk: a hub name, from the local cache or the hub
    'openai/whisper-small'
"""

from __future__ import annotations

import os


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
