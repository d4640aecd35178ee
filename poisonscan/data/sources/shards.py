"""Reading WebDataset shards safely: brace patterns, the tar walk that groups members into samples, shard indexes.

A sample is the run of consecutive members sharing a key (basename up to its first ``.``, directory kept). A key seen
again later in the same shard, or a repeated member inside one sample, is reported and the later occurrence ignored.
Pax/GNU extended headers of at most ``MAX_TAR_HEADER_BYTES`` per member (``MAX_TAR_HEADER_CHAIN`` of them) and
non-negative member sizes are checked before tarfile acts on them (the rest of that shard is skipped, the error names
the shard); member names are at most ``MAX_NAME_CHARS`` characters; symlink, hard link, device, fifo and sparse
members are never read and each is reported (id ``<shard>::<member name>``); tarfile keeps no list of the members
seen. Member names are identifiers only: nothing is ever extracted to disk.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from poisonscan.data.sources.base import (MAX_MEMBER_BYTES, MAX_NAME_CHARS, MAX_TAR_HEADER_BYTES, MAX_TAR_HEADER_CHAIN,
                                          WDS_IMAGE_EXTS, SampleError, bad_name, is_shard)
from poisonscan.errors import DataError

def expand_braces(pattern: str, limit: int = 1_000_000) -> list[str]:
    """Expand ``{000..009}`` numeric ranges (zero padding kept) and ``{a,b}`` alternatives; bad patterns raise."""
    if pattern.count("{") != pattern.count("}"):
        raise DataError(f"bad brace pattern {pattern!r}: unbalanced braces")
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    if "{" in head or "}" in head:
        raise DataError(f"bad brace pattern {pattern!r}: nested or unbalanced braces")
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"bad brace pattern {pattern!r}: range {{{body}}} needs two non-negative integers")
        a, b = int(lo), int(hi)
        width = len(lo) if (lo.startswith("0") or hi.startswith("0")) and len(lo) == len(hi) else 0
        if abs(b - a) + 1 > limit:
            raise DataError(f"bad brace pattern {pattern!r}: range {{{body}}} is too large")
        step = 1 if b >= a else -1
        items = [str(v).zfill(width) for v in range(a, b + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"bad brace pattern {pattern!r}: {{{body}}} is neither a range a..b nor a list a,b")
    rest = expand_braces(tail, limit)
    if len(items) * len(rest) > limit:
        raise DataError(f"bad brace pattern {pattern!r}: expands to too many names")
    return [head + item + r for item in items for r in rest]



def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's ``(key, ext)`` of a member name: the key keeps the directory and ends at the basename's first dot."""
    m = re.fullmatch(r"((?:.*/|)[^./][^./]*)\.([^/]*)", name, flags=re.DOTALL)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


@dataclass
class Group:
    """One sample of a shard while walking it: key, members by extension, their total size."""

    key: str
    members: dict[str, tuple[int, int, bytes | None]] = field(default_factory=dict)  # ext -> (offset, size, data)
    nbytes: int = 0


_EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)
_SKIPPED_TYPES = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                  tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}


class _RefusedHeader(tarfile.TarError):
    """A shard header that is not read because reading it would cost unbounded memory."""


class _ShardTarInfo(tarfile.TarInfo):
    """``TarInfo`` that reads shard headers with bounded memory.

    A negative size (base-256 size fields and pax ``size`` records can hold one) is refused: tarfile would step back
    to an earlier header and read the same members forever. Extended headers (pax, GNU long name/link) are refused
    before tarfile reads them whole when a member's chain of them exceeds ``MAX_TAR_HEADER_BYTES`` or
    ``MAX_TAR_HEADER_CHAIN`` headers (global pax headers: over the whole shard). GNU sparse maps are skipped without
    being kept; the member gets an empty ``sparse`` list and is never read.
    """

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise _RefusedHeader(f"tar member at offset {self.offset} has a negative size ({self.size})")
        if self.type not in _EXTENDED_HEADERS:
            info = super()._proc_member(tar)  # type: ignore[attr-defined]
        else:
            chain_bytes, depth = getattr(tar, "_ps_chain", (0, 0))
            chain_bytes, depth = chain_bytes + tarfile.BLOCKSIZE + self.size, depth + 1
            global_bytes = getattr(tar, "_ps_global_bytes", 0) + (self.size if self.type == tarfile.XGLTYPE else 0)
            if depth > MAX_TAR_HEADER_CHAIN:
                raise _RefusedHeader(f"more than {MAX_TAR_HEADER_CHAIN} extended tar headers in a row at offset "
                                     f"{self.offset} (MAX_TAR_HEADER_CHAIN)")
            if chain_bytes > MAX_TAR_HEADER_BYTES or global_bytes > MAX_TAR_HEADER_BYTES:
                raise _RefusedHeader(f"extended tar header of {self.size} bytes at offset {self.offset}: the extended "
                                     f"headers of a member (and the global ones of a shard) may total "
                                     f"{MAX_TAR_HEADER_BYTES} bytes (MAX_TAR_HEADER_BYTES)")
            setattr(tar, "_ps_global_bytes", global_bytes)
            setattr(tar, "_ps_chain", (chain_bytes, depth))
            try:
                info = super()._proc_member(tar)  # type: ignore[attr-defined]
            finally:
                setattr(tar, "_ps_chain", (0, 0))
        if info.size < 0:  # set by a pax "size" record or a sparse header's real size
            raise _RefusedHeader(f"tar member at offset {info.offset} has a negative size ({info.size})")
        return info

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # an old GNU sparse map continues in extension blocks while byte 504 is set: they are skipped, not kept
        _, extended, real_size = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while extended:
            block = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data")
            extended = bool(block[504])
        self.sparse = []  # type: ignore[assignment]
        self.offset_data = tar.fileobj.tell()  # type: ignore[union-attr]
        tar.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = real_size
        return self

    def _proc_gnusparse_10(self, next_: tarfile.TarInfo, pax_headers: dict[str, str], tar: tarfile.TarFile) -> None:
        # a GNU 1.0 sparse map ("<n>\n" then 2n numbers, one a line) heads the member's data: skipped, not kept
        block = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
        head, _, rest = block.partition(b"\n")
        try:
            need = 2 * int(head) - rest.count(b"\n")
        except ValueError:
            raise tarfile.ReadError("invalid GNU sparse map") from None
        while need > 0:
            block = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data")
            need -= block.count(b"\n")
        next_.offset_data = tar.fileobj.tell()  # type: ignore[union-attr]
        next_.sparse = []  # type: ignore[assignment]


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a tar opened for reading, in order, without tarfile keeping each one in ``tar.members``."""
    while (info := tar.next()) is not None:
        tar.members.clear()
        yield info


def _shown(name: str) -> str:
    """A member name as shown in an error id: names over ``MAX_NAME_CHARS`` are cut to 100 characters."""
    return name if len(name) <= MAX_NAME_CHARS else f"{name[:100]}...({len(name)} characters)"


def _skipped_reason(info: tarfile.TarInfo) -> str:
    """Why a member that is neither a regular file nor a directory is not read."""
    kind = _SKIPPED_TYPES.get(info.type)
    if kind in ("symlink", "hard link"):
        return f"{kind} member skipped: tar links are never followed (target {_shown(info.linkname)!r})"
    if kind is not None:
        return f"{kind} member skipped: only regular files are read"
    return f"member of unknown type {info.type!r} skipped: only regular files are read"


def walk_shard(path: str, rel: str, want: Callable[[str, str], bool],
               max_member_bytes: int | None = MAX_MEMBER_BYTES) -> Iterator[Group | SampleError]:
    """Walk a shard once in order, yielding complete sample groups and errors (never raises).

    ``want(key, ext)`` says whether a member's bytes are read (otherwise only its offset/size are recorded; for a
    gzipped shard skipping still decompresses). Duplicate keys and repeated members are reported and ignored; a read
    failure ends the walk with an error naming the shard (the sample in progress is reported too). A sample with a
    member, or members in total, over ``max_member_bytes`` is reported and skipped before any of its oversized bytes
    are read; links, devices, fifos, sparse members and names over ``MAX_NAME_CHARS`` are reported and skipped
    (directories silently). Memory stays bounded per member (see ``_ShardTarInfo``).
    """
    seen: set[str] = set()
    current: Group | None = None
    skip_key: str | None = None
    count = 0
    try:
        with tarfile.open(path, "r:*", tarinfo=_ShardTarInfo) as tar:
            for info in _tar_members(tar):
                if not info.isfile():
                    if not info.isdir():
                        yield SampleError(f"{rel}::{_shown(info.name)}", _skipped_reason(info))
                    continue
                if info.sparse is not None:
                    yield SampleError(f"{rel}::{_shown(info.name)}", "sparse member skipped: sparse files are never "
                                                                     "read")
                    continue
                if len(info.name) > MAX_NAME_CHARS:
                    yield SampleError(f"{rel}::{_shown(info.name)}", f"member name is {len(info.name)} characters, "
                                      f"over the limit of {MAX_NAME_CHARS} (MAX_NAME_CHARS); member skipped")
                    continue
                parsed = split_key(info.name)
                if parsed is None:
                    continue
                key, ext = parsed
                if current is not None and key == current.key:
                    if ext in current.members:
                        yield SampleError(f"{rel}::{key}", f"repeated member {info.name!r} ignored")
                        continue
                elif key == skip_key:
                    continue
                else:
                    if current is not None:
                        yield current
                        count += 1
                        current = None
                    skip_key = None
                    if bad_name(key):
                        yield SampleError(f"{rel}::{key!r}", "key contains a tab or line break; sample skipped")
                        skip_key = key
                        continue
                    if key in seen:
                        yield SampleError(f"{rel}::{key}", f"duplicate key: a later sample with this key (member "
                                                           f"{info.name!r}) was ignored, the first one is kept")
                        skip_key = key
                        continue
                    seen.add(key)
                    current = Group(key)
                total = current.nbytes + info.size
                if max_member_bytes is not None and total > max_member_bytes:
                    what = (f"member {info.name!r} is {info.size} bytes" if info.size > max_member_bytes
                            else f"its members total {total} bytes with {info.name!r}")
                    yield SampleError(f"{rel}::{key}", f"{what}, over the {max_member_bytes}-byte limit "
                                                       f"(max_member_bytes); sample skipped, member not read")
                    current, skip_key = None, key
                    continue
                current.nbytes = total
                data = None
                if want(key, ext):
                    fh = tar.extractfile(info)
                    data = fh.read() if fh is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                current.members[ext] = (info.offset_data, info.size, data)
            _check_tail(tar)
        if current is not None:
            yield current
    except _RefusedHeader as exc:
        if current is not None:
            yield SampleError(f"{rel}::{current.key}", "shard refused while reading this sample; sample skipped")
        yield SampleError(rel, f"shard refused after {count} samples: {exc}; the rest of the shard is skipped")
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        if current is not None:
            yield SampleError(f"{rel}::{current.key}", "shard is truncated or corrupt while reading this sample; "
                                                      "sample skipped")
        yield SampleError(rel, f"shard truncated or corrupt after {count} samples ({type(exc).__name__}: {exc}); "
                               f"the rest of the shard is skipped")


def _check_tail(tar: tarfile.TarFile) -> None:
    """After the last member, only zero blocks may follow (tarfile stops silently at a bad or cut header)."""
    fh = tar.fileobj
    fh.seek(tar.offset)
    while chunk := fh.read(1 << 20):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"invalid or truncated header at offset {tar.offset}")


@dataclass
class ShardIndex:
    """The samples of one shard: keys, image extension, label, member offsets/sizes (for plain tar reads)."""

    path: str
    rel: str
    keys: list[str]
    image_exts: list[str]
    labels: list[int | None]
    members: list[dict[str, tuple[int, int]]]
    errors: list[SampleError]
    warnings: list[str]
    nbytes: int = 0  # sum of the member sizes of the indexed samples


def index_shard(path: str, rel: str, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> ShardIndex:
    idx = ShardIndex(path, rel, [], [], [], [], [], [])
    for item in walk_shard(path, rel, want=lambda key, ext: ext == "cls", max_member_bytes=max_member_bytes):
        if isinstance(item, SampleError):
            idx.errors.append(item)
            continue
        image_ext = next((e for e in WDS_IMAGE_EXTS if e in item.members), None)
        if image_ext is None:
            idx.errors.append(SampleError(f"{rel}::{item.key}", "no image member (" + "/".join(WDS_IMAGE_EXTS)
                                          + f"); has {sorted(item.members)}"))
            continue
        label = None
        if "cls" in item.members:
            text = (item.members["cls"][2] or b"").decode("utf-8", errors="replace").strip()
            if re.fullmatch(r"-?\d+", text):
                label = int(text)
            else:
                idx.warnings.append(f"{rel}::{item.key}: .cls is not an integer ({text[:20]!r}); label unknown")
        idx.keys.append(item.key)
        idx.image_exts.append(image_ext)
        idx.labels.append(label)
        idx.members.append({e: (off, size) for e, (off, size, _) in item.members.items()})
        idx.nbytes += item.nbytes
    return idx


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> tuple[list[str], Path]:
    """Absolute shard paths and the dataset root (the given folder, else the shards' common folder)."""
    if isinstance(spec, (str, Path)):
        s = str(spec)
        if "{" in s or "}" in s:
            names = expand_braces(s)
            root = None
        elif os.path.isdir(s):
            root = Path(os.path.abspath(s))
            names = sorted(os.path.join(dp, f) for dp, dns, fns in os.walk(root) for f in fns
                           if is_shard(f) and not f.startswith("."))
            if not names:
                raise DataError(f"folder {s} holds no .tar/.tar.gz shards")
        else:
            names, root = [s], None
    else:
        names, root = [str(p) for p in spec], None
        if not names:
            raise DataError("empty list of shards")
    paths = [os.path.abspath(n) for n in names]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"shard {p} does not exist")
        if not os.path.isfile(p):
            raise DataError(f"shard {p} is not a file")
    if len(set(paths)) != len(paths):
        raise DataError("the same shard is given more than once")
    if root is None:
        root = Path(os.path.commonpath([os.path.dirname(p) for p in paths]))
    return paths, root
