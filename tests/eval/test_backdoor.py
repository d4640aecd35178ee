"""Backdoor strength on a toy encoder (mean colour) whose answer is known, plus k-NN and trigger pasting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poisonscan.data.store import ImageStore
from poisonscan.errors import DataError
from poisonscan.eval.backdoor import backdoor_strength, flip_test_rows, knn_predict
from poisonscan.attacks.blend import blend_trigger
from poisonscan.attacks.ctrl import ctrl_trigger
from poisonscan.eval.patching import apply_trigger_batch, paste_trigger_batch
from poisonscan.runtime import Runtime

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
RUNTIME = Runtime(torch.device("cpu"), None)


class MeanColour(nn.Module):
    """Features = mean colour in [0, 1]: solid red, green and blue images are orthogonal."""

    image_size, feature_dim, mean, std = 16, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + 1e-3


def _store(labels: list[int], seed: int) -> ImageStore:
    g = torch.Generator().manual_seed(seed)
    imgs = COLOURS[torch.tensor(labels)][:, :, None, None].expand(-1, -1, 16, 16).clone()
    noise = torch.randint(0, 30, imgs.shape, generator=g, dtype=torch.uint8)
    imgs = torch.where(imgs > 0, imgs - noise, imgs + noise)
    ids = [f"{seed}_{i}" for i in range(len(labels))]
    return ImageStore(imgs, ids, list(labels), [], 16, list(range(len(labels))), ["red", "green", "blue"])


def _blue_trigger() -> torch.Tensor:
    return COLOURS[2][:, None, None].expand(3, 8, 8).clone()


def test_paste_trigger_batch_positions() -> None:
    imgs = torch.zeros(20, 3, 100, 100, dtype=torch.uint8)
    out, boxes = paste_trigger_batch(imgs, _blue_trigger(), size=0.2, margin=0.1, seed=3)
    assert (boxes[:, 2:] == 20).all()
    assert (boxes[:, :2] >= 10).all() and (boxes[:, :2] <= 70).all()
    x, y = boxes[0, :2]
    assert out[0, 2, y:y + 20, x:x + 20].eq(255).all() and out[0].sum() == 255 * 400
    assert imgs.sum() == 0  # input untouched
    again, boxes2 = paste_trigger_batch(imgs, _blue_trigger(), size=0.2, margin=0.1, seed=3)
    assert np.array_equal(boxes, boxes2) and torch.equal(out, again)


def test_apply_trigger_batch_blend_and_ctrl_match_the_poison_attacks() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    trigger = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
    hwc = imgs.permute(0, 2, 3, 1).numpy()
    blended = apply_trigger_batch(imgs, trigger, attack="blend", blend_alpha=0.2)
    for i in range(4):                          # what `poison --attack blend` writes, at this resolution
        want = blend_trigger(hwc[i], trigger.permute(1, 2, 0).numpy(), 0.2)
        assert np.array_equal(blended[i].permute(1, 2, 0).numpy(), want)
    ctrl = apply_trigger_batch(imgs, None, attack="ctrl", ctrl_magnitude=100.0)
    assert np.array_equal(ctrl.permute(0, 2, 3, 1).numpy(), ctrl_trigger(hwc, 100.0, block=None))
    assert torch.equal(apply_trigger_batch(imgs, trigger, size=0.25, seed=1),
                       paste_trigger_batch(imgs, trigger, size=0.25, seed=1)[0])
    with pytest.raises(ValueError, match="choose one of"):
        apply_trigger_batch(imgs, trigger, attack="wanet")


def test_backdoor_strength_of_a_blend_backdoor() -> None:
    """A blended white trigger (alpha 0.5) on the blue class: blended red/green images then sit nearer the poisons."""
    white = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    val = _store([0, 1, 2] * 10, seed=1)
    train = _store([0, 1, 2] * 50, seed=2)
    poisoned_rows = np.arange(2, 32, 3)
    attack = {"attack": "blend", "blend_alpha": 0.5}
    train.images[poisoned_rows] = apply_trigger_batch(train.images[poisoned_rows], white, **attack)
    mask = np.zeros(150, dtype=bool)
    mask[poisoned_rows] = True
    out = backdoor_strength(MeanColour(), train, val, white, 2, RUNTIME, mask, probe_epochs=20, probe_fraction=0.1,
                            attack=attack)
    assert out["knn"]["accuracy"] == 1.0 and out["knn"]["asr"] == 1.0
    patched = backdoor_strength(MeanColour(), train, val, white, 2, RUNTIME, mask, trigger_size=0.1,
                                probe_epochs=20, probe_fraction=0.1)
    assert patched["knn"]["asr"] == 0.0          # a small pasted patch is not this backdoor's trigger


def test_knn_predict_by_hand() -> None:
    bank = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
    labels = np.array([0, 0, 1, 2])
    q = np.array([[1, 0.1, 0], [0, 0.2, 1]], dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert knn_predict(bank, labels, q, 3, k=2).tolist() == [0, 2]
    # leave-one-out: bank row 0 cannot vote for query 0, so row 1 (class 0) and the next best decide
    assert knn_predict(bank, labels, bank, 3, k=1, exclude_self=True).tolist() == [0, 0, 0, 0]


def test_flip_test_rows() -> None:
    labels = np.array([0, 1, 0, 1, 2])
    dist = np.array([0.5, 0.2, 0.1, 0.3, 0.9])
    assert flip_test_rows(labels, dist, 3).tolist() == [2, 1, 4]


def test_backdoor_strength_known_answer() -> None:
    white = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    val = _store([0, 1, 2] * 10, seed=1)
    train = _store([0, 1, 2] * 50, seed=2)
    # Saha et al.: 10 images of the target class (blue) carry a big white trigger; a red or green image with the
    # trigger is then closer to those poisons (labelled blue) than to its own class
    poisoned_rows = np.arange(2, 32, 3)
    patched, _ = paste_trigger_batch(train.images[poisoned_rows], white, size=0.75, margin=0.1, seed=0)
    train.images[poisoned_rows] = patched
    mask = np.zeros(150, dtype=bool)
    mask[poisoned_rows] = True
    out = backdoor_strength(MeanColour(), train, val, white, 2, RUNTIME, mask, trigger_size=0.75,
                            margin=0.1, probe_epochs=20, probe_fraction=0.1)
    knn = out["knn"]
    assert knn["bank"] == "train" and knn["accuracy"] == 1.0 and knn["non_target"] == 20
    assert knn["target_rate_clean"] == 0.0 and knn["asr"] == 1.0
    assert out["probe"]["accuracy"] == 1.0 and out["probe"]["n_train"] == 15
    assert 0.0 <= out["probe"]["asr"] <= 1.0
    cl = out["clusters"]
    assert cl["n_clusters"] == 3 and cl["n_poisons"] == 10
    assert 0 < cl["purity"] <= 1 and cl["poison_share"] == 1.0  # 3 clusters hold every image
    sizes = {c["cluster"]: c["size"] for c in cl["top"]}
    assert sum(c["poisons"] for c in cl["top"]) == 10 and sum(sizes.values()) <= 150
    assert out["flips"]["flip_set"] == 3 and 0 <= out["flips"]["changed"] <= 3
    assert out["target_name"] == "blue" and out["warnings"] == []


def test_backdoor_strength_warns_when_the_bank_lacks_the_target_class() -> None:
    # a set cleaned of a fully poisoned class keeps no image of it: the k-NN vote cannot name it, ASR 0 says nothing
    val = _store([0, 1, 2] * 10, seed=1)
    train = _store([0, 1] * 20 + [2] * 3, seed=2)
    out = backdoor_strength(MeanColour(), train, val, _blue_trigger(), 2, RUNTIME, k=5, trigger_size=0.75,
                            probe_epochs=5, probe_fraction=0.5)
    assert out["warnings"] == ["the k-NN bank holds 3 image(s) of the target class (fewer than k = 5), so the k-NN "
                               "ASR is near 0 by construction; give a labelled --train that has the class (e.g. the "
                               "original data) to measure the backdoor"]
    assert out["knn"]["bank_target_count"] == 3
    enough = backdoor_strength(MeanColour(), train, val, _blue_trigger(), 2, RUNTIME, k=3, trigger_size=0.75,
                               probe_epochs=5, probe_fraction=0.5)
    assert enough["warnings"] == []


def test_backdoor_strength_val_only() -> None:
    val = _store([0, 1, 2] * 6, seed=4)
    out = backdoor_strength(MeanColour(), None, val, _blue_trigger(), 0, RUNTIME, k=3, trigger_size=0.75)
    assert out["knn"]["bank"] == "val (leave-one-out)" and out["knn"]["accuracy"] == 1.0
    assert out["knn"]["asr"] == 0.0  # a blue trigger does not make images red
    assert out["probe"] is None and out["clusters"] is None and out["flips"] is None
    unlabelled = ImageStore(val.images, val.ids, [None] * len(val), [], 16, list(range(len(val))))
    with pytest.raises(DataError):
        backdoor_strength(MeanColour(), None, unlabelled, _blue_trigger(), 0, RUNTIME)
