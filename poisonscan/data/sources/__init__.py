"""Data sources: one interface over image folders, file lists, WebDataset shards and WebDataset manifests.

Every sample has a stable string id, a decoded RGB image and a label when the input knows one. ``open_source``
picks the kind from the spec (or takes it from ``kind``) and builds it from ``SOURCE_KINDS``:

- ``folder`` and ``filelist`` (``files.py``): one image file per sample; ids are relative paths / paths as listed.
- ``wds`` (``wds.py``, read through ``shards.py``): ``"<shard relative to the dataset root>::<key>"`` ids.
- ``wds-manifest`` (``wds_manifest.py``): the samples a manifest lists, with the ids of the shards' own source.

``base.py`` holds the interface (``Source``, ``Sample``, ``SampleError``), decoding and the bounds on what one input
may cost. Sources only read: every writer (manifests, shards, removal lists) is in ``poisonscan.data.writers``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from poisonscan.data.sources.base import (DECODE_FORMATS, DEFAULT_MAX_PIXELS, FILELIST_SUFFIXES, GZ_CACHE_MAX_BYTES,
                                          IMAGE_EXTENSIONS, MAX_ASPECT_RATIO, MAX_MEMBER_BYTES, MAX_NAME_CHARS,
                                          MAX_TAR_HEADER_BYTES, MAX_TAR_HEADER_CHAIN, SHARD_SUFFIXES, WDS_IMAGE_EXTS,
                                          Sample, SampleError, Source, decode_image, inside, is_gz, is_shard,
                                          read_text, to_rgb)
from poisonscan.data.sources.files import FileListSource, FileSource, FolderSource, parse_file_list
from poisonscan.data.sources.shards import expand_braces, resolve_shards, split_key, walk_shard
from poisonscan.data.sources.wds import WdsSource
from poisonscan.data.sources.wds_manifest import (WDS_MANIFEST_HEADER, ManifestSource, parse_wds_manifest,
                                                  sniff_wds_manifest, wds_manifest_text)
from poisonscan.errors import DataError

#: every source kind, by the name ``--kind``/``open_source(kind=...)`` and run records use
SOURCE_KINDS: dict[str, type[Source]] = {
    "folder": FolderSource, "filelist": FileListSource, "wds": WdsSource, "wds-manifest": ManifestSource}

__all__ = [
    "DECODE_FORMATS", "DEFAULT_MAX_PIXELS", "FILELIST_SUFFIXES", "GZ_CACHE_MAX_BYTES", "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO", "MAX_MEMBER_BYTES", "MAX_NAME_CHARS", "MAX_TAR_HEADER_BYTES", "MAX_TAR_HEADER_CHAIN",
    "SHARD_SUFFIXES", "SOURCE_KINDS", "WDS_IMAGE_EXTS", "WDS_MANIFEST_HEADER", "FileListSource", "FileSource",
    "FolderSource", "ManifestSource", "Sample", "SampleError", "Source", "WdsSource", "decode_image", "detect_kind",
    "expand_braces", "inside", "is_gz", "is_shard", "open_source", "parse_file_list", "parse_wds_manifest",
    "read_text", "resolve_shards", "sniff_wds_manifest", "split_key", "to_rgb", "walk_shard", "wds_manifest_text",
]


def detect_kind(spec: str | Path | Sequence[str | Path]) -> str:
    """The kind of a spec: ``folder``, ``filelist``, ``wds`` or ``wds-manifest``."""
    if not isinstance(spec, (str, Path)):
        return "wds"
    s = str(spec)
    if not s.strip():
        raise DataError("empty data source spec")
    if "{" in s or "}" in s:
        return "wds"
    if "://" in s or s.startswith("pipe:"):
        raise DataError(f"{s}: remote or piped sources are not supported; give local paths")
    path = Path(s)
    if not path.exists():
        raise DataError(f"{s} does not exist")
    if path.is_dir():
        try:
            has_shards = any(e.is_file() and is_shard(e.name) for e in os.scandir(path))
        except OSError as exc:
            raise DataError(f"cannot list {s}: {exc.strerror or exc}") from None
        return "wds" if has_shards else "folder"
    if is_shard(path.name):
        return "wds"
    if path.name.lower().endswith(FILELIST_SUFFIXES) or path.suffix == "":
        return "wds-manifest" if sniff_wds_manifest(path) else "filelist"
    raise DataError(f"{s}: not a folder, file list (.txt), manifest (.tsv) or WebDataset shard (.tar/.tar.gz)")


def open_source(spec: str | Path | Sequence[str | Path], kind: str = "auto",
                max_pixels: int | None = DEFAULT_MAX_PIXELS, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> Source:
    """Open a data set: folder, ``.txt`` file list, WebDataset shards (pattern, list, folder) or a ``.tsv`` manifest.

    ``kind`` forces one of ``SOURCE_KINDS``. Empty source, missing path or bad brace pattern raise ``DataError``.
    ``max_pixels`` is the per-image decompression-bomb limit; ``max_member_bytes`` the largest tar member (and
    sample) or image file read (None: no limit).
    """
    if isinstance(spec, (list, tuple)) and len(spec) == 1:
        spec = spec[0]
    kind = detect_kind(spec) if kind == "auto" else kind
    cls = SOURCE_KINDS.get(kind)
    if cls is None:
        raise DataError(f"unknown source kind {kind!r} (auto, {', '.join(SOURCE_KINDS)})")
    if cls is not WdsSource and not isinstance(spec, (str, Path)):
        raise DataError("a list of paths is only accepted for WebDataset shards")
    return cls(spec, max_pixels, max_member_bytes)
