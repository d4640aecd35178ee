"""PatchSearch baseline: Grad-CAM of the cluster head, candidate boxes, batching, CNN and ViT layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.detect.detect_toys import TRIGGER_SIDE, iou, toy_encoder, trigger_batch, one_torch_thread  # noqa: F401

from poisonscan.detect.clustering import Clustering, fit_kmeans
from poisonscan.detect.features import extract_features
from poisonscan.detect.gradcam import gradcam_candidates, gradcam_maps, minmax_scale
from poisonscan.models import create_encoder
from poisonscan.runtime import setup_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runtime():
    return setup_runtime("cpu", precision="fp32")


def _random_clustering(encoder, runtime, images: torch.Tensor, k: int = 3) -> Clustering:
    feats = extract_features(encoder, images, runtime, batch_size=16, quiet=True)
    return fit_kmeans(feats, k, seed=0)


def _random_centroids(k: int, dim: int) -> Clustering:
    return Clustering(np.random.default_rng(0).normal(size=(k, dim)).astype(np.float32), np.zeros(1, np.int64),
                      np.zeros(1, np.float32))


def test_minmax_scale_handles_constant_maps():
    maps = torch.stack([torch.arange(16.0).view(4, 4), torch.full((4, 4), 3.0)])
    out = minmax_scale(maps)
    assert out[0].min() == 0 and out[0].max() == 1 and out[1].eq(0).all()


def test_gradcam_boxes_find_the_trigger_on_the_toy_model(runtime):
    enc = toy_encoder(32)
    poisoned, corners = trigger_batch(12, seed=3, poisoned=True)
    clean, _ = trigger_batch(24, seed=4, poisoned=False)
    clustering = _random_clustering(enc, runtime, torch.cat([poisoned, clean]), k=4)
    att, boxes, eta = gradcam_candidates(enc, clustering, poisoned, 9, runtime, batch_size=5)
    assert att.shape == (12, 32, 32) and att.dtype == torch.float32
    assert boxes.shape == (12, 4) and boxes.dtype == torch.int64 and eta.shape == (12,)
    assert float(att.min()) >= 0 and float(att.max()) <= 1
    assert (boxes[:, 2:] == 9).all() and (boxes[:, :2] >= 0).all() and (boxes[:, :2] + 9 <= 32).all()
    trigger_cluster = int(np.bincount(clustering.labels[:12]).argmax())
    assert (eta == trigger_cluster).all()                  # target = the argmax cluster: the trigger's
    overlaps = [iou(b, int(x), int(y)) for b, (x, y) in zip(boxes, corners)]
    assert min(overlaps) > 0.3                              # every window holds most of the 6 x 6 trigger
    hot = [att[i, y:y + TRIGGER_SIDE, x:x + TRIGGER_SIDE].mean() for i, (x, y) in enumerate(corners.tolist())]
    assert float(torch.stack(hot).mean()) > 3 * float(att.mean())


def test_batched_gradients_equal_single_images_and_leave_no_state(runtime):
    torch.manual_seed(0)
    enc = create_encoder("resnet18", 96)                     # last stage: a 3 x 3 grid
    images, _ = trigger_batch(6, size=96, seed=5, poisoned=False)
    clustering = _random_centroids(3, enc.feature_dim)     # a centroid equal to a feature has zero gradient
    layer = enc.gradcam_layer()
    hooks_before, was_training = len(layer._forward_hooks), enc.training
    att_b, eta_b = gradcam_maps(enc, clustering, images, runtime, batch_size=6)
    att_1, eta_1 = gradcam_maps(enc, clustering, images, runtime, batch_size=1)
    assert torch.equal(eta_b, eta_1)
    assert torch.allclose(att_b, att_1, atol=1e-4)
    assert len(layer._forward_hooks) == hooks_before
    assert all(p.grad is None for p in enc.parameters())
    assert enc.training == was_training                    # the caller's mode is restored


def test_vit_tokens_become_a_patch_grid(runtime):
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny_patch16_224", 32)
    images, _ = trigger_batch(4, seed=6, poisoned=False)
    clustering = _random_centroids(3, enc.feature_dim)
    att, boxes, eta = gradcam_candidates(enc, clustering, images, 8, runtime, batch_size=2)
    assert att.shape == (4, 32, 32) and torch.isfinite(att).all()
    assert boxes.shape == (4, 4) and (boxes[:, 2:] == 8).all()
    assert set(eta.tolist()) <= {0, 1, 2}


def test_empty_input(runtime):
    enc = toy_encoder(32)
    clustering = Clustering(np.eye(2, 5, dtype=np.float32), np.zeros(2, np.int64), np.zeros(2, np.float32))
    att, boxes, eta = gradcam_candidates(enc, clustering, torch.zeros(0, 3, 32, 32, dtype=torch.uint8), 9, runtime)
    assert att.shape == (0, 32, 32) and boxes.shape == (0, 4) and eta.shape == (0,)


def test_a_1x1_map_is_warned_about_once_per_image_size(runtime, caplog, monkeypatch):
    import poisonscan.detect.gradcam as gc
    monkeypatch.setattr(gc, "_WARNED_NO_LOCATION", set())
    enc = create_encoder("resnet18", image_size=32)          # stride 32: a 1 x 1 last-stage map at 32 px
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    clustering = _random_centroids(2, enc.feature_dim)
    with caplog.at_level("WARNING", logger=gc.log.name):
        for _ in range(3):                                    # three search rounds
            gradcam_maps(enc, clustering, images, runtime, batch_size=2)
    assert sum("carries no location" in r.getMessage() for r in caplog.records) == 1
