"""The store build lock: waits or reports busy, removes stale temp files only while held, deletes its file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from poisonscan.data.build_lock import building


def test_a_build_that_must_not_wait_sees_the_lock_busy(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    held = os.open(tmp_path / ".build.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    (tmp_path / ".images.npy.x1.tmp").write_bytes(b"0")             # the holder's own temp file
    with building(tmp_path, quiet=True, wait=False) as lock:
        assert lock == "busy"
    assert (tmp_path / ".images.npy.x1.tmp").exists() and (tmp_path / ".build.lock").exists()
    os.close(held)
    with building(tmp_path, quiet=True, wait=False) as lock:
        assert lock == "held" and not (tmp_path / ".images.npy.x1.tmp").exists()
    assert not (tmp_path / ".build.lock").exists()


def test_without_flock_nothing_is_locked_or_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import poisonscan.data.build_lock as bl

    fcntl = pytest.importorskip("fcntl")
    stale = tmp_path / ".images.npy.x2.tmp"
    stale.write_bytes(b"0")
    monkeypatch.setattr(bl, "fcntl", None)                            # a platform without fcntl
    with building(tmp_path, quiet=True) as lock:
        assert lock == "unlocked"

    class NoLocks:                                                    # a file system that refuses flock
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd: int, op: int) -> None:
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(bl, "fcntl", NoLocks)
    with building(tmp_path, quiet=True) as lock:
        assert lock == "unlocked"
    assert stale.exists() and not (tmp_path / ".build.lock").exists()  # maybe another builder's: left in place



def test_a_forked_worker_drops_its_copy_of_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fcntl = pytest.importorskip("fcntl")
    import poisonscan.data.build_lock as bl

    monkeypatch.setattr(bl, "unlink_quietly", lambda path: None)       # a lock file the builder cannot remove
    with building(tmp_path, quiet=True) as lock:
        assert lock == "held"
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        child = os.fork()
        if child == 0:                                                # a decode worker: drops its copy, lives on
            try:
                bl.close_inherited()
                os.write(ready_w, b"1")
                os.read(go_r, 1)
            finally:
                os._exit(0)
        assert os.read(ready_r, 1) == b"1"
    fd = os.open(tmp_path / ".build.lock", os.O_RDONLY)
    try:                                                              # the builder let go while its worker lives
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        os.write(go_w, b"1")
        os.waitpid(child, 0)
        for end in (ready_r, ready_w, go_r, go_w):
            os.close(end)
