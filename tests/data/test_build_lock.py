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
