"""Encode a data source with a frozen encoder once, caching the features (and variants) in the eval run dir.

A variant is a function of the uint8 image batch (e.g. the trigger pasted); its features are cached under its own
key. Images are decoded only when some requested variant is not cached yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poisonscan import runtime as rt
from poisonscan.data.sources import SampleError, Source
from poisonscan.data.store import ImageStore, build_store, resize_center_crop
from poisonscan.detect.features import extract_features
from poisonscan.errors import DataError
from poisonscan.runs import RunDir

__all__ = ["EncodedSet", "file_digest", "encode_source", "decode_subset"]

Variant = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EncodedSet:
    """Ids, labels and per-variant features (``"clean"`` always) of the readable samples of a source; ``store``
    holds the decoded images when they were asked for."""

    ids: list[str]
    labels: list[int | None]
    class_names: list[str] | None
    features: dict[str, np.ndarray]
    errors: list[SampleError] = field(default_factory=list)
    store: ImageStore | None = None


def file_digest(path: Path | str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (cache keys: the same checkpoint or trigger gives the same key)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def decode_subset(source: Source, indices: Sequence[int],
                  size: int) -> tuple[torch.Tensor, list[int], list[SampleError]]:
    """Decode the samples ``indices`` at ``size x size`` (for small subsets): images, decoded indices, errors."""
    images, ok, errors = [], [], []
    for i, item in source.iter_indexed(sorted(int(i) for i in indices), draft=size):
        if isinstance(item, SampleError):
            errors.append(item)
            continue
        images.append(torch.from_numpy(np.array(resize_center_crop(item.image, size))).permute(2, 0, 1))
        ok.append(i)
    stacked = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return stacked.contiguous(), ok, errors


def _load_cached(run: RunDir | None, name: str, key: str, n: int) -> np.ndarray | None:
    if run is None or not run.exists(f"features/{name}.json"):
        return None
    try:
        meta = run.read_json(f"features/{name}.json")
        if meta.get("key") != key:
            return None
        feats = np.load(run.file(f"features/{name}.npy"), allow_pickle=False)
    except (OSError, ValueError):
        return None
    return feats if feats.ndim == 2 and feats.shape[0] == n else None


def encode_source(encoder: nn.Module, source: Source, runtime: rt.Runtime, *, name: str, encoder_key: str,
                  run: RunDir | None = None, indices: Sequence[int] | None = None,
                  variants: Mapping[str, tuple[Variant, Mapping[str, Any]]] | None = None,
                  keep_images: bool = False, batch_size: int = 256, quiet: bool = False) -> EncodedSet:
    """Features of ``source`` (or its ``indices``) under the clean images and each variant, cached in ``run``.

    ``variants`` maps a name to ``(function of the uint8 batch, JSON-safe parameters for the cache key)``.
    ``encoder_key`` identifies the weights and resolution (e.g. a checkpoint digest). Cached features are reused only
    when the key (encoder, source identity, its files' fingerprint and ids, subset, variant parameters) matches.
    """
    size = int(getattr(encoder, "image_size"))
    variants = dict(variants or {})
    if indices is not None:
        chosen = sorted(int(i) for i in indices)
        ids = [source.ids[i] for i in chosen]
    else:
        chosen, ids = None, list(source.ids)
    base = {"encoder": encoder_key, "size": size, "source": source.describe(), "files": source.fingerprint(),
            "ids": hashlib.sha256("\0".join(ids).encode("utf-8", "surrogateescape")).hexdigest()}
    keys = {"clean": _key(base)} | {v: _key({**base, "variant": v, **params}) for v, (_, params) in variants.items()}
    meta = run.read_json(f"features/{name}.ids.json") if run and run.exists(f"features/{name}.ids.json") else None
    cached: dict[str, np.ndarray] = {}
    if meta is not None and meta.get("key") == keys["clean"]:
        for v, key in keys.items():
            feats = _load_cached(run, f"{name}.{v}", key, len(meta["ids"]))
            if feats is not None:
                cached[v] = feats
    if runtime.world_size > 1:  # every rank must take the same path: extract_features is collective
        agreed = set.intersection(*map(set, rt.all_gather_object(sorted(cached))))
        cached = {v: f for v, f in cached.items() if v in agreed}
    if meta is not None and len(cached) == len(keys) and not keep_images:
        errors = [SampleError(e["id"], e["reason"]) for e in meta.get("errors", [])]
        return EncodedSet(meta["ids"], meta["labels"], source.class_names, cached, errors)

    if chosen is None:
        store = build_store(source, size, runtime=runtime, quiet=quiet)
    else:
        images, ok, errors = decode_subset(source, chosen, size)
        store = ImageStore(images, [source.ids[i] for i in ok], [source.labels[i] for i in ok], errors, size, ok,
                           source.class_names, source.describe())
    images, kept_ids, labels, errors = store.images, store.ids, store.labels, store.errors
    if len(kept_ids) == 0:
        raise DataError(f"{name}: no readable sample in {source.root}")
    features: dict[str, np.ndarray] = {}
    for v, key in keys.items():
        feats = cached.get(v)
        if feats is None or feats.shape[0] != len(kept_ids):
            batch = images if v == "clean" else variants[v][0](images)
            feats = extract_features(encoder, batch, runtime, batch_size=batch_size, quiet=quiet)
            if run is not None and runtime.is_main:
                run.save_npy(f"features/{name}.{v}.npy", feats)
                run.write_json(f"features/{name}.{v}.json", {"key": key, "variant": v, "shape": list(feats.shape)})
        features[v] = feats
    if run is not None and runtime.is_main:
        run.write_json(f"features/{name}.ids.json", {
            "key": keys["clean"], "ids": kept_ids, "labels": labels,
            "errors": [{"id": e.id, "reason": e.reason} for e in errors]})
    return EncodedSet(kept_ids, labels, source.class_names, features, errors, store if keep_images else None)
