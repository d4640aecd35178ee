"""ImageStore: every sample decoded once at the model's resolution, as uint8 ``N x 3 x S x S``.

Images are resized so the short side is ``S`` (bilinear, antialiased) and centre-cropped to ``S x S``, exactly as
torchvision's ``Resize(S)`` + ``CenterCrop(S)`` on PIL images. Decoding runs in DataLoader workers; under
torch.distributed each rank decodes a share of the source's partitions and the shares are gathered.

With ``path``, the store is cached as ``images.npy`` (memory-mapped on load) plus ``store.json`` (ids, labels,
class names, source indices, errors, size, source identity); ``store.json`` is written last, so its presence marks a
complete store. A later ``build_store`` with the same source (kind, resolved spec, ids) and size reuses it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from poisonscan import runtime as rt
from poisonscan.data.build_lock import building, close_inherited
from poisonscan.data.sources import MAX_ASPECT_RATIO, SampleError, Source
from poisonscan.errors import DataError, UsageError
from poisonscan.runs import atomic_write_text, temp_file

STORE_FORMAT = "poisonscan-image-store"
STORE_VERSION = 1
IMAGES_FILE = "images.npy"
META_FILE = "store.json"


@dataclass
class ImageStore:
    """Decoded images (``uint8 N x 3 x S x S``, possibly memory-mapped) with their ids and labels.

    ``source_indices[k]`` is the index in the source of image ``k`` (samples that failed are left out and listed in
    ``errors``), which is what ``write_manifest`` needs.
    """

    images: torch.Tensor
    ids: list[str]
    labels: list[int | None]
    errors: list[SampleError]
    size: int
    source_indices: list[int]
    class_names: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def label_array(self) -> np.ndarray:
        """Labels as int64 with -1 for unknown."""
        return np.array([-1 if label is None else label for label in self.labels], dtype=np.int64)

    def index_of(self) -> dict[str, int]:
        """Sample id -> row of ``images``."""
        return {sid: k for k, sid in enumerate(self.ids)}


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Short side to ``size`` (bilinear, antialiased), centre crop ``size x size``; returns ``(S, S, 3)`` uint8.

    An image whose long/short side ratio exceeds ``MAX_ASPECT_RATIO`` (the decoder refuses those, so only a caller's
    own image can be one) has only its centre region resampled (a ``box`` resize at the same sampling positions, up
    to float rounding), so the work never exceeds ``MAX_ASPECT_RATIO * size**2`` output pixels.
    """
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    else:
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        if (nw, nh) != (size, size):
            img = img.crop((left, top, left + size, top + size))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def write_errors_csv(errors: list[SampleError], path: Path | str) -> Path:
    """Write ``id,reason`` rows (with a header) atomically; ids from non-UTF-8 names survive (surrogateescape)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "reason"])
    writer.writerows([e.id, e.reason] for e in errors)
    return atomic_write_text(Path(path), buf.getvalue())


# --------------------------------------------------------------------------------------------------------------------
# decoding in DataLoader workers


class _DecodeStream(IterableDataset):
    """Yields ``(index, HWC uint8 array | SampleError)`` for the given partitions, split across workers."""

    def __init__(self, source: Source, parts: list[list[int]], size: int, draft: bool) -> None:
        self.source, self.parts, self.size, self.draft = source, parts, size, draft

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        draft = self.size if self.draft else None
        for part in self.parts[wid::nw]:
            for i, item in self.source.iter_indexed(part, draft=draft):
                if isinstance(item, SampleError):
                    yield i, item
                    continue
                try:
                    yield i, resize_center_crop(item.image, self.size)
                except Exception as exc:  # a decoder may fail lazily
                    yield i, SampleError(item.id, f"cannot resize ({type(exc).__name__}: {exc})")


def _collate(batch: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, SampleError]]]:
    """Stack the decoded images of a batch (``N x 3 x S x S``) and keep its errors aside."""
    ok = [(i, a) for i, a in batch if not isinstance(a, SampleError)]
    errs = [(i, a) for i, a in batch if isinstance(a, SampleError)]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    if ok:
        imgs = torch.from_numpy(np.stack([a for _, a in ok])).permute(0, 3, 1, 2).contiguous()
    else:
        imgs = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return idx, imgs, errs


def _decode(source: Source, parts: list[list[int]], size: int, sink: Callable[[np.ndarray, np.ndarray], None],
            num_workers: int, batch_size: int, quiet: bool, draft: bool) -> tuple[list[int], list[tuple[int, SampleError]]]:
    """Decode the partitions, handing ``(indices, N x 3 x S x S)`` batches to ``sink``; returns ok indices, errors."""
    workers = min(num_workers, len(parts))
    loader = DataLoader(_DecodeStream(source, parts, size, draft), batch_size=batch_size, collate_fn=_collate,
                        num_workers=workers if workers > 1 else 0, persistent_workers=False,
                        worker_init_fn=close_inherited if workers > 1 else None)
    ok: list[int] = []
    errors: list[tuple[int, SampleError]] = []
    with rt.progress("decode images", total=sum(len(p) for p in parts), quiet=quiet) as bar:
        for idx, imgs, errs in loader:
            if len(idx):
                sink(idx.numpy(), imgs.numpy())
                ok += idx.tolist()
            errors += errs
            bar.advance(len(idx) + len(errs))
    return sorted(ok), sorted(errors, key=lambda e: e[0])


# --------------------------------------------------------------------------------------------------------------------
# building, saving, loading


def _meta(source: Source, size: int, ids: list[str], labels: list[int | None], src_idx: list[int],
          errors: list[SampleError], stamp: str) -> dict[str, Any]:
    """``store.json``: what was decoded, from which source (its ids' hash and ``stamp``, its files' fingerprint taken
    before decoding)."""
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "size": size, "n": len(ids),
            "source": source.describe(), "source_ids_hash": _ids_hash(source.ids), "source_files": stamp,
            "class_names": source.class_names,
            "ids": ids, "labels": labels, "source_indices": src_idx,
            "errors": [{"id": e.id, "reason": e.reason} for e in errors]}


def _ids_hash(ids: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for sid in ids:
        h.update(sid.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    # ensure_ascii keeps ids from non-UTF-8 file names as \udcXX escapes: valid JSON that round-trips
    atomic_write_text(path / META_FILE, json.dumps(meta, ensure_ascii=True) + "\n")


def _tmp_npy(path: Path) -> Path:
    fd, tmp = temp_file(path / IMAGES_FILE)     # the umask's file mode, not mkstemp's 0600
    os.close(fd)
    return tmp


def _allocate_npy(tmp: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 ``.npy`` memory map of ``shape`` at ``tmp`` with its blocks reserved up front, so a full disk fails
    here with a clear error instead of as a SIGBUS while decoded images are written into the map."""
    nbytes = int(np.prod(shape))
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if nbytes and hasattr(os, "posix_fallocate"):
            with open(tmp, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        return arr
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write the image store {tmp.parent / IMAGES_FILE} ({nbytes / 1e6:.0f} MB): "
                         f"{exc.strerror or exc}") from None


def store_is_current(path: Path | str, source: Source) -> bool:
    """Whether the saved store at ``path`` was decoded from ``source``'s files as they are now (its ``store.json``
    records their :meth:`Source.fingerprint`; a store without one, or unreadable, is not current)."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("source_files") == source.fingerprint()


def open_store(path: Path | str) -> ImageStore:
    """Load a saved store (images memory-mapped copy-on-write). Raises ``DataError`` when absent or damaged."""
    return _open_store(Path(path))[0]


def _open_store(path: Path) -> tuple[ImageStore, dict[str, Any]]:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no image store at {path} ({META_FILE} missing)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path / META_FILE}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise DataError(f"{path / META_FILE} is not a version-{STORE_VERSION} poisonscan image store")
    try:
        arr = np.load(path / IMAGES_FILE, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path / IMAGES_FILE}: {exc}") from None
    n, s = meta["n"], meta["size"]
    if arr.dtype != np.uint8 or arr.shape != (n, 3, s, s):
        raise DataError(f"{path / IMAGES_FILE} has shape {arr.shape} {arr.dtype}, expected ({n}, 3, {s}, {s}) uint8")
    errors = [SampleError(e["id"], e["reason"]) for e in meta["errors"]]
    store = ImageStore(torch.from_numpy(arr), meta["ids"], meta["labels"], errors, s, meta["source_indices"],
                       meta.get("class_names"), meta["source"], path)
    return store, meta


def _reusable(path: Path, source: Source, size: int, stamp: str) -> ImageStore | None:
    """The saved store at ``path`` when it was built from the same source, unchanged since (``stamp``, its files'
    fingerprint), at the same size, else None."""
    if not (path / META_FILE).exists():
        return None
    try:
        store, meta = _open_store(path)
    except (DataError, KeyError, TypeError):
        return None
    same = (store.size == size and store.source == source.describe()
            and meta.get("source_ids_hash") == _ids_hash(source.ids) and meta.get("source_files") == stamp)
    return store if same else None


def build_store(source: Source, size: int, path: Path | str | None = None, runtime: rt.Runtime | None = None,
                quiet: bool = False, num_workers: int | None = None, batch_size: int = 256,
                draft: bool = False) -> ImageStore:
    """Decode every sample of ``source`` at ``size x size`` into an ``ImageStore``.

    Failed samples are left out and listed in ``errors`` (after the source's own structural errors). With ``path``
    the store is saved there (``images.npy`` + ``store.json``) and reused on the next call when source and size
    match and none of its files changed (``Source.fingerprint``: size, mtime and ctime of each shard, list or
    image); a build there holds ``path/.build.lock``, so concurrent builds of one store decode it once, and removes
    what an interrupted build left. ``num_workers`` defaults to ``min(4, cpu count)``; ``draft=True`` lets JPEGs
    decode at a reduced DCT scale that keeps the short side >= ``size`` (several times faster for large photos,
    pixels differ slightly from a full decode; off by default so the store equals torchvision's Resize +
    CenterCrop).
    """
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    rank, world = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
    workers = min(4, os.cpu_count() or 1) if num_workers is None else max(0, num_workers)
    # rank 0's fingerprint for every rank: ranks that judged reuse apart would leave the collectives unmatched
    stamp = rt.broadcast_object(source.fingerprint() if rank == 0 else None) if path is not None else ""
    if path is not None:
        path = Path(path)
        cached = _reusable(path, source, size, stamp) if rank == 0 else None
        if rt.broadcast_object(cached is not None):  # every rank takes the same path
            cached = cached if rank == 0 else _reusable(path, source, size, stamp)
            if cached is not None:
                return cached
    parts = source.partitions(batch_size)
    if world > 1:
        mine = [parts[k] for k in rt.shard_indices(len(parts), rank, world)]
        return _build_distributed(source, size, path, mine, workers, batch_size, quiet, draft, rank, stamp)
    if path is None:
        return _build_in_memory(source, size, parts, workers, batch_size, quiet, draft)
    path.mkdir(parents=True, exist_ok=True)
    with building(path, quiet, images_file=IMAGES_FILE):
        cached = _reusable(path, source, size, stamp)      # built by a process this one waited for
        if cached is not None:
            return cached
        return _build_saved(source, size, path, parts, workers, batch_size, quiet, draft, stamp)


def _build_in_memory(source: Source, size: int, parts: list[list[int]], workers: int, batch_size: int,
                     quiet: bool, draft: bool) -> ImageStore:
    n = len(source)
    buf = np.empty((n, 3, size, size), dtype=np.uint8)

    def sink(idx: np.ndarray, imgs: np.ndarray) -> None:
        buf[idx] = imgs

    ok, errs = _decode(source, parts, size, sink, workers, batch_size, quiet, draft)
    errors = list(source.errors) + [e for _, e in errs]
    images = buf if len(ok) == n else buf[ok]
    return _store_from(source, size, torch.from_numpy(images), ok, errors, None)


def _build_saved(source: Source, size: int, path: Path, parts: list[list[int]], workers: int, batch_size: int,
                 quiet: bool, draft: bool, stamp: str) -> ImageStore:
    """Decode into a full-size memory map beside ``path/images.npy``, compact it when samples failed, rename it into
    place, then write ``store.json`` (the mark of a complete store)."""
    n = len(source)
    tmp = _tmp_npy(path)
    try:
        buf: np.ndarray = _allocate_npy(tmp, (n, 3, size, size))

        def sink(idx: np.ndarray, imgs: np.ndarray) -> None:
            buf[idx] = imgs

        ok, errs = _decode(source, parts, size, sink, workers, batch_size, quiet, draft)
        errors = list(source.errors) + [e for _, e in errs]
        final = tmp
        if len(ok) < n:
            final = _tmp_npy(path)
            out = _allocate_npy(final, (len(ok), 3, size, size))
            for start in range(0, len(ok), 1024):
                out[start:start + 1024] = buf[ok[start:start + 1024]]
            out.flush()
            del out
        else:
            buf.flush()
        del buf
        (path / META_FILE).unlink(missing_ok=True)  # a store is complete only once its own store.json is written
        os.replace(final, path / IMAGES_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    _write_meta(path, _meta(source, size, [source.ids[i] for i in ok], [source.labels[i] for i in ok], ok, errors,
                            stamp))
    return open_store(path)


def _store_from(source: Source, size: int, images: torch.Tensor, ok: list[int], errors: list[SampleError],
                path: Path | None) -> ImageStore:
    return ImageStore(images, [source.ids[i] for i in ok], [source.labels[i] for i in ok], errors, size, ok,
                      source.class_names, source.describe(), path)


def _build_distributed(source: Source, size: int, path: Path | None, mine: list[list[int]], workers: int,
                       batch_size: int, quiet: bool, draft: bool, rank: int, stamp: str) -> ImageStore:
    """Each rank decodes its partitions; every rank gathers all shares; rank 0 saves when ``path`` is given."""
    my_idx = sorted(i for part in mine for i in part)
    pos = {i: k for k, i in enumerate(my_idx)}
    local = np.empty((len(my_idx), 3, size, size), dtype=np.uint8)

    def sink(idx: np.ndarray, imgs: np.ndarray) -> None:
        local[[pos[int(i)] for i in idx]] = imgs

    ok, errs = _decode(source, mine, size, sink, workers, batch_size, quiet, draft)
    keep = [pos[i] for i in ok]
    shares = rt.all_gather_object((ok, local[keep], errs))
    all_ok = [i for share in shares for i in share[0]]
    order = np.argsort(np.array(all_ok, dtype=np.int64), kind="stable")
    images = np.concatenate([share[1] for share in shares])[order] if all_ok else \
        np.empty((0, 3, size, size), dtype=np.uint8)
    ok_sorted = [all_ok[k] for k in order]
    errors = list(source.errors) + [e for _, e in sorted((x for s in shares for x in s[2]), key=lambda e: e[0])]
    if path is not None and rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        # never wait here (the other ranks sit in the barrier): a store another process is writing or has just
        # written is left to it, since every rank holds the images in memory already
        with building(path, quiet, wait=False, images_file=IMAGES_FILE) as lock:
            if lock != "busy" and _reusable(path, source, size, stamp) is None:
                _save_gathered(path, images, _meta(source, size, [source.ids[i] for i in ok_sorted],
                                                   [source.labels[i] for i in ok_sorted], ok_sorted, errors, stamp))
    rt.barrier()
    return _store_from(source, size, torch.from_numpy(images), ok_sorted, errors, path)


def _save_gathered(path: Path, images: np.ndarray, meta: dict[str, Any]) -> None:
    tmp = _tmp_npy(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, images, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        (path / META_FILE).unlink(missing_ok=True)
        os.replace(tmp, path / IMAGES_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    _write_meta(path, meta)
