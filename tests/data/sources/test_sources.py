"""Data sources: folders, file lists, WebDataset shards; odd images and bad input."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poisonscan.data.sources import (SOURCE_KINDS, FileListSource, FolderSource, ManifestSource, Sample, SampleError,
                                     WdsSource, decode_image, detect_kind, expand_braces, open_source, split_key,
                                     wds_manifest_text)
from poisonscan.errors import DataError


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _split(items):
    ok = [x for x in items if isinstance(x, Sample)]
    bad = [x for x in items if isinstance(x, SampleError)]
    return ok, bad


# ---------------------------------------------------------------------------------------------------- folders


def test_image_folder_ids_labels_and_access(image_folder: Path) -> None:
    src = open_source(image_folder)
    assert isinstance(src, FolderSource) and src.kind == "folder"
    assert src.class_names == ["cat", "dog"]
    assert src.ids == [f"cat/cat_{i}.png" for i in range(3)] + [f"dog/dog_{i}.jpg" for i in range(3)]
    assert src.labels == [0, 0, 0, 1, 1, 1]
    s = src.load(4)
    assert s.id == "dog/dog_1.jpg" and s.label == 1 and s.image.mode == "RGB" and s.image.size == (32, 32)
    ok, bad = _split(list(src.iter_samples()))
    assert [x.id for x in ok] == src.ids and not bad
    assert src.locator(0) == f"{image_folder / 'cat' / 'cat_0.png'} 0"


def test_flat_or_mixed_folder_has_no_labels(tmp_path: Path, make_images) -> None:
    imgs = make_images(3, 16, 0)
    (tmp_path / "sub").mkdir()
    imgs[0].save(tmp_path / "a.png")
    imgs[1].save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    imgs[2].save(tmp_path / ".hidden" / "c.png")
    src = open_source(tmp_path)
    assert src.ids == ["a.png", "sub/b.png"]
    assert src.labels == [None, None] and src.class_names is None and not src.has_labels
    assert src.locator(0) == str(tmp_path / "a.png")


def test_empty_class_folder_keeps_index_and_warns(image_folder: Path) -> None:
    (image_folder / "bird").mkdir()
    src = open_source(image_folder)
    assert src.class_names == ["bird", "cat", "dog"]
    assert set(src.labels) == {1, 2}
    assert any("bird" in w for w in src.warnings)


def test_nested_class_folder_uses_top_level_class(image_folder: Path, make_images) -> None:
    (image_folder / "dog" / "puppies").mkdir()
    make_images(1, 16, 9)[0].save(image_folder / "dog" / "puppies" / "p.png")
    src = open_source(image_folder)
    assert src.labels[src.ids.index("dog/puppies/p.png")] == 1


# ---------------------------------------------------------------------------------------------------- file lists


def test_file_list(file_list: Path) -> None:
    src = open_source(file_list)
    assert isinstance(src, FileListSource) and src.kind == "filelist"
    assert src.ids == [f"images/img_{i}.png" for i in range(6)]
    assert src.labels == [i % 3 for i in range(6)]
    assert src.root == file_list.parent
    assert src.load(2).label == 2
    assert src.locator(1) == f"{file_list.parent / 'images' / 'img_1.png'} 1"


def test_file_list_absolute_unlabelled_missing_and_duplicates(tmp_path: Path, make_images) -> None:
    img = make_images(1, 16, 0)[0]
    img.save(tmp_path / "with space.png")
    lst = tmp_path / "l.txt"
    lst.write_text(f"{tmp_path / 'with space.png'} 7\nwith space.png\nmissing.png 1\nmissing.png 1\n")
    src = open_source(lst)
    assert src.ids == [str(tmp_path / "with space.png"), "with space.png", "missing.png"]
    assert src.labels == [7, None, 1]
    assert [e.id for e in src.errors] == ["missing.png"]  # duplicate line reported
    ok, bad = _split(list(src.iter_samples()))
    assert len(ok) == 2 and [b.id for b in bad] == ["missing.png"] and "not found" in bad[0].reason
    with pytest.raises(DataError, match="missing.png"):
        src.load(2)


# ---------------------------------------------------------------------------------------------------- WebDataset


@pytest.mark.parametrize("fixture, suffix", [("wds_shards", ".tar"), ("wds_shards_gz", ".tar.gz")])
def test_wds_specs(request: pytest.FixtureRequest, fixture: str, suffix: str) -> None:
    root: Path = request.getfixturevalue(fixture)
    shards = [str(root / f"train-00000{k}{suffix}") for k in range(2)]
    expected = [f"train-00000{i // 4}{suffix}::s{i:04d}" for i in range(8)]
    for spec in (root, str(root / f"train-{{000000..000001}}{suffix}"), shards):
        src = open_source(spec)
        assert isinstance(src, WdsSource) and src.kind == "wds"
        assert src.ids == expected and src.labels == [i % 2 for i in range(8)]
    single = open_source(shards[1])
    assert single.ids == [f"train-000001{suffix}::s{i:04d}" for i in range(4, 8)]
    assert src.locator(5) == f"{shards[1]}\ts0005"
    # random access (index / gz LRU) and streaming agree
    streamed = {s.id: np.asarray(s.image) for s in src.iter_samples()}
    for i in (6, 1, 5, 0):
        s = src.load(i)
        assert np.array_equal(np.asarray(s.image), streamed[s.id]) and s.label == i % 2
    sub = [x.id for x in src.iter_samples([7, 2])]
    assert sub == [expected[2], expected[7]]  # shard order


def test_wds_source_pickles_for_workers(wds_shards_gz: Path) -> None:
    src = open_source(wds_shards_gz)
    src.load(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone.ids == src.ids and np.array_equal(np.asarray(clone.load(3).image), np.asarray(src.load(3).image))


def test_wds_truncated_gz_shard(tmp_path: Path, write_shard, make_images) -> None:
    imgs = make_images(6, 32, 1)
    members = [(f"k{i}.png", _png(im)) for i, im in enumerate(imgs)]
    full = write_shard(tmp_path / "full.tar.gz", members).read_bytes()
    (tmp_path / "data").mkdir()
    cut = tmp_path / "data" / "cut.tar.gz"
    cut.write_bytes(full[: int(len(full) * 0.6)])
    src = open_source(cut)
    assert 0 < len(src) < 6
    assert src.ids == [f"cut.tar.gz::k{i}" for i in range(len(src))]
    shard_err = [e for e in src.errors if e.id == "cut.tar.gz"]
    assert shard_err and "truncated" in shard_err[0].reason
    ok, bad = _split(list(src.iter_samples()))
    assert len(ok) == len(src) and not bad
    src.load(len(src) - 1)


def test_wds_truncated_plain_tar(tmp_path: Path, write_shard, make_images) -> None:
    members = [(f"k{i}.png", _png(im)) for i, im in enumerate(make_images(4, 32, 2))]
    full = write_shard(tmp_path / "a.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: len(full) // 2 + 100])
    src = open_source(cut)
    assert 0 < len(src) < 4
    assert any(e.id == "cut.tar" for e in src.errors)
    ok, bad = _split(list(src.iter_samples()))
    assert len(ok) + len(bad) == len(src)


def test_wds_duplicate_keys_first_wins(tmp_path: Path, write_shard, make_images) -> None:
    a, b, c = make_images(3, 16, 3)
    shard = write_shard(tmp_path / "d.tar", [
        ("a.png", _png(a)), ("a.cls", b"1"),
        ("b.png", _png(b)), ("b.png", _png(c)),  # repeated member inside one sample: the first is kept
        ("a.png", _png(c)), ("a.cls", b"2"),  # key seen again later: ignored
        ("c.txt", b"no image here"),
    ])
    src = open_source(shard)
    assert src.ids == ["d.tar::a", "d.tar::b"] and src.labels == [1, None]
    assert np.array_equal(np.asarray(src.load(0).image), np.asarray(a))
    assert np.array_equal(np.asarray(src.load(1).image), np.asarray(b))
    reasons = {e.id: e.reason for e in src.errors}
    assert "duplicate key" in reasons["d.tar::a"] and "repeated member" in reasons["d.tar::b"]
    assert "no image member" in reasons["d.tar::c"]


def test_wds_traversal_names_are_read_not_used(tmp_path: Path, write_shard, make_images) -> None:
    imgs = make_images(3, 16, 4)
    shard = write_shard(tmp_path / "t.tar", [("../evil.jpg", _jpg(imgs[0])), ("/abs/x.png", _png(imgs[1])),
                                             ("dir/sub/y.png", _png(imgs[2]))])
    src = open_source(shard)
    assert src.ids == ["t.tar::../evil", "t.tar::/abs/x", "t.tar::dir/sub/y"]
    assert all(isinstance(x, Sample) for x in src.iter_samples())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tar"]  # nothing extracted


def test_split_key_like_webdataset() -> None:
    assert split_key("a/b/c.d.jpg") == ("a/b/c", "d.jpg")
    assert split_key("x.JPG") == ("x", "jpg")
    assert split_key("noext") is None and split_key(".hidden") is None


# ---------------------------------------------------------------------------------------------------- decoding


def _modes(size: int = 8) -> dict[str, Image.Image]:
    rgb = Image.new("RGB", (size, size), (200, 100, 50))
    pal = Image.new("P", (size, size), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 1
    rgba = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    return {"L": rgb.convert("L"), "1": rgb.convert("1"), "P-trns": pal, "RGBA": rgba, "LA": rgba.convert("LA"),
            "CMYK": rgb.convert("CMYK"),
            "I;16": Image.fromarray(np.full((size, size), 65535, dtype=np.uint16)),
            "I": Image.fromarray(np.full((size, size), 65535, dtype=np.int32), "I")}


@pytest.mark.parametrize("mode", list(_modes()))
def test_decode_odd_modes(mode: str) -> None:
    img = _modes()[mode]
    buf = io.BytesIO()
    extra = {"transparency": 1} if mode == "P-trns" else {}
    img.save(buf, format="TIFF" if mode in ("CMYK", "I") else "PNG", **extra)
    out = decode_image(buf.getvalue(), f"x.{mode}")
    assert out.mode == "RGB" and out.size == (8, 8)
    arr = np.asarray(out)
    if mode in ("RGBA", "LA", "P-trns"):
        assert arr.max() == 0  # fully transparent -> black
    if mode in ("I;16", "I"):
        assert arr.min() == 255


def test_png_named_jpg_and_decode_errors(tmp_path: Path, make_images, corrupt_image: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "really_png.jpg").write_bytes(_png(make_images(1, 16, 0)[0]))
    assert open_source(tmp_path / "c").load(0).image.size == (16, 16)
    with pytest.raises(DataError, match="not a recognised image"):
        decode_image(corrupt_image.read_bytes(), "corrupt.jpg")
    with pytest.raises(DataError, match="0 bytes"):
        decode_image(b"", "e.png")


def test_corrupt_zero_byte_truncated_are_reported(corrupt_folder: Path) -> None:
    src = open_source(corrupt_folder)
    assert len(src) == 6
    ok, bad = _split(list(src.iter_samples()))
    assert sorted(s.id for s in ok) == [f"a/good_{i}.png" for i in range(3)]
    reasons = {e.id: e.reason for e in bad}
    assert set(reasons) == {"a/bad.jpg", "a/empty.png", "a/trunc.jpg"}
    assert "0 bytes" in reasons["a/empty.png"] and "truncated" in reasons["a/trunc.jpg"].lower()
    with pytest.raises(DataError, match="a/bad.jpg"):
        src.load(src.ids.index("a/bad.jpg"))


def test_decompression_bomb_guard(image_folder: Path) -> None:
    src = open_source(image_folder, max_pixels=32 * 32 - 1)
    with pytest.raises(DataError, match="decompression-bomb"):
        src.load(0)
    assert all(isinstance(x, SampleError) for x in src.iter_samples())
    assert open_source(image_folder, max_pixels=32 * 32).load(0).image.size == (32, 32)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_specs_raise_data_error(tmp_path: Path, wds_shards: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    cases = [tmp_path / "missing", tmp_path / "empty", tmp_path / "empty.txt",
             str(wds_shards / "train-{000000..000001.tar"), str(wds_shards / "train-{000000}.tar"),
             str(wds_shards / "train-{0..x}.tar"), str(wds_shards / "train-{000000..000005}.tar"),
             str(wds_shards / "{a{b}}.tar"), [], "http://example.com/x.tar"]
    for spec in cases:
        with pytest.raises(DataError) as info:
            open_source(spec)
        assert "\n" not in str(info.value)


def test_unreadable_shard_is_an_error_not_a_crash(tmp_path: Path, wds_shards: Path) -> None:
    bad = tmp_path / "zero.tar"
    bad.write_bytes(b"")
    src = open_source([str(wds_shards / "train-000000.tar"), str(bad)])
    assert len(src) == 4 and any(e.id == "zero.tar" for e in src.errors)
    with pytest.raises(DataError, match="no samples"):
        open_source(bad)


def test_expand_braces() -> None:
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/{8..10}") == ["x/8", "x/9", "x/10", "y/8", "y/9", "y/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_detect_kind(image_folder: Path, file_list: Path, wds_shards: Path) -> None:
    assert detect_kind(image_folder) == "folder"
    assert detect_kind(file_list) == "filelist"
    assert detect_kind(wds_shards) == "wds"
    assert detect_kind(str(wds_shards / "train-{000000..000001}.tar")) == "wds"


def test_every_kind_answers_key_paths_and_sharding(image_folder: Path, file_list: Path, wds_shards: Path,
                                                   tmp_path: Path) -> None:
    folder, flist, wds = open_source(image_folder), open_source(file_list), open_source(wds_shards)
    assert SOURCE_KINDS == {"folder": FolderSource, "filelist": FileListSource, "wds": WdsSource,
                            "wds-manifest": ManifestSource}
    assert (folder.is_sharded, flist.is_sharded, wds.is_sharded) == (False, False, True)
    assert folder.key(0) == Path(folder.ids[0]).stem and wds.key(0) == wds.ids[0].split("::", 1)[1]
    assert folder.input_paths() == [image_folder.resolve()] * 2
    assert Path(flist.spec()) in flist.input_paths()
    manifest = tmp_path / "kept.tsv"
    manifest.write_text(wds_manifest_text(wds.root, [wds.locator(1)]))
    kept = open_source(manifest)
    assert kept.is_sharded and kept.ids == [wds.ids[1]] and kept.key(0) == wds.key(1)
    assert manifest in kept.input_paths() and Path(wds.locator(1).split("\t")[0]) in kept.input_paths()
    with pytest.raises(DataError, match="unknown source kind"):
        open_source(image_folder, kind="zip")


def test_non_utf8_file_name(tmp_path: Path, make_images) -> None:
    root = os.fsencode(tmp_path / "u")
    os.mkdir(root)
    name = root + b"/caf\xe9.png"
    with open(name, "wb") as fh:
        fh.write(_png(make_images(1, 16, 0)[0]))
    src = open_source(tmp_path / "u")
    assert src.ids == [os.fsdecode(b"caf\xe9.png")]
    assert src.load(0).image.size == (16, 16)


# ---------------------------------------------------------------------------------------------------- shared data


def _shared_data() -> Path:
    env = os.environ.get("POISONSCAN_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_shared_cifar_shard_and_imagenette_class() -> None:
    shared = _shared_data()
    shard = shared / "cifar10-wds" / "test-000001.tar.gz"
    inet = shared / "imagenette-96" / "val"
    if not shard.exists() or not inet.is_dir():
        pytest.skip(f"shared data not found under {shared}")
    src = open_source(shard)
    assert len(src) == 5000 and not src.errors and all(label is not None and 0 <= label < 10 for label in src.labels)
    s = src.load(4999)
    assert s.image.size == (32, 32) and s.id.startswith("test-000001.tar.gz::test_")
    first_class = sorted(p for p in inet.iterdir() if p.is_dir())[0]
    cls = open_source(first_class)
    assert len(cls) > 100 and cls.class_names is None
    assert cls.load(0).image.size == (96, 96)


def test_fingerprint_follows_the_files_read(wds_shards_gz: Path, file_list: Path) -> None:
    for spec in (wds_shards_gz, file_list):
        src = open_source(spec)
        files = src.read_files()
        assert files and all(f.is_file() for f in files)
        before = src.fingerprint()
        assert open_source(spec).fingerprint() == before                   # stable while nothing changes
        st = os.stat(files[-1])
        os.utime(files[-1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a shard or image rewritten
        assert open_source(spec).fingerprint() != before
    assert len(open_source(file_list).read_files()) == 1 + len(open_source(file_list))   # the list and its images
