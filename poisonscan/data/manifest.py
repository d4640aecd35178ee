"""Manifests (the kept samples in the input's own format), removal lists, and re-sharding.

Formats written here (and read back by ``open_source``):

- folder / file list -> a file list: ``<absolute path> <label>`` per line (``<absolute path>`` when the label is
  unknown), no header, so SSL-Backdoor/PatchSearch loaders read it unchanged.
- WebDataset -> a ``.tsv`` WebDataset manifest: a ``# poisonscan wds-manifest v1`` header, a ``# root: <dir>`` line
  (the dataset root, so ids stay the same as in the original source), then ``<absolute shard path>\\t<key>`` lines.
  Relative shard paths (hand-written manifests) are resolved against the manifest's folder.
- removal list: one sample id per line (ids may contain spaces and ``#``; only blank lines are skipped).

Text is UTF-8 with ``surrogateescape`` so ids from non-UTF-8 file names round-trip.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from poisonscan.data.sources import (DEFAULT_MAX_PIXELS, MAX_MEMBER_BYTES, WDS_IMAGE_EXTS, WDS_MANIFEST_HEADER,
                                     SampleError, Source, WdsSource, _read_text, decode_image)
from poisonscan.errors import DataError
from poisonscan.runs import atomic_write_text, temp_file

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
    if source.kind in ("wds", "wds-manifest"):
        lines = [WDS_MANIFEST_HEADER, f"# root: {source.root}"] + lines
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
    text = _read_text(Path(path))
    seen: dict[str, None] = {}
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.strip():
            seen.setdefault(line, None)
    return list(seen)


# --------------------------------------------------------------------------------------------------------------------
# WebDataset manifests as a source


def parse_wds_manifest(path: Path) -> tuple[list[tuple[str, str]], Path | None]:
    """``(absolute shard path, key)`` lines and the recorded dataset root (None when absent)."""
    text = _read_text(path)
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


class ManifestSource(Source):
    """The samples listed in a WebDataset manifest, read from their shards (kind ``wds-manifest``).

    Ids equal the original source's ids when the manifest records its root. Lines naming a key that the shard does
    not hold, or repeating an earlier line, are reported in ``errors``.
    """

    kind = "wds-manifest"

    def __init__(self, path: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        self.path = Path(os.path.abspath(path))
        entries, root = parse_wds_manifest(self.path)
        if not entries:
            raise DataError(f"WebDataset manifest {self.path} lists no samples")
        shards = list(dict.fromkeys(s for s, _ in entries))
        if root is not None and not all(_inside(s, root) for s in shards):
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
            step = len(idxs) if self.base.shards[s].path.lower().endswith((".gz", ".tgz")) else max(1, chunk)
            out += [idxs[k:k + step] for k in range(0, len(idxs), step)]
        return out

    def iter_raw(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, bytes] | SampleError]]:
        idx = range(len(self)) if indices is None else indices
        for j, item in self.base.iter_raw(self.sel[i] for i in idx):
            yield self._pos[j], item


def _inside(path: str, root: Path) -> bool:
    try:
        return os.path.commonpath([path, str(root)]) == str(root)
    except ValueError:
        return False


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
    if source.kind in ("wds", "wds-manifest"):
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


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _check_out_dir(source: Source, out_dir: Path) -> Path:
    out = Path(os.path.realpath(out_dir))
    if out.exists() and not out.is_dir():
        raise DataError(f"reshard output {out_dir} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"reshard output folder {out_dir} is not empty")
    if source.kind == "folder" and _inside(str(out), Path(os.path.realpath(source.root))):
        raise DataError(f"reshard output {out_dir} is inside the input folder {source.root}")
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
    writer: _ShardWriter | None = None
    for i, raw in source.iter_raw(keep):
        if isinstance(raw, SampleError):
            result.errors.append(raw)
            continue
        try:
            members = _sample_members(source, i, raw, source.max_pixels)
        except DataError as exc:
            result.errors.append(SampleError(source.ids[i], str(exc)))
            continue
        key = _unique_key(safe_key(_sample_key(source, i)), used)
        try:
            if writer is None or writer.count >= shard_size:
                if writer is not None:
                    result.shards.append(writer.close())
                writer = _ShardWriter(out, f"{safe_key(prefix)}-{len(result.shards):06d}{suffix}")
            writer.add(key, members)
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


def _sample_key(source: Source, i: int) -> str:
    """The original key of sample ``i``: the WebDataset key, or the file name without extension."""
    key = getattr(source, "key", None)
    if callable(key):
        return key(i)
    return os.path.splitext(source.ids[i].rsplit("/", 1)[-1])[0]


def _unique_key(key: str, used: set[str]) -> str:
    cand, n = key, 1
    while cand in used:
        cand = f"{key}_{n}"
        n += 1
    used.add(cand)
    return cand


class _ShardWriter:
    """One output shard, written to a temp file in ``out_dir`` and renamed on close."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.path = out_dir / name
        if self.path.resolve().parent != out_dir:
            raise DataError(f"refusing to write {name} outside {out_dir}")
        fd, self.tmp = temp_file(self.path)     # the umask's file mode, not mkstemp's 0600
        self.fh = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w:gz" if name.endswith(".gz") else "w",
                                format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            _add_member(self.tar, f"{key}.{ext}", data)
        self.count += 1

    def abort(self) -> None:
        """Drop the unfinished shard."""
        try:
            self.tar.close()
            self.fh.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def close(self) -> Path:
        self.tar.close()
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
