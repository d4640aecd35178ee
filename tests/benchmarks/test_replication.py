"""The replication study's fresh flip set."""

from __future__ import annotations

import numpy as np

from benchmarks.studies.replication import fresh_flip_set
from poisonscan.detect.clustering import Clustering


def test_the_fresh_flip_set_takes_the_next_nearest_images_of_every_cluster() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    dist = np.array([0.5, 0.1, 0.3, 2.0, 1.0, 1.0, 0.2], np.float32)
    cl = Clustering(np.zeros((3, 2), np.float32), labels, dist)
    assert fresh_flip_set(cl, np.array([1, 4, 6]), 1).tolist() == [2, 5]
    assert fresh_flip_set(cl, np.array([1, 2, 4, 5, 6]), 2).tolist() == [0, 3]
    assert fresh_flip_set(cl, np.array([], np.int64), 1).tolist() == [1, 4, 6]
