"""poison_dataset: round trips per input kind, ground truth, determinism, refusals."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poisonscan.attacks.patch import resize_trigger
from poisonscan.attacks.poison import GT_COLUMNS, poison_dataset
from poisonscan.attacks.targets import HTBA_SHA256
from poisonscan.config import PoisonConfig
from poisonscan.data.sources import decode_image, open_source
from poisonscan.errors import UsageError


@pytest.fixture
def trigger(tmp_path: Path) -> Path:
    """A 16 px trigger of saturated colours (so pasted pixels always differ from the images)."""
    yy, xx = np.mgrid[0:16, 0:16]
    arr = np.stack([(xx % 2) * 255, (yy % 2) * 255, ((xx + yy) % 3 == 0) * 255], -1).astype(np.uint8)
    path = tmp_path / "trig.png"
    Image.fromarray(arr, "RGB").save(path)
    return path


@pytest.fixture
def trigger2(tmp_path: Path) -> Path:
    path = tmp_path / "trig2.png"
    Image.fromarray(np.full((10, 10, 3), (0, 255, 0), np.uint8), "RGB").save(path)
    return path


def _cfg(data: Path | str, out: Path, targets: list[str], **kw: object) -> PoisonConfig:
    return PoisonConfig(data=str(data), out=str(out), targets=targets, **kw)  # type: ignore[arg-type]


def _gt(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and tuple(rows[0]) == GT_COLUMNS
    return rows


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _changed_box(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.any(a != b, axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def test_folder_round_trip(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    before = _tree(image_folder)
    out = tmp_path / "out"
    summary = poison_dataset(_cfg(image_folder, out, [f"cat={trigger}"], trigger_size=10, val=str(image_folder)),
                             quiet=True)
    assert _tree(image_folder) == before                                 # input untouched
    assert not (tmp_path / "out.partial").exists()
    src, res = open_source(image_folder), open_source(out / "train")
    assert res.kind == "folder" and res.class_names == src.class_names == ["cat", "dog"]
    rows = _gt(out / "ground_truth.csv")
    assert [r["sample_id"] for r in rows] == res.ids                     # ids predictable, same order
    assert summary["train"]["poisoned"] == 2 and summary["targets"][0]["poisoned"] == 2   # round(0.5 * 3)
    for r, label in zip(rows, res.labels):
        assert int(r["label"]) == label
        if r["poisoned"] == "0":
            assert r["sample_id"] == r["source_id"] and r["x"] == r["image_w"] == ""
            assert (out / "train" / r["sample_id"]).read_bytes() == (image_folder / r["source_id"]).read_bytes()
            continue
        assert r["sample_id"].endswith("__poison.png") and r["source_id"].startswith("cat/")
        x, y, w, h = (int(r[k]) for k in "xywh")
        assert w == h == 10 and 8 <= x <= 24 - 10 and 8 <= y <= 24 - 10   # margin 0.25 on 32 px
        assert r["image_w"] == r["image_h"] == "32"
        orig = np.asarray(decode_image((image_folder / r["source_id"]).read_bytes()))
        new = np.asarray(Image.open(out / "train" / r["sample_id"]).convert("RGB"))
        assert _changed_box(orig, new) == (x, y, w, h)                   # changed pixels = the box
        assert np.array_equal(new[y:y + h, x:x + w], resize_trigger(Image.open(trigger), 10))
    assert (out / "triggers" / "trig.png").read_bytes() == trigger.read_bytes()
    assert not (out / "TRIGGER_LICENSE.txt").exists()                    # not an HTBA trigger
    assert json.loads((out / "config.json").read_text())["targets"] == [f"cat={trigger}"]


def test_val_patched_keeps_labels_and_margin(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = poison_dataset(_cfg(image_folder, out, [f"dog={trigger}"], trigger_size=8, val=str(image_folder)),
                             quiet=True)
    val = open_source(out / "val_patched")
    rows = _gt(out / "val_patched" / "ground_truth.csv")
    assert len(rows) == len(val) == 6 == summary["val_patched"]["n"]
    assert [r["sample_id"] for r in rows] == val.ids and val.class_names == ["cat", "dog"]
    for r, label in zip(rows, val.labels):
        assert r["poisoned"] == "1" and r["target"] == "1" and int(r["label"]) == label
        x, y, w, h = (int(r[k]) for k in "xywh")
        assert 3 <= x <= 28 - 8 and 3 <= y <= 28 - 8                     # [0.10 W, 0.90 W - size]
        orig = np.asarray(decode_image((image_folder / r["source_id"]).read_bytes()))
        new = np.asarray(Image.open(out / "val_patched" / r["sample_id"]).convert("RGB"))
        assert _changed_box(orig, new) == (x, y, w, h)


def test_jittered_copies_differ_and_stay_inside_their_boxes(image_folder: Path, trigger: Path,
                                                             tmp_path: Path) -> None:
    kw = {"trigger_size": 10, "rate": 1.0, "val": str(image_folder)}
    plain = poison_dataset(_cfg(image_folder, tmp_path / "plain", [f"cat={trigger}"], **kw), quiet=True)
    jit = poison_dataset(_cfg(image_folder, tmp_path / "jit", [f"cat={trigger}"], scale_jitter=0.3, rotation=40,
                              colour_jitter=0.4, **kw), quiet=True)
    assert jit["settings"]["rotation"] == 40 and jit["train"]["poisoned"] == plain["train"]["poisoned"] == 3
    rows = [r for r in _gt(tmp_path / "jit" / "ground_truth.csv") if r["poisoned"] == "1"]
    sizes, patches = set(), []
    for r in rows:
        x, y, w, h = (int(r[k]) for k in "xywh")
        assert w == h and 7 <= w <= 13 and 8 <= x <= 24 - w and 8 <= y <= 24 - h   # side 10 x (1 +- 0.3)
        sizes.add(w)
        orig = np.asarray(decode_image((image_folder / r["source_id"]).read_bytes()))
        new = np.asarray(Image.open(tmp_path / "jit" / "train" / r["sample_id"]).convert("RGB"))
        cx, cy, cw, ch = _changed_box(orig, new)
        assert x <= cx and y <= cy and cx + cw <= x + w and cy + ch <= y + h    # changes stay in the box
        assert not np.array_equal(new[y:y + h, x:x + w], resize_trigger(Image.open(trigger), w))
        patches.append(new[y:y + h, x:x + w])
    assert len(sizes) > 1 or not np.array_equal(patches[0], patches[1])
    for r in _gt(tmp_path / "jit" / "val_patched" / "ground_truth.csv"):          # the val copies change too
        x, y, w, h = (int(r[k]) for k in "xywh")
        orig = np.asarray(decode_image((image_folder / r["source_id"]).read_bytes()))
        new = np.asarray(Image.open(tmp_path / "jit" / "val_patched" / r["sample_id"]).convert("RGB"))
        cx, cy, cw, ch = _changed_box(orig, new)
        assert 7 <= w <= 13 and x <= cx and y <= cy and cx + cw <= x + w and cy + ch <= y + h
    # turns and gains draw from their own stream: the images and corners are the plain attack's
    turned = poison_dataset(_cfg(image_folder, tmp_path / "turned", [f"cat={trigger}"], rotation=40,
                                 colour_jitter=0.4, **kw), quiet=True)
    assert turned["train"]["poisoned"] == 3
    for name in ("ground_truth.csv", "val_patched/ground_truth.csv"):
        boxes = [[r[k] for k in ("sample_id", "x", "y", "w", "h")] for r in _gt(tmp_path / "turned" / name)]
        assert boxes == [[r[k] for k in ("sample_id", "x", "y", "w", "h")] for r in _gt(tmp_path / "plain" / name)]
    assert _tree(tmp_path / "turned" / "train") != _tree(tmp_path / "plain" / "train")
    again = poison_dataset(_cfg(image_folder, tmp_path / "again", [f"cat={trigger}"], scale_jitter=0.3,
                                rotation=40, colour_jitter=0.4, **kw), quiet=True)
    assert again["train"]["poisoned"] == 3 and _tree(tmp_path / "again" / "train") == _tree(tmp_path / "jit" / "train")


def test_same_seed_same_bytes(wds_shards_gz: Path, trigger: Path, tmp_path: Path) -> None:
    cfgs = [_cfg(wds_shards_gz, tmp_path / f"o{k}", [f"1={trigger}"], trigger_size=8, seed=3,
                 val=str(wds_shards_gz)) for k in range(2)]
    for cfg in cfgs:
        poison_dataset(cfg, quiet=True)
    assert _tree(tmp_path / "o0") == _tree(tmp_path / "o1")
    first = _tree(tmp_path / "o0")
    poison_dataset(PoisonConfig(**{**cfgs[0].__dict__, "overwrite": True}), quiet=True)
    assert _tree(tmp_path / "o0") == first                               # again in place, with --overwrite
    poison_dataset(PoisonConfig(**{**cfgs[1].__dict__, "overwrite": True, "seed": 4}), quiet=True)
    assert _tree(tmp_path / "o1") != first                               # another seed, another poison set


def test_folder_runs_are_byte_identical(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    for k in range(2):
        poison_dataset(_cfg(image_folder, tmp_path / f"f{k}", [f"cat={trigger}"], trigger_size=9), quiet=True)
    assert _tree(tmp_path / "f0") == _tree(tmp_path / "f1")


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


def test_wds_round_trip(wds_shards_gz: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = poison_dataset(_cfg(wds_shards_gz, out, [f"0={trigger}"], trigger_size=8, rate=1.0), quiet=True)
    shards = sorted(p.name for p in (out / "train").iterdir())
    assert shards == ["train-000000.tar.gz", "train-000001.tar.gz"]
    with open(out / "train" / shards[0], "rb") as fh:
        head = fh.read(10)
    assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\0\0\0\0"          # gzip, mtime 0
    res = open_source(out / "train")
    rows = _gt(out / "ground_truth.csv")
    assert [r["sample_id"] for r in rows] == res.ids and res.labels == [int(r["label"]) for r in rows]
    assert summary["train"]["poisoned"] == 4
    originals = {f"{s.name}/{m.name}": data for s in sorted(wds_shards_gz.iterdir()) for m, data in _members(s)}
    for shard in shards:
        for info, data in _members(out / "train" / shard):
            assert info.mtime == 0 and info.uid == 0 and info.gid == 0 and info.uname == ""
            key, ext = info.name.split(".", 1)
            if "__poison" not in key:
                assert originals[f"{shard}/{info.name}"] == data         # clean members unchanged
            else:
                assert ext in ("png", "cls")
    for r in rows:
        if r["poisoned"] == "1":
            assert r["label"] == "0" and r["sample_id"].endswith("__poison")
            i = res.ids.index(r["sample_id"])
            assert res.read_members(i).keys() == {"png", "cls"}
            j = open_source(wds_shards_gz).ids.index(r["source_id"])
            orig = np.asarray(open_source(wds_shards_gz).load(j).image)
            new = np.asarray(res.load(i).image)
            assert _changed_box(orig, new) == tuple(int(r[k]) for k in "xywh")
        else:
            assert r["sample_id"] == r["source_id"]


def test_plain_tar_stays_plain(wds_shards: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    poison_dataset(_cfg(wds_shards, out, [f"1={trigger}"], trigger_size=8, val=str(wds_shards)), quiet=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in (out / "val_patched").iterdir()) == ["ground_truth.csv", "train-000000.tar",
                                                                       "train-000001.tar"]
    val = open_source(out / "val_patched")
    assert len(val) == 8 and all(k.endswith("__patched") for k in val.ids)
    assert val.labels == [i % 2 for i in range(8)]


def test_file_list_round_trip(file_list: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = poison_dataset(_cfg(file_list, out, [f"2={trigger}"], trigger_size=8, rate=1.0), quiet=True)
    assert summary["train"]["spec"] == "train/list.txt"
    res = open_source(out / "train" / "list.txt")
    rows = _gt(out / "ground_truth.csv")
    assert res.kind == "filelist" and [r["sample_id"] for r in rows] == res.ids
    assert res.ids == ["images/img_0.png", "images/img_1.png", "images/img_2__poison.png", "images/img_3.png",
                       "images/img_4.png", "images/img_5__poison.png"]
    assert res.labels == [i % 3 for i in range(6)]
    assert (out / "train" / "images" / "img_0.png").read_bytes() == (file_list.parent / "images/img_0.png").read_bytes()


def test_multi_target(image_folder: Path, trigger: Path, trigger2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = poison_dataset(_cfg(image_folder, out, [f"cat={trigger}", f"1={trigger2}"], trigger_size=8,
                                  rate=1.0, val=str(image_folder)), quiet=True)
    assert [(t["class"], t["poisoned"], t["trigger"]) for t in summary["targets"]] == [
        ("cat", 3, "trig.png"), ("dog", 3, "trig2.png")]
    rows = _gt(out / "ground_truth.csv")
    assert all(r["poisoned"] == "1" for r in rows)
    green = resize_trigger(Image.open(trigger2), 8)
    for r in rows:
        x, y = int(r["x"]), int(r["y"])
        new = np.asarray(Image.open(out / "train" / r["sample_id"]).convert("RGB"))
        want = resize_trigger(Image.open(trigger), 8) if r["target"] == "0" else green
        assert r["trigger"] == ("trig.png" if r["target"] == "0" else "trig2.png")
        assert np.array_equal(new[y:y + 8, x:x + 8], want)
    val = _gt(out / "val_patched" / "ground_truth.csv")
    assert len(val) == 12 and summary["val_patched"]["per_target"] == {"0": 6, "1": 6}
    assert {r["sample_id"].rsplit("__", 1)[1] for r in val} == {"patched-t0.png", "patched-t1.png"}


def test_dataset_rate(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    summary = poison_dataset(_cfg(image_folder, tmp_path / "o", [f"dog={trigger}"], dataset_rate=0.5,
                                  trigger_size=8), quiet=True)
    assert summary["train"]["poisoned"] == 3 and summary["train"]["per_class"]["dog"] == {"n": 3, "poisoned": 3}
    with pytest.raises(UsageError, match="only 3"):
        poison_dataset(_cfg(image_folder, tmp_path / "o2", [f"dog={trigger}"], dataset_rate=1.0), quiet=True)


@pytest.mark.parametrize("attack", ["blend", "ctrl"])
def test_blend_and_ctrl_cover_the_whole_image(attack: str, image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    target = "cat" if attack == "ctrl" else f"cat={trigger}"
    out = tmp_path / "out"
    poison_dataset(_cfg(image_folder, out, [target], attack=attack, ctrl_block=16), quiet=True)
    for r in _gt(out / "ground_truth.csv"):
        if r["poisoned"] == "1":
            assert (r["attack"], r["x"], r["y"], r["w"], r["h"]) == (attack, "0", "0", "32", "32")
            orig = np.asarray(decode_image((image_folder / r["source_id"]).read_bytes()))
            new = np.asarray(Image.open(out / "train" / r["sample_id"]).convert("RGB"))
            assert np.any(orig != new)


def test_unreadable_candidates_are_replaced(corrupt_folder: Path, trigger: Path, tmp_path: Path) -> None:
    summary = poison_dataset(_cfg(corrupt_folder, tmp_path / "o", [f"a={trigger}"], rate=0.5, trigger_size=8,
                                  seed=1), quiet=True)
    poisoned = [r["source_id"] for r in _gt(tmp_path / "o" / "ground_truth.csv") if r["poisoned"] == "1"]
    assert len(poisoned) == 3 and all(p.startswith("a/good_") for p in poisoned)
    assert summary["train"]["n"] == 6                                    # bad files copied as they are
    assert (tmp_path / "o" / "train" / "a" / "bad.jpg").read_bytes() == (corrupt_folder / "a" / "bad.jpg").read_bytes()
    with pytest.raises(UsageError, match="readable"):
        poison_dataset(_cfg(corrupt_folder, tmp_path / "o2", [f"a={trigger}"], rate=1.0, trigger_size=8), quiet=True)


def test_htba_trigger_ships_its_licence(image_folder: Path, tmp_path: Path) -> None:
    htba = Path("/work/shared/data/triggers/trigger_10.png")
    if not htba.is_file():
        pytest.skip("shared HTBA triggers not available")
    assert hashlib.sha256(htba.read_bytes()).hexdigest() in HTBA_SHA256
    summary = poison_dataset(_cfg(image_folder, tmp_path / "o", [f"cat={htba}"], trigger_size=8), quiet=True)
    text = (tmp_path / "o" / "TRIGGER_LICENSE.txt").read_text()
    assert summary["licence"] == "TRIGGER_LICENSE.txt" and summary["targets"][0]["htba"]
    assert "MIT License" in text and "Copyright (c) 2021 UMBC Vision" in text and "trigger_10.png" in text


@pytest.mark.parametrize("change, message", [
    ({"targets": ["cta={trig}"]}, "did you mean 'cat'"),
    ({"targets": ["7={trig}"]}, "out of range"),
    ({"targets": ["cat={missing}"]}, "not found"),
    ({"targets": ["cat={bad}"]}, "not a readable image"),
    ({"targets": ["cat"]}, "CLASS=TRIGGER"),
    ({"trigger_size": 40}, "larger than image"),
    ({"trigger_size": 0.6}, "does not fit"),
    ({"rate": 1.5}, r"\(0, 1\]"),
    ({"rate": 0.0}, r"\(0, 1\]"),
    ({"dataset_rate": 0.1, "rate": 0.5}, "not both"),
    ({"attack": "ctrl"}, "no trigger image"),
    ({"attack": "warp"}, "unknown"),
    ({"margin": 0.5}, "margin"),
    ({"rotation": 200.0}, "--rotation"),
    ({"attack": "blend", "scale_jitter": 0.2}, "patch only"),
])
def test_refusals_write_nothing(change: dict, message: str, image_folder: Path, trigger: Path,
                                tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    fmt = {"trig": trigger, "missing": tmp_path / "missing.png", "bad": tmp_path / "bad.png"}
    kw = {"targets": [f"cat={trigger}"], **change}
    kw["targets"] = [t.format(**fmt) for t in kw["targets"]]
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=message):
        poison_dataset(PoisonConfig(data=str(image_folder), out=str(out), **kw), quiet=True)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_output_refusals(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "out", [f"cat={trigger}"], trigger_size=8)
    poison_dataset(cfg, quiet=True)
    with pytest.raises(UsageError, match="--overwrite"):
        poison_dataset(cfg, quiet=True)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a poisonscan poison output"):
        poison_dataset(_cfg(image_folder, other, [f"cat={trigger}"], overwrite=True), quiet=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="overlaps the input"):
        poison_dataset(_cfg(image_folder, image_folder / "poisoned", [f"cat={trigger}"]), quiet=True)
    with pytest.raises(UsageError, match="no labels"):
        flat = tmp_path / "flat"
        flat.mkdir()
        Image.new("RGB", (8, 8)).save(flat / "a.png")
        poison_dataset(_cfg(flat, tmp_path / "o3", [f"0={trigger}"]), quiet=True)


def test_failure_while_writing_leaves_nothing(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    small = tmp_path / "small_val" / "cat"
    small.mkdir(parents=True)
    Image.new("RGB", (6, 6)).save(small / "tiny.png")                     # too small for a 10 px trigger
    with pytest.raises(UsageError, match="larger than image"):
        poison_dataset(_cfg(image_folder, tmp_path / "out", [f"cat={trigger}"], trigger_size=10,
                            val=str(tmp_path / "small_val")), quiet=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_png_bytes_have_no_metadata(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    poison_dataset(_cfg(image_folder, tmp_path / "o", [f"cat={trigger}"], trigger_size=8), quiet=True)
    png = next((tmp_path / "o" / "train" / "cat").glob("*__poison.png")).read_bytes()
    chunks, pos = [], 8
    while pos < len(png):
        n = int.from_bytes(png[pos:pos + 4], "big")
        chunks.append(png[pos + 4:pos + 8].decode())
        pos += 12 + n
    assert chunks[0] == "IHDR" and chunks[-1] == "IEND" and set(chunks) <= {"IHDR", "IDAT", "IEND"}
    assert Image.open(io.BytesIO(png)).mode == "RGB"


def test_wds_manifest_with_interleaved_shards(wds_shards: Path, trigger: Path, tmp_path: Path) -> None:
    a, b = wds_shards / "train-000000.tar", wds_shards / "train-000001.tar"
    lines = [f"{a}\ts0000", f"{b}\ts0004", f"{a}\ts0001", f"{b}\ts0005", f"{a}\ts0002"]
    manifest = tmp_path / "keep.tsv"
    manifest.write_text(f"# poisonscan wds-manifest v1\n# root: {wds_shards}\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = poison_dataset(_cfg(manifest, out, [f"0={trigger}"], trigger_size=8, rate=1.0), quiet=True)
    assert summary["train"]["kind"] == "wds" and summary["train"]["poisoned"] == 3      # s0000, s0002, s0004
    res = open_source(out / "train")
    assert sorted(res.ids) == sorted(r["sample_id"] for r in _gt(out / "ground_truth.csv"))
    assert res.ids == ["train-000000.tar::s0000__poison", "train-000000.tar::s0001",
                       "train-000000.tar::s0002__poison", "train-000001.tar::s0004__poison", "train-000001.tar::s0005"]


def test_only_rank_zero_writes(image_folder: Path, trigger: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    summary = poison_dataset(_cfg(image_folder, tmp_path / "o", [f"cat={trigger}"]), quiet=True)
    assert "skipped" in summary and not (tmp_path / "o").exists()


def test_clean_files_are_read_bounded_and_a_device_is_dropped(image_folder: Path, trigger: Path,
                                                               tmp_path: Path) -> None:
    import os

    os.symlink("/dev/zero", image_folder / "dog" / "zero.jpg")              # copied, it would never end
    for link in (False, True):
        out = tmp_path / f"out-{link}"
        summary = poison_dataset(_cfg(image_folder, out, [f"cat={trigger}"], trigger_size=10, link=link), quiet=True)
        dropped = summary["train"]["dropped_unreadable"]
        assert dropped["n"] == 1 and dropped["examples"][0]["id"] == "dog/zero.jpg"
        assert "not a regular file" in dropped["examples"][0]["reason"]
        assert not (out / "train" / "dog" / "zero.jpg").exists()
        assert [r["sample_id"] for r in _gt(out / "ground_truth.csv")] == open_source(out / "train").ids
        assert summary["train"]["linked" if link else "copied"] == 4      # the 4 clean images of 6
