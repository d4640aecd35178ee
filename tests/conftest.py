"""Shared test fixtures: tiny data sets made in ``tmp_path``.

Fixtures (all sizes tiny so every test stays fast):

- ``make_images`` -> callable ``make_images(n, size=32, seed=0) -> list[PIL.Image.Image]`` (RGB, deterministic).
- ``image_folder`` -> ``Path`` of an ImageFolder root: ``cat/`` (3 PNG) and ``dog/`` (3 JPEG), 32x32; labels
  cat=0, dog=1; ids ``cat/cat_0.png`` ... ``dog/dog_2.jpg``.
- ``file_list`` -> ``Path`` of ``list.txt`` (SSL-Backdoor format ``path label``), 6 images under ``images/`` next to
  it with labels ``i % 3``, plus a comment line and a blank line.
- ``wds_shards`` -> ``Path`` of a directory holding ``train-000000.tar`` and ``train-000001.tar``; 4 samples each
  (keys ``s0000``..``s0007``, even keys ``.jpg``, odd keys ``.png``, each with ``.cls`` = ``i % 2``).
  Pattern form: ``str(wds_shards / "train-{000000..000001}.tar")``.
- ``wds_shards_gz`` -> the same samples as gzipped ``train-00000{0,1}.tar.gz`` shards.
- ``write_shard`` -> callable ``write_shard(path, members: list[tuple[name, bytes]]) -> Path`` (``.tar`` or
  ``.tar.gz`` by suffix) for custom shards.
- ``corrupt_image`` -> ``Path`` of a ``.jpg`` file whose bytes are not an image.
- ``corrupt_folder`` -> ``Path`` of an ImageFolder root with 3 good images in ``a/`` plus ``a/bad.jpg`` (garbage),
  ``a/empty.png`` (zero bytes) and ``a/trunc.jpg`` (a JPEG cut in half).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _make_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic RGB images ``size x size``: a colour gradient plus noise, distinct per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    images = []
    for _ in range(n):
        base = rng.uniform(0, 255, size=3).astype(np.float32)
        grad = np.stack([xx, yy, 1 - xx], axis=-1) * rng.uniform(0, 128, size=3).astype(np.float32)
        noise = rng.normal(0, 20, size=(size, size, 3)).astype(np.float32)
        arr = np.clip(base * 0.5 + grad + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr, "RGB"))
    return images


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a tar (``.tar``) or gzipped tar (``.tar.gz``/``.tgz``) with the given ``(name, bytes)`` members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def _shard_members(start: int, count: int, images: list[Image.Image]) -> list[tuple[str, bytes]]:
    members = []
    for i in range(start, start + count):
        key = f"s{i:04d}"
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        members.append((f"{key}.{ext}", _encode(images[i], fmt)))
        members.append((f"{key}.cls", str(i % 2).encode()))
    return members


def _make_wds(root: Path, suffix: str) -> Path:
    images = _make_images(8, 32, seed=3)
    for s in range(2):
        _write_shard(root / f"train-{s:06d}{suffix}", _shard_members(s * 4, 4, images))
    return root


@pytest.fixture
def make_images() -> Callable[..., list[Image.Image]]:
    """The image factory ``make_images(n, size=32, seed=0)``."""
    return _make_images


@pytest.fixture
def write_shard() -> Callable[[Path, list[tuple[str, bytes]]], Path]:
    """The shard writer ``write_shard(path, [(member_name, bytes), ...])``."""
    return _write_shard


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder root with classes ``cat`` (PNG) and ``dog`` (JPEG), 3 images each."""
    root = tmp_path / "folder"
    images = _make_images(6, 32, seed=1)
    for c, (name, ext, fmt) in enumerate([("cat", "png", "PNG"), ("dog", "jpg", "JPEG")]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            images[c * 3 + i].save(root / name / f"{name}_{i}.{ext}", format=fmt)
    return root


@pytest.fixture
def file_list(tmp_path: Path) -> Path:
    """``list.txt`` with ``images/img_<i>.png <i % 3>`` lines (relative paths), a comment and a blank line."""
    root = tmp_path / "flist"
    (root / "images").mkdir(parents=True)
    lines = ["# SSL-Backdoor style file list", ""]
    for i, img in enumerate(_make_images(6, 32, seed=2)):
        img.save(root / "images" / f"img_{i}.png")
        lines.append(f"images/img_{i}.png {i % 3}")
    path = root / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def wds_shards(tmp_path: Path) -> Path:
    """Directory with two plain ``.tar`` WebDataset shards, 4 samples each (.jpg/.png + .cls)."""
    return _make_wds(tmp_path / "wds", ".tar")


@pytest.fixture
def wds_shards_gz(tmp_path: Path) -> Path:
    """Directory with two gzipped ``.tar.gz`` WebDataset shards, 4 samples each (.jpg/.png + .cls)."""
    return _make_wds(tmp_path / "wdsgz", ".tar.gz")


@pytest.fixture
def corrupt_image(tmp_path: Path) -> Path:
    """A ``.jpg`` file whose content is not an image."""
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not an image" * 10)
    return path


@pytest.fixture
def corrupt_folder(tmp_path: Path) -> Path:
    """ImageFolder root ``a/`` with 3 good PNGs plus a garbage, a zero-byte and a truncated file."""
    root = tmp_path / "corrupt"
    (root / "a").mkdir(parents=True)
    for i, img in enumerate(_make_images(3, 32, seed=4)):
        img.save(root / "a" / f"good_{i}.png")
    (root / "a" / "bad.jpg").write_bytes(b"\x00garbage" * 20)
    (root / "a" / "empty.png").write_bytes(b"")
    jpeg = _encode(_make_images(1, 64, seed=5)[0], "JPEG")
    (root / "a" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """``umask(mask)`` sets the process umask for the test; the old one comes back afterwards."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)
