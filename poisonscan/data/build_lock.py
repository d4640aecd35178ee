"""The lock a store build holds on its folder: one builder at a time, and what an interrupted one left removed.

An exclusive ``flock`` on ``<folder>/.build.lock``, opened never through a link. The file is deleted before it is
unlocked; a waiter that then holds the deleted file locks anew (the protocol of the run-folder lock in
``poisonscan.runs``). Without ``fcntl``, or on a file system without ``flock``, nothing is locked and nothing removed.
A forked decode worker inherits the descriptor, and with it the lock; :func:`close_inherited` drops the worker's copy,
so the lock ends when the builder lets it go, not when its last worker exits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from poisonscan.errors import UsageError
from poisonscan.runs import same_file

try:
    import fcntl
except ImportError:             # no flock on this platform: store builds are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".build.lock"
_held: set[int] = set()                         # descriptors this process holds locked (copied into forked children)


@contextlib.contextmanager
def building(path: Path, quiet: bool, wait: bool = True, images_file: str = "images.npy") -> Iterator[str]:
    """Hold an exclusive ``flock`` on ``path/.build.lock`` while a store is written at ``path``.

    Yields ``"held"``; ``"busy"`` when ``wait`` is False and another process holds it; ``"unlocked"`` where
    nothing can be locked (no ``fcntl``, or a file system without ``flock``). A second process building at the same
    ``path`` waits for the first. While the lock is held no other builder writes there, so the temp files an
    interrupted build left beside ``images_file`` (``.<images_file>.*.tmp``, reserved at full size) are removed.
    """
    fd = _lock_build(path, quiet, wait) if fcntl is not None else None
    if not isinstance(fd, int):
        yield fd or "unlocked"
        return
    _held.add(fd)
    try:
        for stale in path.glob(f".{images_file}.*.tmp"):
            unlink_quietly(stale)
        yield "held"
    finally:
        unlink_quietly(path / LOCK_FILE)
        _held.discard(fd)
        os.close(fd)                            # closing the last copy of the descriptor releases the lock


def close_inherited(_worker_id: int = 0) -> None:
    """Close, in a forked child (a DataLoader worker: usable as its ``worker_init_fn``), the copies of the lock
    descriptors its parent held. ``flock`` is released only when every copy is closed; the parent's stays."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:                             # not ours to remove (a shared folder) or not a file: leave it
        pass


def _lock_build(path: Path, quiet: bool, wait: bool) -> int | str | None:
    """The descriptor of ``path/.build.lock``, exclusively locked (waiting, with one line on stderr, while another
    process holds it); ``"busy"`` when ``wait`` is False and it is held; None where ``flock`` is not supported."""
    lock = path / LOCK_FILE
    said = quiet
    while True:
        try:        # never through a link: a shared cache folder's lock must not point the open elsewhere
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise UsageError(f"cannot lock the image store {path}: {lock} is not a plain file we can open "
                             f"({exc.strerror or exc})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"cannot lock the image store {path}: {lock} is not a regular file")
            got = _flock(fd, blocking=False)
            if got is False and not wait:
                os.close(fd)
                return "busy"
            if got is False:
                if not said:
                    print(f"poisonscan: waiting for another process building the image store at {path}",
                          file=sys.stderr, flush=True)
                    said = True
                got = _flock(fd, blocking=True)
            if got is None:
                os.close(fd)
                unlink_quietly(lock)
                return None
        except BaseException:
            os.close(fd)
            raise
        if same_file(fd, lock):
            return fd
        os.close(fd)                            # its holder finished and deleted it meanwhile: lock anew


def _flock(fd: int, blocking: bool) -> bool | None:
    """Lock ``fd`` exclusively: True when locked, False when another process holds it (only when not
    ``blocking``), None where the file system does not support ``flock`` (some network mounts)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if not blocking and exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise UsageError(f"cannot lock the image store: {exc.strerror or exc}") from None
