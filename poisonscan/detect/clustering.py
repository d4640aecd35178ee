"""The clustering model C(.) of PoisonCAM eq. 1: faiss k-means on L2-normalised features, fixed after fitting."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from poisonscan.runs import atomic_write_bytes

#: rows per chunk when features are read, converted or assigned piecewise (float16 / memory-mapped stay so)
ASSIGN_CHUNK = 65536


@dataclass
class Clustering:
    """Fitted k-means: ``centroids`` (l x D float32), the training ``labels`` (N int64) and ``distances`` (N float32,
    L2 distance of each training feature to its own centroid)."""

    centroids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    _device_centroids: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False,
                                                                compare=False)

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.distances = np.asarray(self.distances, dtype=np.float32)
        if self.centroids.ndim != 2:
            raise ValueError("centroids must be l x D")
        if self.labels.shape != self.distances.shape:
            raise ValueError("labels and distances must have the same length")

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> np.ndarray:
        """Number of training samples in each cluster (l int64)."""
        return np.bincount(self.labels, minlength=self.n_clusters).astype(np.int64)

    def _centroids_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._device_centroids:
            c = torch.from_numpy(self.centroids).to(device)
            self._device_centroids[key] = (c, (c * c).sum(1))
        return self._device_centroids[key]

    def assign_torch(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest centroid (L2) of each row of ``features`` and the distance to it, on the features' device.

        One matmul against the centroids (``|x|^2 - 2 x.c + |c|^2``, float32): cheap enough for the masking and
        flip-test hot loops, where a faiss call per batch would force a device round trip.
        """
        c, c2 = self._centroids_on(features.device)
        x = features.float()
        d2 = torch.addmm(c2.unsqueeze(0), x, c.t(), beta=1.0, alpha=-2.0)
        d2.add_((x * x).sum(1, keepdim=True))
        best, labels = d2.min(dim=1)
        return labels.to(torch.int64), best.clamp_min_(0.0).sqrt_()

    def assign(self, features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (L2) and distance for each row (numpy in and out; chunked on the CPU)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32)) if isinstance(features, np.ndarray) \
            else features.detach()
        if x.ndim != 2 or x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"features must be N x {self.centroids.shape[1]}, got {tuple(x.shape)}")
        labels, dists = [], []
        for start in range(0, x.shape[0], ASSIGN_CHUNK):
            lab, dist = self.assign_torch(x[start:start + ASSIGN_CHUNK])
            labels.append(lab.cpu())
            dists.append(dist.cpu())
        if not labels:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return torch.cat(labels).numpy(), torch.cat(dists).numpy().astype(np.float32)

    def save(self, path: Path | str) -> None:
        """Write ``centroids``, ``labels``, ``distances`` to an ``.npz`` file atomically."""
        buf = io.BytesIO()
        np.savez(buf, centroids=self.centroids, labels=self.labels, distances=self.distances)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path | str) -> Clustering:
        """Read a clustering written by :meth:`save` (no pickles)."""
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(data["centroids"], data["labels"], data["distances"])


def choose_n_clusters(n_samples: int, requested: int, min_per_cluster: int = 50) -> int:
    """Cluster count actually used: ``min(requested, max(2, n_samples // min_per_cluster))``, never above N.

    The paper's l = 1000 assumes ImageNet-100 (~127 images per cluster); on small data sets so many clusters would
    hold a handful of images each and k-means (which wants ~40 points per centroid) degenerates, so the count is
    capped at one cluster per ``min_per_cluster`` images (at least 2).
    """
    if n_samples < 1:
        raise ValueError("no samples to cluster")
    if requested < 1:
        raise ValueError("the cluster count must be >= 1")
    return int(min(requested, max(2, n_samples // max(1, min_per_cluster)), n_samples))


def _faiss_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def fit_kmeans(features: np.ndarray, n_clusters: int, seed: int, niter: int = 20,
               use_gpu: bool | None = None, max_points_per_centroid: int = 256) -> Clustering:
    """faiss k-means (L2, not spherical, ``niter`` iterations, seeded) on ``features`` (N x D, float32 or float16,
    possibly memory-mapped).

    Like faiss, k-means trains on at most ``max_points_per_centroid`` points per centroid (a seeded sample when N is
    larger); only that sample is converted to float32, and the labels and distances of every feature come from an
    exact nearest-centroid search in chunks, so a float16 matrix is never copied whole. Uses faiss' GPU index when
    faiss sees a GPU (``use_gpu=None``).
    """
    import faiss

    if features.ndim != 2:
        raise ValueError("features must be N x D")
    n, dim = features.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"cannot make {n_clusters} clusters of {n} samples")
    cap = int(n_clusters) * int(max_points_per_centroid)
    if n > cap:
        sample = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        train = np.ascontiguousarray(features[sample], dtype=np.float32)
    else:
        train = np.ascontiguousarray(features, dtype=np.float32)
    gpu = _faiss_gpus() > 0 if use_gpu is None else bool(use_gpu)
    km = faiss.Kmeans(dim, int(n_clusters), niter=int(niter), seed=int(seed) % (2**31), spherical=False,
                      gpu=gpu, verbose=False, min_points_per_centroid=1, max_points_per_centroid=n + 1)
    km.train(train)
    del train
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    index = faiss.IndexFlatL2(dim)
    index.add(centroids)
    labels, dists = np.empty(n, np.int64), np.empty(n, np.float32)
    for start in range(0, n, ASSIGN_CHUNK):
        d2, idx = index.search(np.ascontiguousarray(features[start:start + ASSIGN_CHUNK], dtype=np.float32), 1)
        labels[start:start + len(idx)] = idx[:, 0]
        dists[start:start + len(idx)] = np.sqrt(np.maximum(d2[:, 0], 0))
    return Clustering(centroids, labels, dists)
