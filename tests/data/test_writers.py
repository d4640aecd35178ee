"""Manifests, removal lists and re-sharding."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poisonscan.data.sources import ManifestSource, Sample, open_source
from poisonscan.data.writers import (TarWriter, read_removal_list, removal_indices, reshard, safe_key, unique_name,
                                     write_manifest, write_removal_list)
from poisonscan.data.store import build_store
from poisonscan.errors import DataError


def _pixels(src, i: int) -> np.ndarray:
    return np.asarray(src.load(i).image)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fixture", ["image_folder", "file_list"])
def test_file_manifest_round_trip(request: pytest.FixtureRequest, fixture: str, tmp_path: Path) -> None:
    src = open_source(request.getfixturevalue(fixture))
    keep = [5, 0, 3, 3]
    path = write_manifest(src, keep, tmp_path / "out" / "clean.txt")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(os.path.isabs(line.rsplit(" ", 1)[0]) for line in lines)
    back = open_source(path)
    assert back.kind == "filelist" and len(back) == 3
    assert back.labels == [src.labels[i] for i in (0, 3, 5)]
    for k, i in enumerate((0, 3, 5)):
        assert np.array_equal(_pixels(back, k), _pixels(src, i))


@pytest.mark.parametrize("fixture", ["wds_shards", "wds_shards_gz"])
def test_wds_manifest_round_trip(request: pytest.FixtureRequest, fixture: str, tmp_path: Path) -> None:
    src = open_source(request.getfixturevalue(fixture))
    keep = [1, 4, 6]
    path = write_manifest(src, keep, tmp_path / "clean.tsv")
    back = open_source(path)
    assert isinstance(back, ManifestSource) and back.kind == "wds-manifest"
    assert back.ids == [src.ids[i] for i in keep] and back.labels == [src.labels[i] for i in keep]
    assert [s.id for s in back.iter_samples() if isinstance(s, Sample)] == back.ids
    assert np.array_equal(_pixels(back, 2), _pixels(src, 6))
    store = build_store(back, 8, num_workers=0)
    assert store.ids == back.ids and store.images.shape == (3, 3, 8, 8)
    # a manifest of a manifest is the same manifest
    again = write_manifest(back, [0, 2], tmp_path / "again.tsv")
    assert open_source(again).ids == [src.ids[1], src.ids[6]]


def test_wds_manifest_reports_unknown_and_repeated_lines(wds_shards: Path, tmp_path: Path) -> None:
    shard = wds_shards / "train-000000.tar"
    path = tmp_path / "m.tsv"
    path.write_text(f"{shard}\ts0001\n{shard}\tmissing\n{shard}\ts0001\n")
    src = open_source(path)
    assert src.ids == ["train-000000.tar::s0001"]
    assert {e.reason.split(";")[0] for e in src.errors} == {"listed in the manifest but not found in the shard",
                                                           "listed more than once"}
    path.write_text(f"{shard}\tmissing\n")
    with pytest.raises(DataError, match="none of the samples"):
        open_source(path)


def test_keep_index_out_of_range(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="out of range"):
        write_manifest(open_source(image_folder), [6], tmp_path / "m.txt")


def test_removal_list_round_trip(tmp_path: Path) -> None:
    ids = ["cat/a b.png", "#hash.jpg", "train-000000.tar::k1", os.fsdecode(b"caf\xe9.png"), "cat/a b.png"]
    path = write_removal_list(ids, tmp_path / "removed.txt")
    assert read_removal_list(path) == ids[:4]
    with pytest.raises(DataError):
        write_removal_list(["a\nb"], tmp_path / "bad.txt")
    with pytest.raises(DataError):
        read_removal_list(tmp_path / "absent.txt")


def test_non_utf8_manifest_round_trip(tmp_path: Path, make_images) -> None:
    root = tmp_path / "u"
    (root / "c").mkdir(parents=True)
    make_images(1, 16, 0)[0].save(os.fsencode(root / "c") + b"/caf\xe9.png", format="PNG")
    src = open_source(root)
    back = open_source(write_manifest(src, [0], tmp_path / "m.txt"))
    assert back.load(0).label == 0 and back.ids[0].endswith(os.fsdecode(b"caf\xe9.png"))


def test_removal_indices(image_folder: Path) -> None:
    src = open_source(image_folder)
    keep, removed, unknown = removal_indices(src, ["dog/dog_0.jpg", "nope.png", "cat/cat_2.png"])
    assert removed == [2, 3] and keep == [0, 1, 4, 5] and unknown == ["nope.png"]


def test_reshard_sanitises_names(tmp_path: Path, write_shard, make_images) -> None:
    imgs = make_images(4, 16, 5)
    names = ["../evil", "/abs/evil", "a/b/same", "c/same"]
    members = []
    for name, img in zip(names, imgs):
        members += [(f"{name}.png", _png(img)), (f"{name}.cls", b"3")]
    src = open_source(write_shard(tmp_path / "in" / "bad.tar", members))
    out = tmp_path / "out"
    res = reshard(src, range(4), out)
    assert res.n_written == 4 and not res.errors and [p.name for p in res.shards] == ["shard-000000.tar"]
    with tarfile.open(res.shards[0]) as tar:
        got = tar.getnames()
    assert got == ["evil.cls", "evil.png", "evil-2.cls", "evil-2.png", "same.cls", "same.png",
                   "same-2.cls", "same-2.png"]
    assert all("/" not in n and ".." not in n for n in got)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert not (tmp_path / "evil.png").exists() and not Path("/abs").exists()
    back = open_source(out)
    assert back.labels == [3] * 4
    for i in range(4):
        assert np.array_equal(_pixels(back, i), _pixels(src, i))
    assert safe_key("x/../y z.tar") == "y_z_tar" and safe_key("...") == "sample"


def test_reshard_folder_split_compress_and_guards(image_folder: Path, tmp_path: Path) -> None:
    src = open_source(image_folder)
    res = reshard(src, [0, 1, 2, 4, 5], tmp_path / "rs", shard_size=2, compress=True, prefix="clean")
    assert [p.name for p in res.shards] == [f"clean-00000{k}.tar.gz" for k in range(3)]
    back = open_source(tmp_path / "rs")
    assert back.ids[0] == "clean-000000.tar.gz::cat_0" and back.labels == [0, 0, 0, 1, 1]
    assert np.array_equal(_pixels(back, 3), _pixels(src, 4))
    with pytest.raises(DataError, match="not empty"):
        reshard(src, [0], tmp_path / "rs")
    with pytest.raises(DataError, match="overlaps the input"):
        reshard(src, [0], image_folder / "shards")
    assert not (image_folder / "shards").exists()


def test_tar_writer_is_deterministic_and_atomic(tmp_path: Path) -> None:
    members = {"png": b"\x89PNG fake", "cls": b"3"}
    paths = []
    for name in ("a.tar.gz", "b.tar.gz"):
        w = TarWriter(tmp_path / name)
        w.add_sample("k", members)
        assert not (tmp_path / name).exists()          # only the temp file until close
        paths.append(w.close())
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with tarfile.open(paths[0]) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["k.cls", "k.png"] and all(i.mtime == 0 and i.uid == 0 for i in infos)
    w = TarWriter(tmp_path / "c.tar")
    w.add("x.png", b"1")
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.tar.gz"]


def test_unique_name_numbers_the_stem() -> None:
    used: set[str] = set()
    assert [unique_name(n, used) for n in ("a/x.png", "a/x.png", "a/x.png", "b.v2/key")] == [
        "a/x.png", "a/x-2.png", "a/x-3.png", "b.v2/key"]
    assert unique_name("b.v2/key", used) == "b.v2/key-2"       # a dot in a folder name is not an extension
    folded: set[str] = set()
    assert [unique_name(n, folded, fold_case=True) for n in ("A.png", "a.png")] == ["A.png", "a-2.png"]
