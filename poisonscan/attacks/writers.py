"""Where a poisoned data set's files go: a folder or file list (``FileSetWriter``) or WebDataset shards (``WdsWriter``),
the same kind as the input."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from poisonscan.data.sources import IMAGE_EXTENSIONS, WDS_IMAGE_EXTS, FileListSource, FileSource, Source
from poisonscan.data.writers import TarWriter, unique_name
from poisonscan.errors import DataError, UsageError

_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS} | set(WDS_IMAGE_EXTS)


class FileSetWriter:
    """Image folder (same relative paths) or file list (``images/...`` plus a new list with the same name).

    Clean samples are copied through the source's bounded reader, unreadable content included (the poisoned set
    keeps the input's broken files for the scanner to report), or hard-linked after a ``stat`` shows a regular file
    within the member limit; a fifo, a device or a larger file is dropped and listed (``DataError``), never copied."""

    def __init__(self, source: Source, dest: Path, link: bool = False) -> None:
        self.source, self.dest, self.link = source, dest, link
        self.needs_bytes = not link                 # a link needs no bytes; a copy reads them in the stream
        assert isinstance(source, FileSource)
        self.paths: list[str] = list(source.paths)
        self.is_list = isinstance(source, FileListSource)
        if self.is_list:
            common = os.path.commonpath([os.path.dirname(p) for p in self.paths])
            self.rels = ["images/" + os.path.relpath(p, common).replace(os.sep, "/") for p in self.paths]
            self.list_name = Path(str(source.spec())).name
        else:
            self.rels = list(source.ids)
        self.used: set[str] = set()
        self.taken: list[str] = [unique_name(r, self.used, fold_case=True) for r in self.rels]
        self.lines: list[tuple[str, int | None]] = []
        self.linked = self.copied = 0
        dest.mkdir(parents=True, exist_ok=True)
        for name in source.class_names or []:
            (dest / name).mkdir(parents=True, exist_ok=True)

    def order(self, indices: list[int]) -> list[int]:
        return indices

    def _target(self, rel: str) -> Path:
        path = self.dest.joinpath(*rel.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add_clean(self, i: int, members: dict[str, bytes] | None) -> str:
        rel = self.taken[i]
        if self.link and members is None:
            try:
                st = os.stat(self.paths[i])
            except OSError as exc:
                raise DataError(f"cannot read ({exc.strerror or exc})") from None
            limit = self.source.max_member_bytes
            if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
                raise DataError("not a regular file within the member limit; not linked or copied")
            dst = self._target(rel)
            try:
                os.link(self.paths[i], dst)
                self.linked += 1
                self.lines.append((rel, self.source.labels[i]))
                return rel
            except OSError:
                pass
        data = (members if members is not None else self.source.read_members(i))[self.source.image_ext(i)]
        dst = self._target(rel)
        with open(dst, "wb") as fh:
            fh.write(data)
        self.copied += 1
        self.lines.append((rel, self.source.labels[i]))
        return rel

    def add_image(self, i: int, suffix: str, png: bytes, members: dict[str, bytes] | None) -> str:
        parent, _, fname = self.rels[i].rpartition("/")
        stem = os.path.splitext(fname)[0]
        rel = unique_name(f"{parent + '/' if parent else ''}{stem}{suffix}.png", self.used, fold_case=True)
        with open(self._target(rel), "wb") as fh:
            fh.write(png)
        self.lines.append((rel, self.source.labels[i]))
        return rel

    def finish(self) -> str:
        """Write the file list (file lists only); returns the output spec relative to ``dest``."""
        if not self.is_list:
            return "."
        text = "".join(f"{rel}\n" if lab is None else f"{rel} {lab}\n" for rel, lab in self.lines)
        (self.dest / self.list_name).write_text(text, encoding="utf-8", errors="surrogateescape")
        return self.list_name


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


class WdsWriter:
    """WebDataset shards with the input's relative names; samples in input order, members sorted by extension."""

    needs_bytes = True

    def __init__(self, source: Source, dest: Path, link: bool = False) -> None:
        self.source, self.dest = source, dest
        self.sinks: dict[str, TarWriter] = {}
        self.done: set[str] = set()
        self.keys: dict[str, set[str]] = {}
        for sid in source.ids:
            rel, _, key = sid.partition("::")
            self.keys.setdefault(rel, set()).add(key)
        self.linked = self.copied = 0
        dest.mkdir(parents=True, exist_ok=True)

    def _split(self, i: int) -> tuple[str, str]:
        rel, sep, key = self.source.ids[i].partition("::")
        if not sep or not _safe_rel(rel):
            raise DataError(f"{self.source.ids[i]}: not a '<shard>::<key>' WebDataset id")
        return rel, key

    def order(self, indices: list[int]) -> list[int]:
        """``indices`` grouped by shard (first appearance), input order within a shard."""
        first: dict[str, int] = {}
        for k, i in enumerate(indices):
            first.setdefault(self._split(i)[0], k)
        return sorted(indices, key=lambda i: first[self._split(i)[0]])

    def _sink(self, rel: str) -> TarWriter:
        if rel not in self.sinks:
            if rel in self.done:
                raise RuntimeError(f"shard {rel} reopened: samples must come shard by shard")
            for other in list(self.sinks):      # samples come shard by shard: close the finished shard
                self.sinks.pop(other).close()
                self.done.add(other)
            path = self.dest.joinpath(*rel.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sinks[rel] = TarWriter(path)
        return self.sinks[rel]

    def _write(self, rel: str, key: str, members: dict[str, bytes]) -> str:
        self._sink(rel).add_sample(key, members)
        return f"{rel}::{key}"

    def add_clean(self, i: int, members: dict[str, bytes] | None) -> str:
        assert members is not None
        rel, key = self._split(i)
        self.copied += 1
        return self._write(rel, key, members)

    def add_image(self, i: int, suffix: str, png: bytes, members: dict[str, bytes] | None) -> str:
        rel, key = self._split(i)
        new_key = unique_name(f"{key}{suffix}", self.keys[rel])
        image_ext = self.source.image_ext(i)
        extra = {e: d for e, d in (members or {}).items() if e != image_ext and e not in _IMAGE_EXTS}
        label = self.source.labels[i]
        if "cls" not in extra and label is not None:
            extra["cls"] = str(label).encode()
        return self._write(rel, new_key, {**extra, "png": png})

    def finish(self) -> str:
        for rel in list(self.sinks):
            self.sinks.pop(rel).close()
        return "."


def make_writer(source: Source, dest: Path, link: bool) -> FileSetWriter | WdsWriter:
    if isinstance(source, FileSource):
        return FileSetWriter(source, dest, link)
    if source.is_sharded:
        return WdsWriter(source, dest)
    raise UsageError(f"cannot write a data set of kind {source.kind!r}")


# --------------------------------------------------------------------------------------------------------------------
# writing the sets
