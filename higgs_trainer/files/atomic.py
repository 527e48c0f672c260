"""Write a directory all at once: stage it beside the target, then rename it into place.

A failed or interrupted write leaves the previous target as it was; a completed one leaves
no staging residue (earlier interrupted writes' residue is removed too). A write killed
between its two renames leaves the previous target moved aside (``.<name>.old-*``):
`find_directory` finds it there for every reader, and the next write moves it back.
One writer at a time per target: a second process writing the same target while the first
is still at it fails at once with a clear error (`writer_lock`), and never touches the first
one's staging directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

logger = logging.getLogger(__name__)

_commit_listeners: list[Callable[[Path], None]] = []


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directory itself to disk."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _open_file_modes(directory: Path) -> None:
    """Give the files under ``directory`` the mode a plain ``open()`` gives (the umask applied), as the directory has.

    safetensors (0.8) writes its files owner-only (0600): on a shared training box nobody else
    could read an adapter or a merged model. ``directory`` was made with ``mkdir``, so its mode is
    ``0o777 & ~umask``; a file's is the same without the execute bits.
    """
    mode = directory.stat().st_mode & 0o666
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _moved_aside(target: Path) -> list[Path]:
    """Earlier targets that writes moved aside (``.<name>.old-*``), oldest first."""
    return sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)


def check_replaceable(target: Path) -> None:
    """Raise ``OSError`` unless ``target`` is absent or a real directory (not a symbolic link, not a file).

    Checked before anything is written: replacing a link or a file the user put there is never
    what they meant, and discovering it only at the final rename would leave both behind.

    Examples:
        >>> check_replaceable(Path("/tmp/does-not-exist-yet"))
    """
    if target.is_symlink():
        raise NotADirectoryError(
            f"{target} is a symbolic link (to {os.readlink(target)}), not a directory this library wrote; "
            "remove the link or write elsewhere"
        )
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; remove it or write elsewhere")


def find_directory(target: str | os.PathLike) -> Path:
    """``target``, or the previous ``target`` that a write killed between its two renames left moved aside.

    For every reader of a directory written with `staged_directory` (verify, merge, extract,
    resume): ``target`` is missing only when it was never written. The moved-aside copy is read
    where it is, never moved back here (a reader renaming it could break a writer that is still
    running); the next write moves it back.

    Examples:
        >>> find_directory("/tmp/never-written")
        PosixPath('/tmp/never-written')
    """
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return target
    moved_aside = _moved_aside(target)
    if not moved_aside:
        return target
    logger.warning("%s is missing: a write was interrupted after moving it aside; reading %s", target, moved_aside[-1])
    return moved_aside[-1]


def replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is moved aside first and removed after.

    If the second rename fails, the previous ``target`` is moved back before the error propagates.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(source, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


def write_file_atomically(target: str | os.PathLike, content: str | bytes) -> Path:
    """Write ``content`` to ``target`` all at once: into a temporary file beside it, flushed, then renamed over it.

    A reader (a browser reloading a page, a second process) sees the old file or the new one, never half of
    either; a failed write leaves the old file and no temporary one. The file gets the mode a plain ``open()``
    gives (the umask applies).

    Examples:
        >>> write_file_atomically("out/page.html", "<p>hello</p>")
        PosixPath('out/page.html')
        >>> Path("out/page.html").read_text(), sorted(p.name for p in Path("out").iterdir())
        ('<p>hello</p>', ['page.html'])
    """
    target = Path(target)
    if target.is_symlink() or target.is_dir():
        raise IsADirectoryError(
            f"{target} is a directory or a symbolic link, not a file this library wrote; write elsewhere"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_dir(target.parent)
    return target


def remove_residue(target: Path) -> None:
    """Clean up beside ``target`` after interrupted writes (call it holding `writer_lock`, as `staged_directory` does).

    A previous ``target`` moved aside by a write that died between its two renames
    (``.<name>.old-*`` with no ``target``) is moved back; other leftovers are deleted.
    """
    moved_aside = _moved_aside(target)
    if moved_aside and not target.exists():
        os.rename(moved_aside.pop(), target)
    for leftover in [*target.parent.glob(f".{target.name}.tmp-*"), *moved_aside]:
        shutil.rmtree(leftover, ignore_errors=True)


def as_os_error(exc: SafetensorError) -> OSError:
    """The ``OSError`` inside a safetensors write error (a full disk: ``IoError(Os { code: 28, ... })`` or ``... (os error 28)``).

    safetensors raises its own exception type for I/O failures; writers here report every failed
    write as an ``OSError``, so callers need one ``except``.

    Examples:
        >>> str(as_os_error(SafetensorError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')))
        '[Errno 28] No space left on device'
    """
    code = re.search(r"code: (\d+)|os error (\d+)", str(exc))
    if code:
        errno = int(code.group(1) or code.group(2))
        return OSError(errno, os.strerror(errno))
    return OSError(f"safetensors could not write: {' '.join(str(exc).split())}")


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold the one writer's lock of ``target`` (``.<name>.lock`` beside it, removed on release).

    An advisory ``flock`` the kernel drops when the holder dies, so a killed writer never leaves
    a stale lock. Taken without waiting: while another process writes ``target``, raises
    ``OSError`` (``EBUSY``) naming the target and that process, and changes nothing. The lock file
    is removed while still held; a process that opened it just before re-checks that the file
    it locked is still the one at that path.

    Examples:
        >>> with writer_lock("merged"):
        ...     with writer_lock("merged"):  # a second writer of the same target
        ...         pass
        Traceback (most recent call last):
        OSError: [Errno 16] another process (pid ...) is writing merged: wait for it to finish, or write elsewhere
    """
    target = Path(target)
    path = _lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OSError(
                errno.EBUSY,
                f"another process (pid {holder}) is writing {target}: wait for it to finish, or write elsewhere",
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed that file while this process opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def commits_announced_to(listener: Callable[[Path], None]) -> Iterator[None]:
    """In the block, call ``listener(target)`` as each `staged_directory` starts to put its finished ``target`` in place.

    From that call on, the write completes unless a rename itself fails: the CLI lets a signal that
    arrives then finish the command, rather than call a complete output a failure.

    Examples:
        >>> with commits_announced_to(print), staged_directory("out/adapter") as staging:
        ...     _ = (staging / "adapter_config.json").write_text("{}")
        out/adapter
    """
    _commit_listeners.append(listener)
    try:
        yield
    finally:
        _commit_listeners.remove(listener)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    If the body raises, the staging directory is removed and ``target`` is untouched. Files are
    flushed to disk before the rename. The directory and its files get the modes a plain ``mkdir``
    and ``open`` give (the umask applies), not ``tempfile.mkdtemp``'s or safetensors' owner-only ones. A ``target`` that is a symbolic
    link or a file is refused (``NotADirectoryError``) before anything is written; a safetensors
    write error in the body is raised as the ``OSError`` it wraps.

    Examples:
        >>> with staged_directory("out/lora_adapters") as staging:
        ...     _ = (staging / "adapter_config.json").write_text("{}")
        >>> sorted(p.name for p in Path("out/lora_adapters").iterdir())
        ['adapter_config.json']
        >>> with staged_directory("out/lora_adapters") as staging:  # a failed write leaves the target as it was
        ...     raise OSError("disk full")
        Traceback (most recent call last):
        OSError: disk full
        >>> sorted(p.name for p in Path("out").iterdir())
        ['lora_adapters']
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(target):  # residue removal below deletes only what no live writer of target owns
        remove_residue(target)  # first, so that a previous target an interrupted write moved aside is back
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            try:
                yield staging
            except SafetensorError as exc:
                raise as_os_error(exc) from exc
            _open_file_modes(staging)
            fsync_tree(staging)
            for listener in list(_commit_listeners):
                listener(target)
            replace_directory(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        remove_residue(target)
