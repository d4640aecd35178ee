"""ImageStore: decode, resize/crop, cache and reuse, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from poisonscan.data.sources import SampleError, open_source
from poisonscan.data.store import (ImageStore, build_store, open_store, resize_center_crop, write_errors_csv)
from poisonscan.errors import DataError, UsageError


@pytest.mark.parametrize("wh", [(40, 30), (30, 47), (64, 64), (17, 90)])
def test_resize_center_crop_matches_torchvision(wh: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ref = np.asarray(T.Compose([T.Resize(24), T.CenterCrop(24)])(img))
    out = resize_center_crop(img, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert np.array_equal(out, ref)


def test_build_store_in_memory(image_folder: Path) -> None:
    src = open_source(image_folder)
    store = build_store(src, 16, num_workers=0)
    assert isinstance(store, ImageStore) and store.path is None
    assert store.images.shape == (6, 3, 16, 16) and store.images.dtype == torch.uint8
    assert store.ids == src.ids and store.labels == src.labels and store.source_indices == list(range(6))
    assert store.class_names == ["cat", "dog"] and store.label_array().tolist() == src.labels
    expected = resize_center_crop(src.load(3).image, 16).transpose(2, 0, 1)
    assert np.array_equal(store.images[3].numpy(), expected)
    fast = build_store(src, 16, num_workers=0, draft=True)  # JPEG DCT-scaled decode: close, not identical
    assert (fast.images.int() - store.images.int()).abs().float().mean() < 20


def test_build_store_leaves_out_and_lists_errors(corrupt_folder: Path, tmp_path: Path) -> None:
    src = open_source(corrupt_folder)
    store = build_store(src, 8, path=tmp_path / "store", num_workers=0)
    assert store.ids == [f"a/good_{i}.png" for i in range(3)]
    assert store.source_indices == [src.ids.index(i) for i in store.ids]
    assert sorted(e.id for e in store.errors) == ["a/bad.jpg", "a/empty.png", "a/trunc.jpg"]
    assert store.images.shape == (3, 3, 8, 8)
    for k, i in enumerate(store.source_indices):
        assert np.array_equal(store.images[k].numpy(), resize_center_crop(src.load(i).image, 8).transpose(2, 0, 1))
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["images.npy", "store.json"]
    write_errors_csv(store.errors, tmp_path / "errors.csv")
    with open(tmp_path / "errors.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "reason"] and {r[0] for r in rows[1:]} == {e.id for e in store.errors}


def test_store_is_saved_and_reused(wds_shards_gz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = open_source(wds_shards_gz)
    path = tmp_path / "store"
    first = build_store(src, 16, path=path, num_workers=0)
    meta = json.loads((path / "store.json").read_text())
    assert meta["size"] == 16 and meta["ids"] == src.ids and meta["source"]["kind"] == "wds"

    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of reusing the saved store")

    monkeypatch.setattr(type(src), "iter_indexed", boom)
    again = build_store(src, 16, path=path)
    assert again.ids == first.ids and torch.equal(again.images, first.images)
    assert open_store(path).labels == src.labels
    monkeypatch.undo()
    other = build_store(src, 12, path=path, num_workers=0)  # a different size rebuilds
    assert other.images.shape == (8, 3, 12, 12)


def test_new_pixels_under_old_names_are_decoded_anew(image_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "store"
    first = build_store(open_source(image_folder), 16, path=path, num_workers=0)
    image = image_folder / "cat" / "cat_0.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)                 # the same name, other pixels
    again = build_store(open_source(image_folder), 16, path=path, num_workers=0)
    k = again.ids.index("cat/cat_0.png")
    assert again.ids == first.ids and not torch.equal(again.images[k], first.images[k])
    assert torch.all(again.images[k][0] == 255) and torch.all(again.images[k][1:] == 0)
    assert json.loads((path / "store.json").read_text())["source_files"] == open_source(image_folder).fingerprint()


def test_build_removes_what_an_interrupted_build_left(wds_shards_gz: Path, tmp_path: Path) -> None:
    pytest.importorskip("fcntl")
    path = tmp_path / "store"
    path.mkdir()
    stale = path / ".images.npy.k2j4x9.tmp"            # a build killed mid-decode leaves its full-size map
    stale.write_bytes(b"\0" * 4096)
    other = path / "notes.txt"
    other.write_text("kept")
    store = build_store(open_source(wds_shards_gz), 16, path=path, num_workers=0)
    assert len(store) == 8 and not stale.exists() and other.read_text() == "kept"
    assert sorted(p.name for p in path.iterdir()) == ["images.npy", "notes.txt", "store.json"]


def test_concurrent_build_waits_and_reuses(wds_shards_gz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fcntl = pytest.importorskip("fcntl")
    src = open_source(wds_shards_gz)
    done = build_store(src, 16, path=tmp_path / "built", num_workers=0)
    path = tmp_path / "store"
    path.mkdir()
    held = os.open(path / ".build.lock", os.O_RDWR | os.O_CREAT)   # another builder holds the lock
    fcntl.flock(held, fcntl.LOCK_EX)
    got: list[ImageStore] = []
    worker = threading.Thread(target=lambda: got.append(build_store(src, 16, path=path, num_workers=0)))
    worker.start()
    err = ""
    for _ in range(600):                                              # until it says it waits for the holder
        err += capsys.readouterr().err
        if "waiting for another process building the image store" in err or not worker.is_alive():
            break
        time.sleep(0.05)
    assert "waiting for another process building the image store" in err
    assert worker.is_alive() and not (path / "store.json").exists()    # it waits instead of decoding alongside
    for name in ("images.npy", "store.json"):                         # the holder finishes the store ...
        shutil.copy(tmp_path / "built" / name, path / name)

    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of reusing the store built meanwhile")

    monkeypatch.setattr(type(src), "iter_indexed", boom)
    (path / ".build.lock").unlink()                                   # ... and releases it as a build does
    os.close(held)
    worker.join(30)
    assert not worker.is_alive() and got and got[0].ids == done.ids and torch.equal(got[0].images, done.images)
    assert sorted(p.name for p in path.iterdir()) == ["images.npy", "store.json"]


def test_build_refuses_a_link_at_the_lock(wds_shards_gz: Path, tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched")
    (path / ".build.lock").symlink_to(target)
    with pytest.raises(UsageError, match="cannot lock the image store"):
        build_store(open_source(wds_shards_gz), 16, path=path, num_workers=0)
    assert target.read_text() == "untouched" and not (path / "store.json").exists()


def test_parallel_workers_match_serial(wds_shards_gz: Path, file_list: Path) -> None:
    for spec in (wds_shards_gz, file_list):
        src = open_source(spec)
        serial = build_store(src, 16, num_workers=0)
        parallel = build_store(src, 16, num_workers=2, batch_size=2)
        assert parallel.ids == serial.ids and torch.equal(parallel.images, serial.images)


@pytest.mark.skipif(__import__("multiprocessing").get_start_method() != "fork",
                    reason="workers inherit descriptors only when forked")
def test_decode_workers_drop_the_build_lock(wds_shards_gz: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import poisonscan.data.build_lock as bl
    import poisonscan.data.store as store_module

    seen: list[tuple[int, ...]] = []

    def worker_init(worker_id: int) -> None:                         # runs in each forked decode worker
        inherited = tuple(bl._held)
        bl.close_inherited(worker_id)
        for fd in inherited:
            with pytest.raises(OSError):                             # the worker's copy is closed
                os.fstat(fd)
        (tmp_path / f"worker{worker_id}-dropped{len(inherited)}").touch()

    monkeypatch.setattr(store_module, "close_inherited", worker_init)
    real = store_module.DataLoader

    def loader(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(tuple(bl._held))                                 # the builder holds the lock while decoding
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "DataLoader", loader)
    serial = build_store(open_source(wds_shards_gz), 16, num_workers=0)
    store = build_store(open_source(wds_shards_gz), 16, path=tmp_path / "s", num_workers=2, batch_size=2)
    assert store.ids == serial.ids and torch.equal(store.images, serial.images)
    assert seen[-1] and not bl._held and not (tmp_path / "s" / ".build.lock").exists()
    assert sorted(p.name for p in tmp_path.glob("worker*")) == ["worker0-dropped1", "worker1-dropped1"]


def test_store_with_non_utf8_ids(tmp_path: Path, make_images) -> None:
    import os

    root = tmp_path / "u"
    root.mkdir()
    make_images(1, 16, 0)[0].save(os.fsencode(root) + b"/caf\xe9.png", format="PNG")
    src = open_source(root)
    store = build_store(src, 8, path=tmp_path / "s", num_workers=0)
    assert open_store(tmp_path / "s").ids == src.ids
    write_errors_csv([SampleError(src.ids[0], "a, \"quoted\" reason")], tmp_path / "e.csv")


def test_open_store_missing_and_bad_size(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DataError, match="no image store"):
        open_store(tmp_path / "nothing")
    with pytest.raises(DataError):
        build_store(open_source(image_folder), 0)


def _distributed_worker(rank: int, world: int, init: str, spec: str, out: str) -> None:
    import torch.distributed as dist

    from poisonscan.runtime import Runtime

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        runtime = Runtime(torch.device("cpu"), None, rank=rank, world_size=world)
        store = build_store(open_source(spec), 16, path=Path(out), runtime=runtime, num_workers=0, batch_size=2)
        torch.save({"ids": store.ids, "images": store.images.clone()}, f"{out}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_build_store_distributed_matches_single(corrupt_folder: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    serial = build_store(open_source(corrupt_folder), 16, num_workers=0)
    out = tmp_path / "store"
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path / 'rdv'}", str(corrupt_folder), str(out)), nprocs=2)
    for rank in range(2):
        got = torch.load(f"{out}.rank{rank}.pt", weights_only=True)
        assert got["ids"] == serial.ids and torch.equal(got["images"], serial.images)
    saved = open_store(out)
    assert saved.ids == serial.ids and torch.equal(saved.images, serial.images)
    assert sorted(e.id for e in saved.errors) == sorted(e.id for e in serial.errors)
