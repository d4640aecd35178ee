"""Clustering model: cluster-count cap, seeded faiss k-means, nearest-centroid assignment, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from poisonscan.detect.clustering import Clustering, choose_n_clusters, fit_kmeans


def blobs(n_per: int = 40, k: int = 4, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(k, dim, dtype=np.float32) * 3
    truth = np.repeat(np.arange(k), n_per)
    x = centres[truth] + rng.normal(0, 0.1, size=(k * n_per, dim)).astype(np.float32)
    return x, truth


@pytest.mark.parametrize(("n", "requested", "expected"), [
    (126_000, 1000, 1000),  # ImageNet-100 scale: the paper's l
    (9_469, 1000, 189),     # imagenette: one cluster per 50 images
    (120, 1000, 2),         # tiny: at least 2
    (1, 1000, 1),           # never more clusters than samples
    (5_000, 10, 10),        # an explicit small request is kept
])
def test_choose_n_clusters(n: int, requested: int, expected: int) -> None:
    assert choose_n_clusters(n, requested) == expected


def test_choose_n_clusters_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        choose_n_clusters(0, 10)
    with pytest.raises(ValueError):
        choose_n_clusters(10, 0)


def test_kmeans_recovers_blobs_and_is_deterministic() -> None:
    x, truth = blobs()
    a = fit_kmeans(x, 4, seed=3)
    b = fit_kmeans(x, 4, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    # each true blob is exactly one cluster
    for t in range(4):
        assert len(set(a.labels[truth == t])) == 1
    assert len(set(a.labels)) == 4
    assert a.centroids.shape == (4, 8) and a.centroids.dtype == np.float32
    assert a.labels.dtype == np.int64 and a.distances.dtype == np.float32
    own = np.linalg.norm(x - a.centroids[a.labels], axis=1)
    np.testing.assert_allclose(a.distances, own, atol=1e-4)
    np.testing.assert_array_equal(a.sizes(), np.bincount(a.labels, minlength=4))


def test_assign_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    cl = Clustering(rng.normal(size=(7, 5)).astype(np.float32), np.zeros(1, np.int64), np.zeros(1, np.float32))
    q = rng.normal(size=(50, 5)).astype(np.float32)
    d = np.linalg.norm(q[:, None] - cl.centroids[None], axis=2)
    labels, dist = cl.assign(q)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), atol=1e-4)
    t_lab, t_dist = cl.assign_torch(torch.from_numpy(q).to(torch.bfloat16))
    assert t_lab.dtype == torch.int64 and t_dist.dtype == torch.float32
    assert (t_lab.numpy() == labels).mean() > 0.9  # bf16 features are cast to float32 before the matmul
    lab2, _ = cl.assign(torch.from_numpy(q))
    np.testing.assert_array_equal(lab2, labels)
    with pytest.raises(ValueError):
        cl.assign(np.zeros((2, 4), np.float32))


def test_save_load_roundtrip(tmp_path: Path) -> None:
    x, _ = blobs(n_per=20)
    cl = fit_kmeans(x, 4, seed=0)
    path = tmp_path / "run" / "clusters.npz"
    cl.save(path)
    back = Clustering.load(path)
    np.testing.assert_array_equal(back.centroids, cl.centroids)
    np.testing.assert_array_equal(back.labels, cl.labels)
    np.testing.assert_array_equal(back.distances, cl.distances)
    assert sorted(p.name for p in path.parent.iterdir()) == ["clusters.npz"]  # no temp file left behind


def test_fit_kmeans_rejects_too_many_clusters() -> None:
    with pytest.raises(ValueError):
        fit_kmeans(np.zeros((3, 2), np.float32), 4, seed=0)


def test_kmeans_on_float16_memmap_with_a_training_sample(tmp_path: Path) -> None:
    """float16, memory-mapped features (the --feature-dtype float16 path) and more points than k-means trains on."""
    x, truth = blobs(n_per=50)
    np.save(tmp_path / "f.npy", x.astype(np.float16))
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    a = fit_kmeans(mm, 4, seed=3, max_points_per_centroid=10)      # 200 points, trains on a seeded 40
    b = fit_kmeans(mm, 4, seed=3, max_points_per_centroid=10)
    np.testing.assert_array_equal(a.labels, b.labels)
    for t in range(4):                                              # every point labelled, each blob one cluster
        assert len(set(a.labels[truth == t])) == 1
    assert len(set(a.labels)) == 4 and a.labels.shape == (200,)
    own = np.linalg.norm(x - a.centroids[a.labels], axis=1)
    np.testing.assert_allclose(a.distances, own, atol=1e-2)
