"""Bounded cost of hostile input: aspect-ratio bombs, oversized or odd tar members, header and sparse-map bombs.

Each bomb is generated small (or streamed) in ``tmp_path`` and read in a subprocess that reports how much its peak
resident memory grew beyond the peak after its imports, so a read that materialises the bomb fails the test. The peak
is the process's own ``VmHWM`` where ``/proc`` has it: on Linux a child's ``ru_maxrss`` starts at the resident size
of the parent it was forked from (here the pytest process), which would hide a bomb smaller than that.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from poisonscan.data import sources
from poisonscan.data.sources import MAX_ASPECT_RATIO, MAX_MEMBER_BYTES, MAX_NAME_CHARS, SampleError, open_source
from poisonscan.data.store import build_store, resize_center_crop, write_errors_csv

PEAK_LIMIT = 200 * 2**20  # bytes a bounded read may add to the peak resident memory

_SCRIPT = """
import json, resource, sys
{imports}


def _peak() -> int:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


base = _peak()
{body}
out["peak_increase"] = _peak() - base
print(json.dumps(out))
"""


def _measure(imports: str, body: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``body`` (which sets ``out``) after ``imports`` in a fresh interpreter; ``out`` plus ``peak_increase``."""
    script = _SCRIPT.format(imports=textwrap.dedent(imports).strip(), body=textwrap.dedent(body).strip())
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


class _Stream(io.RawIOBase):
    """A read-only file of ``size`` bytes repeating ``pattern`` (after an optional ``head``), made on the fly."""

    def __init__(self, size: int, pattern: bytes = b"\0", head: bytes = b"") -> None:
        self.left, self.head, self.pattern, self.pos = size, head, pattern, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        data, self.head = self.head[:n], self.head[n:]
        k, start = n - len(data), self.pos % len(self.pattern)
        data += (self.pattern * ((start + k) // len(self.pattern) + 1))[start:start + k]
        self.pos += k
        buf[:n] = data
        self.left -= n
        return n


def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _png(seed: int = 0, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _reasons(errors: list[Any]) -> dict[str, str]:
    """Error id -> reason, from ``SampleError``s or ``[id, reason]`` pairs."""
    return dict((e.id, e.reason) if isinstance(e, SampleError) else (e[0], e[1]) for e in errors)


# ---------------------------------------------------------------------------------------------------- decoding


def test_aspect_bomb_is_refused_before_resizing(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (1, 400_000), (90, 10, 200)).save(folder / "bomb.png")
    assert (folder / "bomb.png").stat().st_size < 8192
    (folder / "ok.png").write_bytes(_png())
    errors_csv = tmp_path / "errors.csv"
    out = _measure("""
        from poisonscan.data.sources import open_source
        from poisonscan.data.store import build_store, write_errors_csv
    """, """
        store = build_store(open_source(sys.argv[1]), 32, num_workers=0, quiet=True)
        write_errors_csv(store.errors, sys.argv[2])
        out = {"ids": store.ids, "errors": [[e.id, e.reason] for e in store.errors]}
    """, str(folder), str(errors_csv))
    assert out["ids"] == ["ok.png"]
    assert out["peak_increase"] < PEAK_LIMIT
    reason = _reasons(out["errors"])["bomb.png"]
    assert "1x400000" in reason and "aspect ratio" in reason and "MAX_ASPECT_RATIO" in reason
    with open(errors_csv, newline="") as fh:
        assert ["bomb.png", reason] in list(csv.reader(fh))


def _full_resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(size) + CenterCrop(size) on a PIL image, resizing the whole image."""
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def test_resize_center_crop_resamples_only_the_centre_of_elongated_images() -> None:
    out = _measure("""
        import numpy as np
        from PIL import Image
        from poisonscan.data.store import resize_center_crop
    """, """
        a = resize_center_crop(Image.new("RGB", (1, 4000), (5, 6, 7)), 224)
        out = {"shape": list(a.shape), "colours": np.unique(a.reshape(-1, 3), axis=0).tolist()}
    """)
    assert out["shape"] == [224, 224, 3] and out["colours"] == [[5, 6, 7]]
    assert out["peak_increase"] < PEAK_LIMIT
    rng = np.random.default_rng(0)
    for w, h, size in [(37, 500, 16), (500, 37, 16), (64, 48, 32), (300, 17, 8), (3, 60, 16), (16, 16, 16),
                       (9, 200, 24), (700, 30, 16), (2, 90, 8), (90, 2, 8)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        got, ref = resize_center_crop(img, size), _full_resize_crop(img, size)
        if max(w, h) <= MAX_ASPECT_RATIO * min(w, h):
            assert np.array_equal(got, ref), (w, h, size)  # the decoder's images: unchanged pixels
        else:
            assert np.abs(got.astype(int) - ref).max() <= 1, (w, h, size)  # same sampling, float rounding apart


# ---------------------------------------------------------------------------------------------------- tar members


def test_oversized_gz_member_is_refused_before_reading(tmp_path: Path) -> None:
    shard = tmp_path / "bomb.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("000.jpg")
        info.size = 1 << 30
        tar.addfile(info, _Stream(info.size))
        _add(tar, "000.cls", b"1")
        _add(tar, "001.png", _png())
        _add(tar, "001.cls", b"0")
    assert shard.stat().st_size < 8 << 20
    out = _measure("from poisonscan.data.sources import SampleError, open_source", """
        src = open_source(sys.argv[1])
        read = [x.id for x in src.iter_samples() if not isinstance(x, SampleError)]
        out = {"ids": src.ids, "read": read, "errors": [[e.id, e.reason] for e in src.errors]}
    """, str(shard))
    assert out["ids"] == out["read"] == ["bomb.tar.gz::001"]
    assert out["peak_increase"] < PEAK_LIMIT
    reason = _reasons(out["errors"])["bomb.tar.gz::000"]
    assert f"'000.jpg' is {1 << 30} bytes, over the {MAX_MEMBER_BYTES}-byte limit" in reason


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_member_limit_is_configurable_and_bounds_whole_samples(tmp_path: Path, suffix: str) -> None:
    png = _png(size=4)
    limit = len(png) + 400
    shard = tmp_path / f"s{suffix}"
    with tarfile.open(shard, "w:gz" if suffix == ".tar.gz" else "w") as tar:
        for name, data in [("a.png", png), ("a.cls", b"1"), ("b.png", png), ("b.json", b"x" * (limit + 1)),
                           ("c.png", png), ("c.txt", b"t" * 250), ("c.json", b"j" * 250), ("d.png", png)]:
            _add(tar, name, data)
    src = open_source(shard, max_member_bytes=limit)
    assert src.ids == [f"s{suffix}::a", f"s{suffix}::d"] and src.labels == [1, None]
    reasons = _reasons(src.errors)
    assert f"'b.json' is {limit + 1} bytes, over the {limit}-byte limit" in reasons[f"s{suffix}::b"]
    assert f"members total {len(png) + 500} bytes with 'c.json'" in reasons[f"s{suffix}::c"]
    assert src.read_members(0) == {"png": png, "cls": b"1"}
    assert [x.id for x in src.iter_samples()] == src.ids
    assert len(open_source(shard, max_member_bytes=None)) == 4


def test_random_access_to_a_large_gz_shard_streams_instead_of_caching(tmp_path: Path) -> None:
    shard = tmp_path / "big.tar.gz"
    size = 60 << 20  # 10 samples of 60 MiB: within the member limit, over GZ_CACHE_MAX_BYTES together
    assert 10 * size > sources.GZ_CACHE_MAX_BYTES and size <= MAX_MEMBER_BYTES
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        for k in range(10):
            info = tarfile.TarInfo(f"{k:03d}.jpg")
            info.size = size
            tar.addfile(info, _Stream(size, bytes([k + 1])))
    out = _measure("from poisonscan.data.sources import open_source", """
        src = open_source(sys.argv[1])
        data = src.read_members(7)["jpg"]
        out = {"n": len(src), "size": len(data), "values": sorted(set(data[:4096]) | set(data[-4096:])),
               "cached": len(src._cache)}
    """, str(shard))
    assert out["n"] == 10 and out["size"] == size and out["values"] == [8] and out["cached"] == 0
    assert out["peak_increase"] < PEAK_LIMIT


def test_tar_links_devices_and_fifos_are_reported(tmp_path: Path) -> None:
    shard = tmp_path / "l.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "d", b"", tarfile.DIRTYPE)
        _add(tar, "002.png", _png())
        _add(tar, "002.cls", b"0")
        _add(tar, "000.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
        _add(tar, "001.jpg", b"", tarfile.LNKTYPE, "002.png")
        _add(tar, "003.jpg", b"", tarfile.CHRTYPE)
        _add(tar, "004.jpg", b"", tarfile.BLKTYPE)
        _add(tar, "005.jpg", b"", tarfile.FIFOTYPE)
    src = open_source(shard)
    assert src.ids == ["l.tar::002"]
    expected = {"l.tar::000.jpg": "symlink member skipped: tar links are never followed (target '/etc/passwd')",
                "l.tar::001.jpg": "hard link member skipped: tar links are never followed (target '002.png')",
                "l.tar::003.jpg": "character device member skipped: only regular files are read",
                "l.tar::004.jpg": "block device member skipped: only regular files are read",
                "l.tar::005.jpg": "fifo member skipped: only regular files are read"}
    assert _reasons(src.errors) == expected
    store = build_store(src, 16, num_workers=0, quiet=True)
    write_errors_csv(store.errors, tmp_path / "errors.csv")
    with open(tmp_path / "errors.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "reason"] and {r[0]: r[1] for r in rows[1:]} == expected


def test_overlong_member_names_are_reported(tmp_path: Path) -> None:
    shard = tmp_path / "n.tar"
    long_name = "k" * MAX_NAME_CHARS + ".png"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, long_name, _png())
        _add(tar, "ok.png", _png())
    src = open_source(shard)
    assert src.ids == ["n.tar::ok"]
    ((sid, reason),) = _reasons(src.errors).items()
    assert sid == f"n.tar::{'k' * 100}...({len(long_name)} characters)"
    assert reason == (f"member name is {len(long_name)} characters, over the limit of {MAX_NAME_CHARS} "
                      "(MAX_NAME_CHARS); member skipped")


# ---------------------------------------------------------------------------------------------------- tar headers


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_oversized_extended_header_is_refused_before_reading(tmp_path: Path, kind: bytes) -> None:
    shard = tmp_path / "h.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1, format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "a.png", _png())
        _add(tar, "b.png", _png(1))
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = kind, 300 << 20
        tar.addfile(info, _Stream(info.size))
        _add(tar, "c.png", _png(2))
    out = _measure("from poisonscan.data.sources import open_source", """
        src = open_source(sys.argv[1])
        out = {"ids": src.ids, "errors": [[e.id, e.reason] for e in src.errors]}
    """, str(shard))
    assert out["peak_increase"] < PEAK_LIMIT
    assert out["ids"] == ["h.tar.gz::a"]  # b may have members after the refused header: skipped as well
    reasons = _reasons(out["errors"])
    assert reasons["h.tar.gz::b"] == "shard refused while reading this sample; sample skipped"
    reason = reasons["h.tar.gz"]
    assert reason.startswith(f"shard refused after 1 samples: extended tar header of {300 << 20} bytes")
    assert "MAX_TAR_HEADER_BYTES" in reason and reason.endswith("the rest of the shard is skipped")


def test_chained_extended_headers_are_refused_not_a_crash(tmp_path: Path) -> None:
    shard = tmp_path / "c.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.png", _png())
        _add(tar, "b.png", _png(1))
    body = shard.read_bytes().rstrip(b"\0")
    pad = b"\0" * (-len(body) % tarfile.BLOCKSIZE)
    chain = b"".join(_header(tarfile.TarInfo(f"x{i}"), tarfile.XHDTYPE) for i in range(2000))
    shard.write_bytes(body + pad + chain + _header(tarfile.TarInfo("b.cls"), tarfile.REGTYPE) + b"\0" * 1536)
    src = open_source(shard)
    assert src.ids == ["c.tar::a"]
    assert _reasons(src.errors) == {
        "c.tar::b": "shard refused while reading this sample; sample skipped",
        "c.tar": f"shard refused after 1 samples: more than 8 extended tar headers in a row at offset "
                 f"{len(body + pad) + 8 * 512} (MAX_TAR_HEADER_CHAIN); the rest of the shard is skipped"}


def test_negative_member_size_is_refused_not_looped_on(tmp_path: Path) -> None:
    shard = tmp_path / "neg.tar"
    back = _header(tarfile.TarInfo("c.jpg"), tarfile.REGTYPE, patch={124: tarfile.itn(-512, 12, tarfile.GNU_FORMAT)})
    shard.write_bytes(_member("a.png", _png()) + _member("b.png", _png(1)) + back + b"\0" * 1024)
    out = _measure("from poisonscan.data.sources import open_source", """
        src = open_source(sys.argv[1])
        out = {"ids": src.ids, "errors": [[e.id, e.reason] for e in src.errors]}
    """, str(shard), timeout=30)
    assert out["ids"] == ["neg.tar::a"]
    assert _reasons(out["errors"]) == {
        "neg.tar::b": "shard refused while reading this sample; sample skipped",
        "neg.tar": f"shard refused after 1 samples: tar member at offset {shard.stat().st_size - 1536} has a "
                   "negative size (-512); the rest of the shard is skipped"}
    assert out["peak_increase"] < PEAK_LIMIT


def _header(info: tarfile.TarInfo, kind: bytes, size: int = 0, patch: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte GNU header of type ``kind`` (fields at byte offsets in ``patch`` overwritten), checksummed."""
    info.type, info.size, info.mtime = kind, size, 0
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    for pos, value in (patch or {}).items():
        buf[pos:pos + len(value)] = value
    buf[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(buf))[0]
    return bytes(buf)


def _write_gz(path: Path, parts: list[bytes | tuple[bytes, int]]) -> None:
    """A gzipped stream of ``parts``: bytes, or ``(block, n)`` for ``block`` repeated ``n`` times."""
    with gzip.open(path, "wb", compresslevel=1) as fh:
        for part in parts:
            if isinstance(part, bytes):
                fh.write(part)
                continue
            block, n = part
            for start in range(0, n, 1024):
                fh.write(block * min(1024, n - start))


def _member(name: str, data: bytes) -> bytes:
    return _header(tarfile.TarInfo(name), tarfile.REGTYPE, len(data)) + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("fmt", ["gnu-old", "gnu-1.0"])
def test_sparse_members_are_skipped_with_bounded_memory(tmp_path: Path, fmt: str) -> None:
    shard = tmp_path / "sp.tar.gz"
    if fmt == "gnu-old":  # the sparse map continues over 200k extension blocks (100 MB)
        entry = b"%011o\0%011o\0" % (4096, 1)
        head = _header(tarfile.TarInfo("s.jpg"), tarfile.GNUTYPE_SPARSE, 0, {482: b"\1", 483: b"%011o\0" % 10})
        more = entry * 21 + b"\1" + b"\0" * 7
        last = entry * 21 + b"\0" * 8
        _write_gz(shard, [_member("a.png", _png()), head, (more, 200_000 - 1), last, _member("b.png", _png(1)),
                          b"\0" * 1024])
    else:  # a GNU 1.0 sparse map of 10M entries (40 MB) heads the member's data
        n = 10_000_000
        head = b"%d\n" % n
        with tarfile.open(shard, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tar:
            _add(tar, "a.png", _png())
            info = tarfile.TarInfo("GNUSparseFile.0/s.jpg")
            info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s.jpg",
                                "GNU.sparse.realsize": "10"}
            info.size = len(head) + 4 * n
            tar.addfile(info, _Stream(info.size, b"0\n", head))
            _add(tar, "b.png", _png(1))
    out = _measure("from poisonscan.data.sources import SampleError, open_source", """
        src = open_source(sys.argv[1])
        read = [x.id for x in src.iter_samples() if not isinstance(x, SampleError)]
        out = {"ids": src.ids, "read": read, "errors": [[e.id, e.reason] for e in src.errors]}
    """, str(shard))
    assert out["ids"] == out["read"] == ["sp.tar.gz::a", "sp.tar.gz::b"]
    assert _reasons(out["errors"]) == {"sp.tar.gz::s.jpg": "sparse member skipped: sparse files are never read"}
    assert out["peak_increase"] < PEAK_LIMIT


# ---------------------------------------------------------------------------------------------------- image files


def test_image_file_over_the_limit_is_refused_without_reading(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    with open(tmp_path / "huge.png", "wb") as fh:
        fh.truncate(1 << 30)  # a sparse 1 GiB file: no disk used
    out = _measure("from poisonscan.data.sources import SampleError, open_source", """
        src = open_source(sys.argv[1])
        out = {"errors": [[x.id, x.reason] for x in src.iter_samples() if isinstance(x, SampleError)]}
    """, str(tmp_path))
    assert _reasons(out["errors"]) == {"huge.png": f"file is {1 << 30} bytes, over the {MAX_MEMBER_BYTES}-byte "
                                                   "limit (max_member_bytes); not read"}
    assert out["peak_increase"] < PEAK_LIMIT
    (tmp_path / "huge.png").unlink()
    (tmp_path / "big.png").write_bytes(_png(1) + b"\0" * 1000)
    limit = len(_png()) + 10
    items = {x.id: x for x in open_source(tmp_path, max_member_bytes=limit).iter_samples()}
    assert not isinstance(items["ok.png"], SampleError)
    assert items["big.png"] == SampleError("big.png", f"file is {len(_png(1)) + 1000} bytes, over the {limit}-byte "
                                                      "limit (max_member_bytes); not read")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_in_an_image_folder_is_refused_not_waited_on(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    os.mkfifo(tmp_path / "pipe.png")
    out = _measure("from poisonscan.data.sources import SampleError, open_source", """
        src = open_source(sys.argv[1])
        out = {"errors": [[x.id, x.reason] for x in src.iter_samples() if isinstance(x, SampleError)]}
    """, str(tmp_path), timeout=30)
    assert _reasons(out["errors"]) == {"pipe.png": "not a regular file (fifo, device or socket); not read"}
