"""Run folders: output file modes, absolute paths in saved configs, the run lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from poisonscan.config import DetectConfig
from poisonscan.data.writers import reshard
from poisonscan.data.sources import open_source
from poisonscan.errors import UsageError
from poisonscan.runs import (LOCK_NAME, RunDir, absolute_spec, atomic_save_npy, atomic_write_text, config_record,
                             create_run, file_mode, lock_run, releases_run_locks)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_get_the_umask_mode(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    assert file_mode() == mode
    for path in (atomic_write_text(tmp_path / "a.txt", "x"), atomic_save_npy(tmp_path / "b.npy", np.zeros(3))):
        assert _mode(path) == mode, path


def test_shards_and_encoders_get_the_umask_mode(tmp_path: Path, umask, wds_shards: Path) -> None:
    from poisonscan.models import create_encoder, save_encoder

    umask(0o027)
    res = reshard(open_source(wds_shards), [0, 1, 2], tmp_path / "shards", shard_size=2)
    enc = save_encoder(create_encoder("test_resnet", 16), tmp_path / "enc.safetensors")
    for path in [*res.shards, enc]:
        assert _mode(Path(path)) == 0o640, path


def test_absolute_spec_keeps_brace_patterns_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    assert absolute_spec("shards/train-{000000..000009}.tar.gz") == f"{here}/shards/train-{{000000..000009}}.tar.gz"
    assert absolute_spec("{a,b}.tar") == f"{here}/{{a,b}}.tar"
    assert absolute_spec("../up/{a,b}/x.tar") == f"{tmp_path.parent}/up/{{a,b}}/x.tar"
    assert absolute_spec("list.txt") == f"{here}/list.txt"
    assert absolute_spec("/abs/x") == "/abs/x" and absolute_spec("") == ""
    rec = config_record(DetectConfig(data="d/{0..1}.tar", model="m.safetensors", out="o", resume="o",
                                     quiet=True, overwrite=True))
    assert rec["data"] == f"{here}/d/{{0..1}}.tar" and rec["model"] == f"{here}/m.safetensors"
    assert rec["out"] == f"{here}/o" and rec["arch"] is None and rec["seed"] == 0
    assert not {"quiet", "overwrite", "resume"} & set(rec)          # invocation switches are not saved
    listed = config_record({"data": ["a.tar", "/b.tar"], "targets": ["cat=t.png", "dog"]})
    assert listed == {"data": [f"{here}/a.tar", "/b.tar"], "targets": [f"cat={here}/t.png", "dog"]}


HOLD = ("import sys; from poisonscan.runs import lock_run; lock = lock_run(sys.argv[1]); print('locked', flush=True);"
        " sys.stdin.read()")


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A run folder locked by another process: ``(folder, its pid)``; it lets go when the test ends."""
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield folder, proc.pid
    proc.communicate("", timeout=30)


def test_a_held_run_folder_is_refused_and_its_lock_kept(held: tuple[Path, int]) -> None:
    folder, pid = held
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UsageError, match=rf"run folder .*run is in use by another poisonscan process "
                                             rf"\(pid {pid}\)"):
            create_run("detect", folder, **kwargs)
    assert (folder / LOCK_NAME).read_text().strip() == str(pid)       # --overwrite left the holder's lock alone


def test_only_rank_zero_locks(held: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert lock_run(held[0]) is None
    assert create_run("detect", held[0], resume=True).lock is None


def test_the_lock_file_is_not_content_and_goes_with_the_command(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("12345\n")          # left by a killed process: not locked, not content
    calls = []

    @releases_run_locks
    def command() -> RunDir:
        run = create_run("detect", folder)
        calls.append(int((folder / LOCK_NAME).read_text()))
        return run

    assert command().lock is not None and calls == [os.getpid()]
    assert not (folder / LOCK_NAME).exists()
    command()                                           # released: the same process takes it again


def test_a_failed_command_removes_the_empty_folder_it_created(tmp_path: Path) -> None:
    @releases_run_locks
    def failing(out: Path) -> None:
        create_run("pretrain", out)
        raise UsageError("bad setting")

    with pytest.raises(UsageError):
        failing(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()                          # a folder the user made stays
    with pytest.raises(UsageError):
        failing(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())



def test_lock_never_writes_through_a_link(tmp_path):
    """A shared run folder whose .lock links elsewhere is refused, and the link's target is left alone."""
    from poisonscan.errors import UsageError
    from poisonscan.runs import LOCK_NAME, lock_run

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(UsageError, match="not a plain file"):
        lock_run(run)
    assert victim.read_text() == "keep me\n"


def test_a_run_folder_holding_a_link_is_refused(tmp_path):
    """Reopening a folder whose search/ links elsewhere (--resume, --overwrite) is refused before anything is written
    or cleared through it; the folder is left unlocked."""
    from poisonscan.errors import UsageError
    from poisonscan.runs import create_run, lock_run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep me\n")
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "search").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UsageError, match="holds a link"):
        create_run("detect", run, overwrite=True)
    with pytest.raises(UsageError, match="holds a link"):
        lock_run(run)
    (run / "search").unlink()
    (run / "stages" / "x.done").symlink_to(elsewhere / "keep.txt")
    with pytest.raises(UsageError, match="holds a link"):
        create_run("detect", run, resume=True)
    assert (elsewhere / "keep.txt").read_text() == "keep me\n"
    (run / "stages" / "x.done").unlink()
    lock = lock_run(run)                      # released: a plain folder locks again
    assert lock is not None
    lock.release()
