"""Data sources: one interface over image folders, file lists and WebDataset shards.

Every sample has a stable string id, a decoded RGB image and a label when the input knows one:

- image folder (recursive): ids are paths relative to the root with ``/`` separators; the ImageFolder layout
  (no images directly in the root, images under ``root/<class>/...``) gives labels = index of ``<class>`` in the
  sorted class folder names (empty class folders included, so indices match a sorted listing); any other layout has
  no labels. Hidden files and folders (``.name``) are ignored.
- file list (``path [label]`` per line, SSL-Backdoor/PatchSearch format): relative paths are resolved against the
  list's folder, ``#`` comments and blank lines are skipped; the id is the path as written.
- WebDataset shards (brace pattern, list, directory, single ``.tar``/``.tar.gz``): a sample is the run of consecutive
  members sharing a key (basename up to its first ``.``, directory kept); the id is
  ``"<shard path relative to the dataset root>::<key>"``; the label comes from ``.cls``; the image from the first
  present of jpg/jpeg/png/webp/ppm/bmp. A key seen again later in the same shard, or a repeated member inside one
  sample, is reported in ``Source.errors`` and the later occurrence is ignored (the first one wins).

Structural problems found while listing (truncated shard, duplicate key, sample without image, unusable name) are in
``Source.errors`` and the affected samples are not in ``ids``. Per-sample decode problems surface when the sample
is read: ``load`` raises ``DataError``, ``iter_samples`` yields a ``SampleError``. Ids are identifiers, never paths.

Bounds on what one input may cost (each refusal is a ``SampleError`` with the reason, so it reaches ``errors.csv``):

- decoding: at most ``max_pixels`` pixels (``DEFAULT_MAX_PIXELS``) and a long/short side ratio of at most
  ``MAX_ASPECT_RATIO``, both checked on the header before any pixel is decoded; only ``DECODE_FORMATS`` are decoded.
- reading: a tar member, and the members of one sample together, at most ``max_member_bytes``
  (``MAX_MEMBER_BYTES``), checked on the tar header before anything is read; the same bound applies to an image
  file of a folder or file list, which must be a regular file (fifos and devices are refused without reading).
- shards: pax/GNU extended headers at most ``MAX_TAR_HEADER_BYTES`` per member (``MAX_TAR_HEADER_CHAIN`` of them)
  and negative member sizes are refused before tarfile acts on them (the rest of that shard is skipped, the error
  names the shard); member names at most ``MAX_NAME_CHARS`` characters; symlink, hard link, device, fifo and sparse
  members are never read and each is reported (id ``<shard>::<member name>``); tarfile keeps no list of the members
  seen; a gzipped shard is kept decompressed for random access only when its members total at most
  ``GZ_CACHE_MAX_BYTES``. Member names are identifiers only: nothing is ever extracted to disk.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import threading
import warnings
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from poisonscan.errors import DataError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default Image.MAX_IMAGE_PIXELS (~ 89.5 M pixels)
# long side / short side above which an image is refused before decoding: no photo data set has such images, and
# resizing one so its short side reaches the model size would cost memory proportional to the ratio
MAX_ASPECT_RATIO = 20.0
# largest tar member, and largest total of one sample's members, read into memory (also the largest image file)
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# largest pax / GNU long-name header of a tar member (all such headers of one member, and all global pax headers of
# a shard, count together); tarfile reads these whole before it returns the member
MAX_TAR_HEADER_BYTES = 1024 * 1024
MAX_TAR_HEADER_CHAIN = 8  # most extended headers in front of one tar member
MAX_NAME_CHARS = 1024  # longest tar member name read (longer names are reported and skipped)
# largest decompressed size (sum of member sizes) of a gzipped shard kept in memory for random access; a larger one
# is streamed up to the requested sample on each random read
GZ_CACHE_MAX_BYTES = 512 * 1024 * 1024
# the PIL decoders used (content-sniffed among these only): the formats of IMAGE_EXTENSIONS and WDS_IMAGE_EXTS
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "PPM", "BMP", "TIFF", "GIF")  # multi-picture JPEGs open as JPEG
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FILELIST_SUFFIXES = (".txt", ".list", ".lst", ".tsv")
WDS_MANIFEST_HEADER = "# poisonscan wds-manifest v1"
_BAD_NAME_CHARS = ("\n", "\r", "\t")


@dataclass(frozen=True)
class Sample:
    """One decoded sample: stable id, RGB image, label (None when unknown)."""

    id: str
    image: Image.Image
    label: int | None


@dataclass(frozen=True)
class SampleError:
    """A sample (or shard) that could not be read, with the reason."""

    id: str
    reason: str


# --------------------------------------------------------------------------------------------------------------------
# decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on black, 16/32-bit and float greys are scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I" and arr.size and arr.max() > 255:
            arr = arr / 257.0
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, (0, 0, 0))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 draft: int | None = None, max_aspect: float | None = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode image bytes (format sniffed among ``DECODE_FORMATS`` from the content, never the name) into RGB.

    ``max_pixels`` (decompression bombs) and ``max_aspect`` (long/short side ratio) are checked on the header, before
    decoding; ``draft`` lets JPEG decode at a reduced scale whose sides stay >= ``draft`` (fast path for resizing).
    Raises ``DataError``.
    """
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise DataError(f"{name}: {w}x{h} = {w * h} pixels exceeds the decompression-bomb limit "
                                f"of {max_pixels} pixels")
            if max_aspect and max(w, h) > max_aspect * max(1, min(w, h)):
                raise DataError(f"{name}: {w}x{h} has an aspect ratio of {max(w, h) / max(1, min(w, h)):.1f}:1, "
                                f"over the limit of {max_aspect:g}:1 (MAX_ASPECT_RATIO); image refused")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            return to_rgb(img)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a recognised image format (reads {', '.join(DECODE_FORMATS)})") from None
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise DataError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------------------------------
# the interface


class Source(ABC):
    """A data set as an indexed collection of samples (see module docstring)."""

    kind: str = ""

    def __init__(self, root: Path, ids: list[str], labels: list[int | None], class_names: list[str] | None,
                 errors: list[SampleError], warnings_: list[str] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        self.root = root
        self.ids = ids
        self.labels = labels
        self.class_names = class_names
        self.errors = errors
        self.warnings = warnings_ or []
        self.max_pixels = max_pixels
        self.max_member_bytes = max_member_bytes

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, errors={len(self.errors)})"

    @property
    def has_labels(self) -> bool:
        """True when at least one sample has a label."""
        return any(label is not None for label in self.labels)

    @abstractmethod
    def spec(self) -> str | list[str]:
        """The resolved input spec (absolute paths): what ``open_source`` needs to open this source again."""

    @abstractmethod
    def read_members(self, i: int) -> dict[str, bytes]:
        """Raw bytes of sample ``i`` by extension (``{"jpg": ...}``; WebDataset: every member). Raises DataError."""

    @abstractmethod
    def locator(self, i: int) -> str:
        """The manifest line of sample ``i`` in the input's own format."""

    @abstractmethod
    def image_ext(self, i: int) -> str:
        """The extension (without dot, lower case) of the member/file that holds sample ``i``'s image."""

    def describe(self) -> dict[str, Any]:
        """JSON-safe identity of the source (kind, resolved spec, root, size) for caches and run records."""
        return {"kind": self.kind, "spec": self.spec(), "root": str(self.root), "n": len(self)}

    def partitions(self, chunk: int = 256) -> list[list[int]]:
        """Index groups that are cheap to read independently (parallel decoding splits work by these)."""
        n = len(self)
        return [list(range(s, min(s + chunk, n))) for s in range(0, n, max(1, chunk))]

    def iter_raw(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, bytes] | SampleError]]:
        """``(index, members)`` for each requested sample, or ``(index, SampleError)``; never raises per sample."""
        for i in range(len(self)) if indices is None else indices:
            try:
                yield i, self.read_members(i)
            except DataError as exc:
                yield i, SampleError(self.ids[i], _reason(exc, self.ids[i]))

    def load(self, i: int, draft: int | None = None) -> Sample:
        """Sample ``i`` decoded (random access). Raises ``DataError`` naming the sample id."""
        members = self.read_members(i)
        return self._decode(i, members, draft)

    def iter_indexed(self, indices: Iterable[int] | None = None,
                     draft: int | None = None) -> Iterator[tuple[int, Sample | SampleError]]:
        """Streaming ``(index, Sample | SampleError)`` pairs; WebDataset yields in shard order."""
        for i, item in self.iter_raw(indices):
            if isinstance(item, SampleError):
                yield i, item
                continue
            try:
                yield i, self._decode(i, item, draft)
            except DataError as exc:
                yield i, SampleError(self.ids[i], _reason(exc, self.ids[i]))

    def iter_samples(self, indices: Iterable[int] | None = None) -> Iterator[Sample | SampleError]:
        """Streaming samples; a bad sample gives a ``SampleError`` instead of raising."""
        for _, item in self.iter_indexed(indices):
            yield item

    def _decode(self, i: int, members: dict[str, bytes], draft: int | None) -> Sample:
        ext = self.image_ext(i)
        if ext not in members:
            raise DataError(f"{self.ids[i]}: no image member")
        img = decode_image(members[ext], self.ids[i], self.max_pixels, draft)
        return Sample(self.ids[i], img, self.labels[i])


def _reason(exc: Exception, sample_id: str) -> str:
    """The message of a DataError without the leading ``<id>: ``."""
    msg = str(exc)
    prefix = f"{sample_id}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _bad_name(name: str) -> bool:
    return any(c in name for c in _BAD_NAME_CHARS)


# --------------------------------------------------------------------------------------------------------------------
# folders and file lists


class _FileSource(Source):
    """A source whose samples are individual image files."""

    def __init__(self, root: Path, ids: list[str], paths: list[str], labels: list[int | None],
                 class_names: list[str] | None, errors: list[SampleError], warnings_: list[str] | None,
                 max_pixels: int | None, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        super().__init__(root, ids, labels, class_names, errors, warnings_, max_pixels, max_member_bytes)
        self.paths = paths  # absolute (not symlink-resolved) paths, one per sample

    def read_members(self, i: int) -> dict[str, bytes]:
        try:
            data = _read_file(self.paths[i], self.max_member_bytes)
        except FileNotFoundError:
            raise DataError(f"{self.ids[i]}: file not found ({self.paths[i]})") from None
        except OSError as exc:
            raise DataError(f"{self.ids[i]}: cannot read file ({exc.strerror or exc})") from None
        except DataError as exc:
            raise DataError(f"{self.ids[i]}: {exc}") from None
        return {self.image_ext(i): data}

    def image_ext(self, i: int) -> str:
        return os.path.splitext(self.paths[i])[1].lower().lstrip(".") or "img"

    def locator(self, i: int) -> str:
        label = self.labels[i]
        return self.paths[i] if label is None else f"{self.paths[i]} {label}"


def _read_file(path: str, limit: int | None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (fifos and devices are refused without a read)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError("not a regular file (fifo, device or socket); not read")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a fifo swapped in does not block the open
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError("not a regular file (fifo, device or socket); not read")
        if limit is not None and st.st_size > limit:
            raise DataError(f"file is {st.st_size} bytes, over the {limit}-byte limit (max_member_bytes); not read")
        data = fh.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise DataError(f"file is over the {limit}-byte limit (max_member_bytes); not read")
    return data


class FolderSource(_FileSource):
    """All image files under a directory (recursive); ImageFolder layout gives labels."""

    kind = "folder"

    def __init__(self, root: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        root = Path(os.path.abspath(root))
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a folder")
        rel_paths, errors = _walk_images(root)
        top_images = [p for p in rel_paths if "/" not in p]
        try:
            subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        except OSError as exc:
            raise DataError(f"cannot list {root}: {exc.strerror or exc}") from None
        class_names: list[str] | None = None
        labels: list[int | None] = [None] * len(rel_paths)
        warns: list[str] = []
        if subdirs and not top_images:
            class_names = subdirs
            index = {name: k for k, name in enumerate(subdirs)}
            labels = [index[p.split("/", 1)[0]] for p in rel_paths]
            used = set(labels)
            warns += [f"class folder {name!r} has no images" for k, name in enumerate(subdirs) if k not in used]
        if not rel_paths:
            raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths = [os.path.join(str(root), *p.split("/")) for p in rel_paths]
        super().__init__(root, rel_paths, paths, labels, class_names, errors, warns, max_pixels, max_member_bytes)

    def spec(self) -> str:
        return str(self.root)


def _walk_images(root: Path) -> tuple[list[str], list[SampleError]]:
    """Sorted ``/``-separated relative paths of image files under ``root`` (symlink loops guarded)."""
    found: list[str] = []
    errors: list[SampleError] = []
    seen: set[str] = set()

    def onerror(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename, root).replace(os.sep, "/") if exc.filename else str(root)
        errors.append(SampleError(rel, f"cannot list folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for fname in filenames:
            if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = fname if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{fname}"
            if _bad_name(rel):
                errors.append(SampleError(rel, "file name contains a tab or line break; skipped (cannot be "
                                               "written to a manifest)"))
                continue
            found.append(rel)
    found.sort()
    return found, errors


def parse_file_list(text: str) -> list[tuple[str, int | None]]:
    """``(path, label)`` per data line of an SSL-Backdoor file list (``path [label]``; ``#`` comments skipped).

    The label is the last whitespace-separated token when it is an integer, so paths may contain spaces.
    """
    entries: list[tuple[str, int | None]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
            entries.append((parts[0].strip(), int(parts[1])))
        else:
            entries.append((line, None))
    return entries


class FileListSource(_FileSource):
    """The images named in a ``path [label]`` file list; duplicate paths keep their first line only."""

    kind = "filelist"

    def __init__(self, list_path: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        list_path = Path(os.path.abspath(list_path))
        self.list_path = list_path
        text = _read_text(list_path)
        root = list_path.parent
        ids: list[str] = []
        paths: list[str] = []
        labels: list[int | None] = []
        errors: list[SampleError] = []
        seen: set[str] = set()
        for path, label in parse_file_list(text):
            if path in seen:
                errors.append(SampleError(path, "listed more than once; later lines ignored"))
                continue
            seen.add(path)
            ids.append(path)
            paths.append(os.path.normpath(path if os.path.isabs(path) else os.path.join(str(root), path)))
            labels.append(label)
        if not ids:
            raise DataError(f"file list {list_path} lists no images")
        super().__init__(root, ids, paths, labels, None, errors, None, max_pixels, max_member_bytes)

    def spec(self) -> str:
        return str(self.list_path)


def _read_text(path: Path) -> str:
    """A text file decoded as UTF-8 with surrogateescape (non-UTF-8 names survive round trips)."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------------------------------
# WebDataset shards


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


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _is_gz(path: str) -> bool:
    return path.lower().endswith((".gz", ".tgz"))


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's ``(key, ext)`` of a member name: the key keeps the directory and ends at the basename's first dot."""
    m = re.fullmatch(r"((?:.*/|)[^./][^./]*)\.([^/]*)", name, flags=re.DOTALL)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


@dataclass
class _Group:
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
               max_member_bytes: int | None = MAX_MEMBER_BYTES) -> Iterator[_Group | SampleError]:
    """Walk a shard once in order, yielding complete sample groups and errors (never raises).

    ``want(key, ext)`` says whether a member's bytes are read (otherwise only its offset/size are recorded; for a
    gzipped shard skipping still decompresses). Duplicate keys and repeated members are reported and ignored; a read
    failure ends the walk with an error naming the shard (the sample in progress is reported too). A sample with a
    member, or members in total, over ``max_member_bytes`` is reported and skipped before any of its oversized bytes
    are read; links, devices, fifos, sparse members and names over ``MAX_NAME_CHARS`` are reported and skipped
    (directories silently). Memory stays bounded per member (see ``_ShardTarInfo``).
    """
    seen: set[str] = set()
    current: _Group | None = None
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
                    if _bad_name(key):
                        yield SampleError(f"{rel}::{key!r}", "key contains a tab or line break; sample skipped")
                        skip_key = key
                        continue
                    if key in seen:
                        yield SampleError(f"{rel}::{key}", f"duplicate key: a later sample with this key (member "
                                                           f"{info.name!r}) was ignored, the first one is kept")
                        skip_key = key
                        continue
                    seen.add(key)
                    current = _Group(key)
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
class _ShardIndex:
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


def _index_shard(path: str, rel: str, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> _ShardIndex:
    idx = _ShardIndex(path, rel, [], [], [], [], [], [])
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
                           if _is_shard(f) and not f.startswith("."))
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


class WdsSource(Source):
    """WebDataset shards (``.tar``/``.tar.gz``), indexed once at open time (shards scanned in parallel threads).

    Plain ``.tar`` shards are read at member offsets for random access; a gzipped shard is decompressed once per
    random-access miss and its samples' bytes kept in an LRU of ``gz_cache_shards`` shards (a shard whose members
    total over ``GZ_CACHE_MAX_BYTES`` is instead streamed up to the sample on each random read). Streaming
    (``iter_raw``/``iter_samples``) reads each needed shard sequentially once. Samples with a member, or members in
    total, over ``max_member_bytes`` are reported in ``errors`` and left out.
    """

    kind = "wds"

    def __init__(self, spec: str | Path | Sequence[str | Path], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 root: Path | str | None = None, gz_cache_shards: int = 2, scan_threads: int | None = None,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        paths, auto_root = resolve_shards(spec)
        root = Path(os.path.abspath(root)) if root is not None else auto_root
        rels = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
        threads = scan_threads or max(1, min(4, os.cpu_count() or 1, len(paths)))
        with ThreadPoolExecutor(threads) as pool:
            shards = list(pool.map(_index_shard, paths, rels, [max_member_bytes] * len(paths)))
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
            step = len(idxs) if _is_gz(self.shards[s].path) else max(1, chunk)
            out += [idxs[k:k + step] for k in range(0, len(idxs), step)]
        return out

    def key(self, i: int) -> str:
        """The WebDataset ``__key__`` of sample ``i``."""
        s, j = self._loc[i]
        return self.shards[s].keys[j]

    def read_members(self, i: int) -> dict[str, bytes]:
        s, j = self._loc[i]
        sh = self.shards[s]
        if _is_gz(sh.path):
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
            if isinstance(item, _Group) and item.key in want_keys:
                yield pos[item.key], {e: d for e, (_, _, d) in item.members.items() if d is not None}

    def iter_raw(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, bytes] | SampleError]]:
        wanted = sorted(set(range(len(self)) if indices is None else (int(i) for i in indices)))
        by_shard: dict[int, list[int]] = {}
        for i in wanted:
            by_shard.setdefault(self._loc[i][0], []).append(i)
        for s, idxs in by_shard.items():
            first = idxs[0] - self._loc[idxs[0]][1]  # global index of position 0 of shard s
            if not _is_gz(self.shards[s].path):
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


# --------------------------------------------------------------------------------------------------------------------
# opening


def _sniff_wds_manifest(path: Path) -> bool:
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
        return len(first) == 2 and _is_shard(first[0].strip())
    return False


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
            has_shards = any(e.is_file() and _is_shard(e.name) for e in os.scandir(path))
        except OSError as exc:
            raise DataError(f"cannot list {s}: {exc.strerror or exc}") from None
        return "wds" if has_shards else "folder"
    if _is_shard(path.name):
        return "wds"
    if path.name.lower().endswith(FILELIST_SUFFIXES) or path.suffix == "":
        return "wds-manifest" if _sniff_wds_manifest(path) else "filelist"
    raise DataError(f"{s}: not a folder, file list (.txt), manifest (.tsv) or WebDataset shard (.tar/.tar.gz)")


def open_source(spec: str | Path | Sequence[str | Path], kind: str = "auto",
                max_pixels: int | None = DEFAULT_MAX_PIXELS, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> Source:
    """Open a data set: folder, ``.txt`` file list, WebDataset shards (pattern, list, folder) or a ``.tsv`` manifest.

    ``kind`` forces ``folder``/``filelist``/``wds``/``wds-manifest``. Empty source, missing path or bad brace
    pattern raise ``DataError``. ``max_pixels`` is the per-image decompression-bomb limit; ``max_member_bytes`` the
    largest tar member (and sample) or image file read (None: no limit).
    """
    if isinstance(spec, (list, tuple)) and len(spec) == 1:
        spec = spec[0]
    kind = detect_kind(spec) if kind == "auto" else kind
    if kind == "folder":
        return FolderSource(_single(spec), max_pixels, max_member_bytes)
    if kind == "filelist":
        return FileListSource(_single(spec), max_pixels, max_member_bytes)
    if kind == "wds":
        return WdsSource(spec, max_pixels, max_member_bytes=max_member_bytes)
    if kind == "wds-manifest":
        from poisonscan.data.manifest import ManifestSource

        return ManifestSource(_single(spec), max_pixels, max_member_bytes)
    raise DataError(f"unknown source kind {kind!r} (auto, folder, filelist, wds, wds-manifest)")


def _single(spec: str | Path | Sequence[str | Path]) -> str:
    if not isinstance(spec, (str, Path)):
        raise DataError("a list of paths is only accepted for WebDataset shards")
    return str(spec)
