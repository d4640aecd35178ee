"""The data interface every input kind implements: ``Source``, ``Sample``, ``SampleError`` and image decoding.

Ids are identifiers, never paths. Structural problems found while listing are in ``Source.errors`` and the affected
samples are not in ``ids``; per-sample decode problems surface when the sample is read (``load`` raises
``DataError``, ``iter_samples`` yields a ``SampleError``).

Decoding bounds (each refusal is a ``SampleError`` with the reason, so it reaches ``errors.csv``): at most
``max_pixels`` pixels (``DEFAULT_MAX_PIXELS``) and a long/short side ratio of at most ``MAX_ASPECT_RATIO``, both
checked on the header before any pixel is decoded; only ``DECODE_FORMATS`` are decoded. Reading bounds: a file, a tar
member, and the members of one sample together, at most ``max_member_bytes`` (``MAX_MEMBER_BYTES``).
"""

from __future__ import annotations

import io
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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
    #: samples live in WebDataset shards (manifests of this kind are ``.tsv`` WebDataset manifests)
    is_sharded: bool = False

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

    def key(self, i: int) -> str:
        """The short name of sample ``i``: its WebDataset key, or its file name without the extension."""
        return os.path.splitext(self.ids[i].rsplit("/", 1)[-1])[0]

    def input_paths(self) -> list[Path]:
        """Every file or folder this source reads (outputs must stay outside all of them)."""
        spec = self.spec()
        return [Path(self.root)] + [Path(f) for f in ([spec] if isinstance(spec, str) else spec)]

    def read_files(self) -> list[Path]:
        """The files this source reads samples from: shards, a list or manifest (a file source adds its images)."""
        return [p for p in self.input_paths() if p.is_file()]

    def fingerprint(self) -> str:
        """A hash of the path, size, mtime and ctime of every file of :meth:`read_files`; a decoded copy of the
        source (the image store) is reused only while it is unchanged, so new pixels under old names are decoded
        anew. A file that cannot be stat'ed is hashed as missing."""
        import hashlib

        h = hashlib.sha256()
        for p in self.read_files():
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{p}\0missing\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

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


def bad_name(name: str) -> bool:
    """True when a name holds a tab or line break (it could not be written to a manifest line)."""
    return any(c in name for c in _BAD_NAME_CHARS)


def read_text(path: Path) -> str:
    """A text file decoded as UTF-8 with surrogateescape (non-UTF-8 names survive round trips)."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def inside(path: str | Path, root: str | Path) -> bool:
    """True when ``path`` is ``root`` or below it (both as given: resolve them first where links matter)."""
    try:
        return os.path.commonpath([str(path), str(root)]) == str(root)
    except ValueError:
        return False


def is_shard(name: str) -> bool:
    """True for a WebDataset shard file name (``.tar``, ``.tar.gz``, ``.tgz``)."""
    return name.lower().endswith(SHARD_SUFFIXES)


def is_gz(path: str) -> bool:
    """True for a gzipped shard."""
    return path.lower().endswith((".gz", ".tgz"))
