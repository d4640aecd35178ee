"""WebDataset shards as a source: ids ``"<shard path relative to the dataset root>::<key>"``, labels from ``.cls``,
the image from the first present of jpg/jpeg/png/webp/ppm/bmp.

A gzipped shard is kept decompressed for random access only when its members total at most ``GZ_CACHE_MAX_BYTES``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from poisonscan.data.sources.base import (DEFAULT_MAX_PIXELS, GZ_CACHE_MAX_BYTES, MAX_MEMBER_BYTES, SampleError, Source,
                                          is_gz)
from poisonscan.data.sources.shards import Group, index_shard, resolve_shards, walk_shard
from poisonscan.errors import DataError

class WdsSource(Source):
    """WebDataset shards (``.tar``/``.tar.gz``), indexed once at open time (shards scanned in parallel threads).

    Plain ``.tar`` shards are read at member offsets for random access; a gzipped shard is decompressed once per
    random-access miss and its samples' bytes kept in an LRU of ``gz_cache_shards`` shards (a shard whose members
    total over ``GZ_CACHE_MAX_BYTES`` is instead streamed up to the sample on each random read). Streaming
    (``iter_raw``/``iter_samples``) reads each needed shard sequentially once. Samples with a member, or members in
    total, over ``max_member_bytes`` are reported in ``errors`` and left out.
    """

    kind = "wds"
    is_sharded = True

    def __init__(self, spec: str | Path | Sequence[str | Path], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES, root: Path | str | None = None,
                 gz_cache_shards: int = 2, scan_threads: int | None = None) -> None:
        paths, auto_root = resolve_shards(spec)
        root = Path(os.path.abspath(root)) if root is not None else auto_root
        rels = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
        threads = scan_threads or max(1, min(4, os.cpu_count() or 1, len(paths)))
        with ThreadPoolExecutor(threads) as pool:
            shards = list(pool.map(index_shard, paths, rels, [max_member_bytes] * len(paths)))
        ids: list[str] = []
        labels: list[int | None] = []
        errors: list[SampleError] = []
        warns: list[str] = []
        self._loc: list[tuple[int, int]] = []  # sample -> (shard number, position in shard)
        for s, sh in enumerate(shards):
            ids += [f"{sh.rel}::{k}" for k in sh.keys]
            labels += sh.labels
            errors += sh.errors
            warns += sh.warnings
            self._loc += [(s, j) for j in range(len(sh.keys))]
        if not ids:
            detail = f" ({errors[0].id}: {errors[0].reason})" if errors else ""
            raise DataError(f"WebDataset shards {spec!s:.200} hold no samples{detail}")
        self.shards = shards
        self.gz_cache_shards = gz_cache_shards
        self._cache: OrderedDict[int, dict[int, dict[str, bytes]]] = OrderedDict()
        self._lock: threading.Lock | None = None
        super().__init__(root, ids, labels, None, errors, warns, max_pixels, max_member_bytes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_lock"] = None
        return state

    def spec(self) -> list[str]:
        return [sh.path for sh in self.shards]

    def image_ext(self, i: int) -> str:
        s, j = self._loc[i]
        return self.shards[s].image_exts[j]

    def locator(self, i: int) -> str:
        s, j = self._loc[i]
        return f"{self.shards[s].path}\t{self.shards[s].keys[j]}"

    def shard_of(self, i: int) -> int:
        """The number of the shard that holds sample ``i``."""
        return self._loc[i][0]

    def partitions(self, chunk: int = 256) -> list[list[int]]:
        """One group per gzipped shard (read sequentially once); plain shards split in ``chunk``-sized groups."""
        groups: dict[int, list[int]] = {}
        for i, (s, _) in enumerate(self._loc):
            groups.setdefault(s, []).append(i)
        out: list[list[int]] = []
        for s, idxs in groups.items():
            step = len(idxs) if is_gz(self.shards[s].path) else max(1, chunk)
            out += [idxs[k:k + step] for k in range(0, len(idxs), step)]
        return out

    def key(self, i: int) -> str:
        """The WebDataset ``__key__`` of sample ``i``."""
        s, j = self._loc[i]
        return self.shards[s].keys[j]

    def read_members(self, i: int) -> dict[str, bytes]:
        s, j = self._loc[i]
        sh = self.shards[s]
        if is_gz(sh.path):
            if sh.nbytes <= GZ_CACHE_MAX_BYTES:
                members = self._gz_shard(s).get(j)
            else:  # too large to keep decompressed: read the shard up to this sample only
                stream = self._stream_shard(s, {j})
                try:
                    members = next((m for _, m in stream), None)
                finally:
                    stream.close()
            if members is None:
                raise DataError(f"{self.ids[i]}: sample could not be read again from {sh.rel}")
            return members
        out: dict[str, bytes] = {}
        try:
            with open(sh.path, "rb") as fh:
                for ext, (offset, size) in sh.members[j].items():
                    fh.seek(offset)
                    data = fh.read(size)
                    if len(data) != size:
                        raise DataError(f"{self.ids[i]}: member .{ext} is truncated in {sh.rel}")
                    out[ext] = data
        except OSError as exc:
            raise DataError(f"{self.ids[i]}: cannot read shard {sh.rel} ({exc.strerror or exc})") from None
        return out

    def _gz_shard(self, s: int) -> dict[int, dict[str, bytes]]:
        """Position -> members of every sample of gzipped shard ``s`` (LRU cached)."""
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            if s in self._cache:
                self._cache.move_to_end(s)
                return self._cache[s]
        members = dict(self._stream_shard(s, set(range(len(self.shards[s].keys)))))
        with self._lock:
            self._cache[s] = members
            while len(self._cache) > max(1, self.gz_cache_shards):
                self._cache.popitem(last=False)
        return members

    def _stream_shard(self, s: int, wanted: set[int]) -> Iterator[tuple[int, dict[str, bytes]]]:
        """``(position, members)`` of the wanted samples of shard ``s``, read sequentially."""
        sh = self.shards[s]
        pos = {k: j for j, k in enumerate(sh.keys)}
        want_keys = {sh.keys[j] for j in wanted}
        for item in walk_shard(sh.path, sh.rel, want=lambda key, ext: key in want_keys,
                               max_member_bytes=self.max_member_bytes):
            if isinstance(item, Group) and item.key in want_keys:
                yield pos[item.key], {e: d for e, (_, _, d) in item.members.items() if d is not None}

    def iter_raw(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, bytes] | SampleError]]:
        wanted = sorted(set(range(len(self)) if indices is None else (int(i) for i in indices)))
        by_shard: dict[int, list[int]] = {}
        for i in wanted:
            by_shard.setdefault(self._loc[i][0], []).append(i)
        for s, idxs in by_shard.items():
            first = idxs[0] - self._loc[idxs[0]][1]  # global index of position 0 of shard s
            if not is_gz(self.shards[s].path):
                yield from super().iter_raw(idxs)
                continue
            cached = self._cache.get(s)
            stream = ((j, cached[j]) for j in (i - first for i in idxs) if j in cached) if cached is not None \
                else self._stream_shard(s, {i - first for i in idxs})
            done: set[int] = set()
            for j, members in stream:
                done.add(first + j)
                yield first + j, members
            for i in idxs:
                if i not in done:
                    yield i, SampleError(self.ids[i], f"sample could not be read again from {self.shards[s].rel}")

