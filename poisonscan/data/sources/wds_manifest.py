"""WebDataset manifests: the format (what ``clean`` writes for sharded input) and the source that reads one.

A manifest is a ``# poisonscan wds-manifest v1`` header, a ``# root: <dir>`` line (the dataset root, so ids stay
the same as in the original source), then ``<absolute shard path>\\t<key>`` lines. Relative shard paths
(hand-written manifests) are resolved against the manifest's folder. Text is UTF-8 with ``surrogateescape``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from poisonscan.data.sources.base import (DEFAULT_MAX_PIXELS, MAX_MEMBER_BYTES, SampleError, Source, inside, is_gz,
                                          is_shard, read_text)
from poisonscan.data.sources.wds import WdsSource
from poisonscan.errors import DataError

WDS_MANIFEST_HEADER = "# poisonscan wds-manifest v1"


def wds_manifest_text(root: Path, locators: Iterable[str]) -> str:
    """A manifest of the given ``<shard>\\t<key>`` locators under dataset root ``root``."""
    lines = [WDS_MANIFEST_HEADER, f"# root: {root}", *locators]
    return "".join(line + "\n" for line in lines)


def parse_wds_manifest(path: Path) -> tuple[list[tuple[str, str]], Path | None]:
    """``(absolute shard path, key)`` lines and the recorded dataset root (None when absent)."""
    text = read_text(path)
    base = path.parent
    entries: list[tuple[str, str]] = []
    root: Path | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            m = re.match(r"#\s*root:\s*(.+)$", line)
            if m:
                root = Path(m.group(1).strip())
            continue
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1]:
            raise DataError(f"{path}:{n}: expected '<shard>\\t<key>', got {line[:80]!r}")
        shard = parts[0].strip()
        shard = os.path.normpath(shard if os.path.isabs(shard) else os.path.join(str(base), shard))
        entries.append((shard, parts[1]))
    return entries, root


def sniff_wds_manifest(path: Path) -> bool:
    """True when a text file is a WebDataset manifest (header line, or first data line ``<shard>\\t<key>``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024).decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    for line in head.splitlines():
        if line.startswith(WDS_MANIFEST_HEADER):
            return True
        if not line.strip() or line.startswith("#"):
            continue
        first = line.split("\t", 1)
        return len(first) == 2 and is_shard(first[0].strip())
    return False


class ManifestSource(Source):
    """The samples listed in a WebDataset manifest, read from their shards (kind ``wds-manifest``).

    Ids equal the original source's ids when the manifest records its root. Lines naming a key that the shard does
    not hold, or repeating an earlier line, are reported in ``errors``.
    """

    kind = "wds-manifest"
    is_sharded = True

    def __init__(self, path: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        self.path = Path(os.path.abspath(path))
        entries, root = parse_wds_manifest(self.path)
        if not entries:
            raise DataError(f"WebDataset manifest {self.path} lists no samples")
        shards = list(dict.fromkeys(s for s, _ in entries))
        if root is not None and not all(inside(s, root) for s in shards):
            root = None
        self.base = WdsSource(shards, max_pixels=max_pixels, root=root, max_member_bytes=max_member_bytes)
        lookup = {self.base.locator(j): j for j in range(len(self.base))}
        sel: list[int] = []
        errors = list(self.base.errors)
        seen: set[int] = set()
        for shard, key in entries:
            j = lookup.get(f"{shard}\t{key}")
            rel = os.path.relpath(shard, self.base.root).replace(os.sep, "/")
            if j is None:
                errors.append(SampleError(f"{rel}::{key}", "listed in the manifest but not found in the shard"))
            elif j in seen:
                errors.append(SampleError(self.base.ids[j], "listed more than once; later lines ignored"))
            else:
                seen.add(j)
                sel.append(j)
        if not sel:
            raise DataError(f"none of the samples listed in {self.path} was found in its shards")
        self.sel = sel
        self._pos = {j: i for i, j in enumerate(sel)}
        super().__init__(self.base.root, [self.base.ids[j] for j in sel], [self.base.labels[j] for j in sel], None,
                         errors, self.base.warnings, max_pixels, max_member_bytes)

    def spec(self) -> str:
        return str(self.path)

    def input_paths(self) -> list[Path]:
        """The manifest, the dataset root and every shard it reads."""
        return super().input_paths() + [Path(f) for f in self.base.spec()]

    def read_members(self, i: int) -> dict[str, bytes]:
        return self.base.read_members(self.sel[i])

    def image_ext(self, i: int) -> str:
        return self.base.image_ext(self.sel[i])

    def locator(self, i: int) -> str:
        return self.base.locator(self.sel[i])

    def key(self, i: int) -> str:
        return self.base.key(self.sel[i])

    def partitions(self, chunk: int = 256) -> list[list[int]]:
        """One group per underlying shard (split in ``chunk``-sized groups for plain tar shards)."""
        groups: dict[int, list[int]] = {}
        for i, j in enumerate(self.sel):
            groups.setdefault(self.base.shard_of(j), []).append(i)
        out: list[list[int]] = []
        for s, idxs in groups.items():
            step = len(idxs) if is_gz(self.base.shards[s].path) else max(1, chunk)
            out += [idxs[k:k + step] for k in range(0, len(idxs), step)]
        return out

    def iter_raw(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, bytes] | SampleError]]:
        idx = range(len(self)) if indices is None else indices
        for j, item in self.base.iter_raw(self.sel[i] for i in idx):
            yield self._pos[j], item
