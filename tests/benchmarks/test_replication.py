"""The replication study's fresh flip set."""

from __future__ import annotations

import numpy as np

from benchmarks.studies.replication import fresh_flip_set
from poisonscan.detect.clustering import Clustering


def test_the_fresh_flip_set_takes_the_next_nearest_images_of_every_cluster() -> None:
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    feats = np.array([[0.5, 0], [0.1, 0], [0.3, 0], [10, 2], [10, 1], [10, 1], [0, 9]], np.float32)
    cl = Clustering(centroids, np.array([0, 0, 0, 1, 1, 1, 2]), np.zeros(7, np.float32))
    assert fresh_flip_set(cl, feats, np.array([1, 4, 6])).tolist() == [2, 5]           # the next nearest
    assert fresh_flip_set(cl, feats, np.array([1, 2, 4, 5, 6])).tolist() == [0, 3]     # two per cluster
