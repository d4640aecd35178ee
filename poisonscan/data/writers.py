"""Everything poisonscan writes about a data set: manifests, removal lists, WebDataset shards.

Formats (each read back by ``open_source``):

- folder / file list -> a file list: ``<absolute path> <label>`` per line (``<absolute path>`` when the label is
  unknown), no header, so SSL-Backdoor/PatchSearch loaders read it unchanged.
- WebDataset -> a ``.tsv`` WebDataset manifest (``poisonscan.data.sources.wds_manifest``).
- removal list: one sample id per line (ids may contain spaces and ``#``; only blank lines are skipped).
- shards: ``TarWriter``, the one tar writer (deterministic bytes; ``poison`` and ``clean --reshard`` use it).

Text is UTF-8 with ``surrogateescape`` so ids from non-UTF-8 file names round-trip. This module imports the sources;
no source imports it.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from poisonscan.data.sources import (WDS_IMAGE_EXTS, SampleError, Source, decode_image, inside, is_gz, read_text,
                                     wds_manifest_text)
from poisonscan.errors import DataError
from poisonscan.runs import atomic_write_text, temp_file

#: gzip level of written ``.tar.gz`` shards (the gzip header's time is 0, so equal input gives equal bytes)
GZIP_LEVEL = 6

_ENC = ("utf-8", "surrogateescape")


def _keep_list(source: Source, keep_indices: Iterable[int]) -> list[int]:
    """Sorted unique indices, range-checked."""
    keep = sorted({int(i) for i in keep_indices})
    if keep and (keep[0] < 0 or keep[-1] >= len(source)):
        raise DataError(f"keep index out of range for a source of {len(source)} samples")
    return keep


def manifest_text(source: Source, keep_indices: Iterable[int]) -> str:
    """The manifest of the kept samples as text (see module docstring for the formats)."""
    lines = [source.locator(i) for i in _keep_list(source, keep_indices)]
    if source.is_sharded:
        return wds_manifest_text(source.root, lines)
    return "".join(line + "\n" for line in lines)


def write_manifest(source: Source, keep_indices: Iterable[int], path: Path | str) -> Path:
    """Write the kept samples (in source order) in the input's own format, atomically; returns the path."""
    return atomic_write_text(Path(path), manifest_text(source, keep_indices))


def write_removal_list(ids: Iterable[str], path: Path | str) -> Path:
    """Write sample ids one per line (atomic)."""
    ids = list(ids)
    bad = [i for i in ids if any(c in i for c in "\n\r")]
    if bad:
        raise DataError(f"sample id {bad[0]!r} contains a line break and cannot be written to a removal list")
    return atomic_write_text(Path(path), "".join(f"{i}\n" for i in ids))


def read_removal_list(path: Path | str) -> list[str]:
    """Sample ids from a removal list, in file order, duplicates and blank lines dropped."""
    text = read_text(Path(path))
    seen: dict[str, None] = {}
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.strip():
            seen.setdefault(line, None)
    return list(seen)


# --------------------------------------------------------------------------------------------------------------------
# re-sharding


@dataclass
class ReshardResult:
    """What ``reshard`` wrote: shard paths, number of samples written, samples that could not be read."""

    shards: list[Path]
    n_written: int
    errors: list[SampleError] = field(default_factory=list)


def safe_key(key: str) -> str:
    """A WebDataset key safe as a tar member name: basename only, ``[A-Za-z0-9_-]``, no dots, at most 100 chars."""
    base = key.replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_")
    return (base or "sample")[:100]


def _safe_ext(ext: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "", ext.lower()).strip(".") or "bin"


def _sniff_ext(data: bytes) -> str | None:
    """The WebDataset image extension of encoded bytes, from magic numbers."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:2] in (b"P3", b"P6"):
        return "ppm"
    return None


def _sample_members(source: Source, i: int, raw: dict[str, bytes], max_pixels: int | None) -> dict[str, bytes]:
    """Members to write for sample ``i``: WebDataset members as they are; an image file under an image extension
    (re-encoded as PNG only when its format has none: TIFF, GIF, PGM), plus ``cls`` when the label is known."""
    if source.is_sharded:
        return {_safe_ext(ext): data for ext, data in raw.items()}
    data = raw[source.image_ext(i)]
    ext = source.image_ext(i)
    ext = ext if ext in WDS_IMAGE_EXTS else _sniff_ext(data)
    if ext is None:
        buf = io.BytesIO()
        decode_image(data, source.ids[i], max_pixels).save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    out = {ext: data}
    if source.labels[i] is not None:
        out["cls"] = str(source.labels[i]).encode()
    return out


def _check_out_dir(source: Source, out_dir: Path) -> Path:
    out = Path(os.path.realpath(out_dir))
    if out.exists() and not out.is_dir():
        raise DataError(f"reshard output {out_dir} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"reshard output folder {out_dir} is not empty")
    if any(overlaps(out, p) for p in source.input_paths()):
        raise DataError(f"reshard output {out_dir} overlaps the input {source.root}: the input is never modified")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    return out


def reshard(source: Source, keep_indices: Iterable[int], out_dir: Path | str, shard_size: int = 5000,
            compress: bool = False, prefix: str = "shard") -> ReshardResult:
    """Write the kept samples as new WebDataset shards ``<prefix>-000000.tar[.gz]`` inside ``out_dir`` (must be
    empty or new). Member bytes are copied unchanged; keys are sanitised by ``safe_key`` and made unique with a
    ``_<n>`` suffix; each shard is written to a temp file and renamed. Unreadable samples are skipped and listed.
    """
    if shard_size < 1:
        raise DataError("shard size must be >= 1")
    out = _check_out_dir(source, Path(out_dir))
    keep = _keep_list(source, keep_indices)
    suffix = ".tar.gz" if compress else ".tar"
    result = ReshardResult([], 0)
    used: set[str] = set()
    count = 0
    writer: TarWriter | None = None
    for i, raw in source.iter_raw(keep):
        if isinstance(raw, SampleError):
            result.errors.append(raw)
            continue
        try:
            members = _sample_members(source, i, raw, source.max_pixels)
        except DataError as exc:
            result.errors.append(SampleError(source.ids[i], str(exc)))
            continue
        key = unique_name(safe_key(source.key(i)), used)
        try:
            if writer is None or count >= shard_size:
                if writer is not None:
                    result.shards.append(writer.close())
                writer, count = TarWriter(out / f"{safe_key(prefix)}-{len(result.shards):06d}{suffix}"), 0
            writer.add_sample(key, members)
            count += 1
        except OSError as exc:
            if writer is not None:
                writer.abort()
            raise DataError(f"cannot write shards in {out_dir}: {exc.strerror or exc}") from None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        result.n_written += 1
    if writer is not None:
        try:
            result.shards.append(writer.close())
        except OSError as exc:
            writer.abort()
            raise DataError(f"cannot write shards in {out_dir}: {exc.strerror or exc}") from None
    return result


def unique_name(name: str, used: set[str], fold_case: bool = False) -> str:
    """``name``, or ``<stem>-2<ext>``, ``-3`` ... when taken (the extension is the basename's); records the result in
    ``used``. ``fold_case`` compares case-insensitively (file names on case-insensitive file systems)."""
    head, _, base = name.rpartition("/")
    stem, ext = os.path.splitext(base)
    prefix = f"{head}/" if head else ""
    cand, n = name, 1
    while (cand.casefold() if fold_case else cand) in used:
        n += 1
        cand = f"{prefix}{stem}-{n}{ext}"
    used.add(cand.casefold() if fold_case else cand)
    return cand


def overlaps(a: str | Path, b: str | Path) -> bool:
    """True when one path is the other or inside it (links resolved)."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return inside(ra, rb) or inside(rb, ra)


class TarWriter:
    """One tar shard with deterministic bytes (GNU format; mtime, uid and gid 0, mode 0644; gzipped when the name ends
    in ``.gz``/``.tgz``, with gzip time 0), written to a temp file beside ``path`` and renamed onto it on ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd, self.tmp = temp_file(path)     # the umask's file mode, not mkstemp's 0600
        self.fh = os.fdopen(fd, "wb")
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=self.fh, mtime=0, compresslevel=GZIP_LEVEL) \
            if is_gz(path.name) else None
        self.tar = tarfile.open(fileobj=self.gz or self.fh, mode="w", format=tarfile.GNU_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        """One member."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """One WebDataset sample: its members as ``<key>.<ext>``, sorted by extension."""
        for ext in sorted(members):
            self.add(f"{key}.{ext}", members[ext])

    def abort(self) -> None:
        """Drop the unfinished shard."""
        try:
            self.tar.close()
            if self.gz is not None:
                self.gz.close()
            self.fh.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def close(self) -> Path:
        """Finish the shard and move it into place; returns its path."""
        self.tar.close()
        if self.gz is not None:
            self.gz.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.path


def removal_indices(source: Source, removed_ids: Sequence[str]) -> tuple[list[int], list[int], list[str]]:
    """Split a source by a removal list: ``(keep indices, removed indices, ids not in the source)``."""
    wanted = set(removed_ids)
    removed = [i for i, sid in enumerate(source.ids) if sid in wanted]
    hit = {source.ids[i] for i in removed}
    keep = [i for i, sid in enumerate(source.ids) if sid not in wanted]
    unknown = [sid for sid in removed_ids if sid not in hit]
    return keep, removed, unknown
