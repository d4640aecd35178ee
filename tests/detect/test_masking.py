"""Cluster Activation Masking: cyclic masks, eq. 2-3 on hand-made tensors, best window, and a toy threat model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poisonscan.detect.clustering import Clustering
from poisonscan.detect.masking import (EVERY_POSITION, CoarseToFine, MaskingConfig, attention_map, attention_maps,
                                       best_window, cluster_activation_masking, cut_windows, detect_candidates,
                                       kept_tokens, make_masks, token_window, window_pixels, coarse_to_fine_masking,
                                       grid_corners, window_masks)
from poisonscan.runtime import Runtime

S = 32
TRIGGER = (20, 5, 6)  # x, y, side of the region the toy model reacts to


class RegionEncoder(nn.Module):
    """Toy threat model: feature = (mean of channel 0 over the trigger region, 0.5) in [0, 1] input space.

    A bright region puts the image in the trigger cluster; zeroing (most of) the region moves it to the clean one.
    """

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tx, ty, side = TRIGGER
        a = x[:, 0, ty:ty + side, tx:tx + side].mean((1, 2))
        return torch.stack([a, torch.full_like(a, 0.5)], dim=1)


def toy_clustering() -> Clustering:
    """Trigger centre at 16.7 degrees, clean centre at 106.7: the cluster flips when about 3/4 of the region is
    hidden (a < 0.27), and a flipped copy is farther from its centre than an untouched poisoned image is."""
    trigger = np.array([1.0, 0.3]) / np.linalg.norm([1.0, 0.3])
    clean = np.array([-0.3, 1.0]) / np.linalg.norm([-0.3, 1.0])
    return Clustering(np.stack([trigger, clean]).astype(np.float32), np.zeros(1, np.int64), np.zeros(1, np.float32))


def poisoned_image() -> torch.Tensor:
    img = torch.full((1, 3, S, S), 90, dtype=torch.uint8)
    tx, ty, side = TRIGGER
    img[:, :, ty:ty + side, tx:tx + side] = 255
    return img


def fp32() -> Runtime:
    return Runtime(torch.device("cpu"), None)


def iou(a: torch.Tensor, b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = (int(v) for v in a)
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


@pytest.mark.parametrize(("window", "size", "expected"), [(None, 64, 17), (None, 224, 60), (None, 96, 26),
                                                            (0.25, 64, 16), (20, 64, 20), (500, 64, 64),
                                                            (0.001, 64, 1)])
def test_window_pixels(window: float | None, size: int, expected: int) -> None:
    assert window_pixels(window, size) == expected


def test_masking_config_validates() -> None:
    with pytest.raises(ValueError):
        MaskingConfig(strategy="checker")
    assert MaskingConfig(window=17).block_size == 2


def test_full_masks_wrap_and_cover_every_pixel() -> None:
    cfg = MaskingConfig(n_masks=64, window=9)
    masks = make_masks(cfg, S, torch.Generator().manual_seed(0))
    assert masks.shape == (64, S, S) and masks.dtype == torch.bool
    assert (masks.sum((1, 2)) == 81).all()  # wrapping never loses a pixel of the window
    for m in masks:  # rows and columns of every mask form one cyclic interval of length w
        for axis in (1, 0):
            idx = m.any(dim=axis).nonzero().flatten().tolist()
            assert len(idx) == 9
            assert sum(((i + 1) % S) not in idx for i in idx) == 1
    assert any(m[0].any() and m[-1].any() for m in masks)  # some window wraps around the bottom edge
    cover = masks.sum(0)
    assert cover.min() > 0
    expected = 64 * 81 / S**2
    assert cover.float().mean().item() == pytest.approx(expected)
    assert cover.max() <= 2.5 * expected and cover.min() >= expected / 3  # evenly spread, borders included


def test_masks_are_reproducible() -> None:
    cfg = MaskingConfig(n_masks=16, window=7, strategy="random", block=2)
    a = make_masks(cfg, S, torch.Generator().manual_seed(5))
    b = make_masks(cfg, S, torch.Generator().manual_seed(5))
    c = make_masks(cfg, S, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _window_of(mask: torch.Tensor, window: int) -> torch.Tensor:
    """The w x w content of a cyclic mask, rolled so that its window starts at (0, 0)."""
    size = mask.shape[0]
    for y in range(size):
        for x in range(size):
            rolled = torch.roll(mask, shifts=(-y, -x), dims=(0, 1))
            if not rolled[window:].any() and not rolled[:, window:].any() and rolled[0].any() and rolled[:, 0].any():
                return rolled[:window, :window]
    raise AssertionError("no window found")


def test_interval_masks_are_checkerboards_of_blocks() -> None:
    cfg = MaskingConfig(n_masks=4, window=12, strategy="interval", block=3)
    masks = make_masks(cfg, S, torch.Generator().manual_seed(0))
    assert (masks.sum((1, 2)) == 72).all()
    win = _window_of(masks[0], 12)
    blocks = win[::3, ::3]
    assert torch.equal(win, blocks.repeat_interleave(3, 0).repeat_interleave(3, 1))
    assert (blocks[1:] != blocks[:-1]).all() and (blocks[:, 1:] != blocks[:, :-1]).all()


def test_random_masks_cover_half_the_blocks() -> None:
    cfg = MaskingConfig(n_masks=32, window=12, strategy="random", block=3)
    masks = make_masks(cfg, S, torch.Generator().manual_seed(1))
    assert (masks.sum((1, 2)) == 8 * 9).all()  # 8 of 16 blocks of 3 x 3
    assert len({tuple(m.flatten().nonzero().flatten().tolist()) for m in masks}) > 1


def test_attention_map_by_hand() -> None:
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = masks[2, 0, 1] = True  # pixel (1, *) never masked
    labels = torch.tensor([4, 4, 7])
    dist = torch.tensor([1.0, 2.0, 3.0])
    # eta* = 4; d^n = [0, 0.5, 1]; a = [0, 0.5, 1 (other cluster)]
    att = attention_map(masks, labels, dist)
    expected = torch.tensor([[(0 + 0.5) / 2, (0.5 + 1) / 2], [0.0, 0.0]])
    torch.testing.assert_close(att, expected)
    # forcing eta* = 7 flips the roles: a = [1, 1, d^n = 1]
    torch.testing.assert_close(attention_map(masks, labels, dist, eta_star=7),
                               torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_attention_all_equal_distances_no_division_by_zero() -> None:
    masks = torch.ones(4, 3, 3, dtype=torch.bool)
    att = attention_map(masks, torch.zeros(4, dtype=torch.long), torch.full((4,), 0.7))
    assert torch.isfinite(att).all() and (att == 0).all()
    batched = attention_maps(masks, torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 0.7))
    assert batched.shape == (2, 3, 3) and (batched == 0).all()


def test_best_window_finds_peak_and_stays_inside() -> None:
    att = torch.zeros(3, S, S)
    att[0, 10:14, 3:7] = 1.0            # well inside
    att[1, S - 2:, S - 2:] = 1.0         # bottom-right corner: the window must still fit
    att[2, 0, 0] = 5.0                   # top-left
    boxes = best_window(att, 8)
    assert boxes.shape == (3, 4) and boxes.dtype == torch.int64
    assert (boxes[:, 2:] == 8).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + 8 <= S).all() and (boxes[:, 1] + 8 <= S).all()
    x, y = int(boxes[0, 0]), int(boxes[0, 1])
    assert x <= 3 and x + 8 >= 7 and y <= 10 and y + 8 >= 14
    assert boxes[1].tolist() == [S - 8, S - 8, 8, 8]
    assert boxes[2].tolist() == [0, 0, 8, 8]
    assert best_window(att[0], 8).tolist() == boxes[0].tolist()
    assert best_window(att[:1], 100)[0].tolist() == [0, 0, S, S]


def test_cut_windows() -> None:
    imgs = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    boxes = torch.tensor([[1, 2, 3, 3], [0, 0, 3, 3]])
    out = cut_windows(imgs, boxes)
    assert torch.equal(out[0], imgs[0, :, 2:5, 1:4]) and torch.equal(out[1], imgs[1, :, :3, :3])


@pytest.mark.parametrize("scale_over", ["all", "majority"])
def test_masking_localises_the_toy_trigger(scale_over: str) -> None:
    window = 8
    cfg = MaskingConfig(n_masks=128, window=window)
    masks = make_masks(cfg, S, torch.Generator().manual_seed(0))
    clean = torch.full((1, 3, S, S), 20, dtype=torch.uint8)
    imgs = torch.cat([poisoned_image(), clean])
    att, boxes, eta = cluster_activation_masking(RegionEncoder(), toy_clustering(), imgs, masks, fp32(),
                                                 batch_size=50, scale_over=scale_over)  # batches straddle images
    assert att.shape == (2, S, S) and att.dtype == torch.float32
    assert eta.tolist() == [0, 1]  # the poisoned image lives in the trigger cluster, the clean one does not
    tx, ty, side = TRIGGER
    peak = divmod(int(att[0].argmax()), S)
    assert ty <= peak[0] < ty + side and tx <= peak[1] < tx + side
    inside = att[0, ty:ty + side, tx:tx + side].mean()
    outside = att[0].clone()
    outside[ty:ty + side, tx:tx + side] = float("nan")
    assert inside > 3 * outside.nanmean()
    assert iou(boxes[0], (tx, ty, side, side)) >= 0.5
    assert (boxes[:, 2:] == window).all()
    # batch size does not change the result
    att2, boxes2, _ = cluster_activation_masking(RegionEncoder(), toy_clustering(), imgs, masks, fp32(),
                                                 batch_size=256, window=window, scale_over=scale_over)
    torch.testing.assert_close(att, att2)
    assert torch.equal(boxes, boxes2)


def test_masking_flip_region_exactly() -> None:
    """Masks that hide the whole trigger flip the cluster (a = 1), masks far from it keep it with d^n = 0."""
    tx, ty, side = TRIGGER
    masks = torch.zeros(3, S, S, dtype=torch.bool)
    masks[0, ty - 1:ty + side + 1, tx - 1:tx + side + 1] = True  # covers the trigger
    masks[1, 0:8, 0:8] = True                                      # far away
    masks[2, 24:32, 0:8] = True                                    # far away
    att, boxes, eta = cluster_activation_masking(RegionEncoder(), toy_clustering(), poisoned_image(), masks,
                                                 fp32(), window=side + 2)
    assert eta.tolist() == [0]
    assert torch.equal(att[0], masks[0].float())
    assert boxes[0].tolist() == [tx - 1, ty - 1, side + 2, side + 2]


def test_masking_empty_and_mismatch() -> None:
    masks = make_masks(MaskingConfig(n_masks=4, window=5), S, torch.Generator().manual_seed(0))
    att, boxes, eta = cluster_activation_masking(RegionEncoder(), toy_clustering(),
                                                 torch.zeros(0, 3, S, S, dtype=torch.uint8), masks, fp32())
    assert att.shape == (0, S, S) and boxes.shape == (0, 4) and eta.shape == (0,)
    with pytest.raises(ValueError):
        cluster_activation_masking(RegionEncoder(), toy_clustering(), poisoned_image(), masks[:, :16, :16], fp32())


def test_box_filter_equals_brute_force_sum() -> None:
    g = torch.Generator().manual_seed(3)
    att = torch.rand(2, 12, 12, generator=g)
    boxes = best_window(att, 5)
    for a, box in zip(att, boxes):
        sums = F.avg_pool2d(a[None, None].double(), 5, stride=1)[0, 0] * 25
        brute = max((float(sums[y, x]), -y, -x) for y in range(8) for x in range(8))
        assert (int(box[1]), int(box[0])) == (-brute[1], -brute[2])


def test_scale_over_majority_ignores_flipped_distances() -> None:
    masks = torch.eye(4, dtype=torch.bool).view(4, 2, 2)  # mask j hides pixel j only
    labels = torch.tensor([3, 3, 3, 9])
    dist = torch.tensor([0.2, 0.4, 0.6, 0.0])  # the flipped copy sits right on its new centre
    paper = attention_map(masks, labels, dist).flatten()
    torch.testing.assert_close(paper, torch.tensor([1 / 3, 2 / 3, 1.0, 1.0]))  # min over all masks is the flip
    majority = attention_map(masks, labels, dist, scale_over="majority").flatten()
    torch.testing.assert_close(majority, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError):
        attention_map(masks, labels, dist, scale_over="median")


def test_detect_candidates_uses_config() -> None:
    cfg = MaskingConfig(n_masks=64, window=8, batch_size=40)
    att, boxes, eta = detect_candidates(RegionEncoder(), toy_clustering(), poisoned_image(), cfg, fp32(),
                                        torch.Generator().manual_seed(0))
    masks = make_masks(cfg, S, torch.Generator().manual_seed(0))
    att2, boxes2, _ = cluster_activation_masking(RegionEncoder(), toy_clustering(), poisoned_image(), masks, fp32())
    torch.testing.assert_close(att, att2)
    assert torch.equal(boxes, boxes2) and (boxes[:, 2:] == 8).all()


# -- coarse-to-fine masking ----------------------------------------------------------------------------------------

def test_grid_corners_and_window_masks_cover_every_pixel() -> None:
    corners = grid_corners(S, stride=4, offset=torch.tensor([0.5, 0.25]))
    assert corners.shape == (64, 2) and len({tuple(c) for c in corners.tolist()}) == 64
    masks = window_masks(corners, 8, S)
    assert masks.shape == (64, S, S) and (masks.sum((1, 2)) == 64).all()         # whole 8 x 8 windows, wrapped
    assert (masks.sum(0) >= 1).all()                                             # stride <= window: no gaps
    one = window_masks(torch.tensor([[30, 0]]), 4, S)[0]                         # cyclic: wraps at the border
    assert one[0:4, 30:32].all() and one[0:4, 0:2].all() and int(one.sum()) == 16


def test_coarse_to_fine_localises_the_toy_trigger_with_fewer_masks() -> None:
    window = 8
    clean = torch.full((1, 3, S, S), 20, dtype=torch.uint8)
    imgs = torch.cat([poisoned_image(), clean])
    plan = CoarseToFine()
    att, boxes, eta = coarse_to_fine_masking(RegionEncoder(), toy_clustering(), imgs, window, fp32(),
                                             torch.Generator().manual_seed(0), batch_size=30, plan=plan)
    assert plan.masks_per_image(window, S) == 64 + 9 < 128
    assert att.shape == (2, S, S) and eta.tolist() == [0, 1]
    tx, ty, side = TRIGGER
    x, y = int(boxes[0, 0]), int(boxes[0, 1])                                    # the window covers most of it
    covered = max(0, min(x + window, tx + side) - max(x, tx)) * max(0, min(y + window, ty + side) - max(y, ty))
    assert covered >= 0.75 * side * side and (boxes[:, 2:] == window).all()
    att2, boxes2, _ = coarse_to_fine_masking(RegionEncoder(), toy_clustering(), imgs, window, fp32(),
                                             torch.Generator().manual_seed(0), batch_size=256, plan=plan)
    torch.testing.assert_close(att, att2)                                        # batches do not change it
    assert torch.equal(boxes, boxes2)


# -- masking a ViT by dropping tokens --------------------------------------------------------------------------------

PATCH = 4
TRIGGER_TOKENS = (13, 14, 21, 22)      # the 2 x 2 tokens (rows 1-2, columns 5-6 of the 8 x 8 grid) TRIGGER touches


class TokenRegionEncoder(nn.Module):
    """Toy ViT: feature = (mean over the trigger's four tokens of channel 0, counting dropped ones as 0, 0.5)."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    patch_size, drops_tokens = PATCH, True

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        keep = torch.arange((S // PATCH) ** 2).expand(x.shape[0], -1) if keep is None else keep
        tokens = F.avg_pool2d(x[:, :1], PATCH).flatten(1)                       # N x 64
        seen = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, keep, True)
        trig = torch.zeros(tokens.shape[1], dtype=torch.bool)
        trig[list(TRIGGER_TOKENS)] = True
        a = (tokens * (seen & trig)).sum(1) / len(TRIGGER_TOKENS)
        return torch.stack([a, torch.full_like(a, 0.5)], dim=1)


def test_kept_tokens_lists_the_visible_tokens_row_major() -> None:
    masks = window_masks(torch.tensor([[1, 0], [7, 7]]), 2, 8)                   # the second wraps at both edges
    kept = kept_tokens(masks)
    assert kept.shape == (2, 60) and kept[0].tolist() == [t for t in range(64) if t not in (1, 2, 9, 10)]
    assert set(range(64)) - set(kept[1].tolist()) == {0, 7, 56, 63}
    ragged = torch.zeros(2, 8, 8, dtype=torch.bool)
    ragged[0, 0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        kept_tokens(ragged)
    assert token_window(9, 4, 8) == 2 and token_window(1, 4, 8) == 1 and token_window(60, 4, 8) == 8


@pytest.mark.parametrize("plan", [EVERY_POSITION, CoarseToFine()])
def test_dropping_tokens_finds_the_trigger_tokens(plan: CoarseToFine) -> None:
    clean = torch.full((1, 3, S, S), 20, dtype=torch.uint8)
    imgs = torch.cat([poisoned_image(), clean])
    att, boxes, eta = coarse_to_fine_masking(TokenRegionEncoder(), toy_clustering(), imgs, 8, fp32(),
                                             torch.Generator().manual_seed(0), batch_size=50, plan=plan, patch=PATCH)
    assert plan.masks_per_image(2, S // PATCH) == 64                             # stride 1 token: every position
    assert att.shape == (2, S, S) and eta.tolist() == [0, 1]
    assert boxes[0].tolist() == [20, 4, 8, 8]                                     # the one 2 x 2 window over all four
    blocks = att.view(2, 8, PATCH, 8, PATCH)                                     # one value per token
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))


def test_shared_token_masks_give_pixels_back() -> None:
    masks = window_masks(grid_corners(8, 1), 2, 8)                              # all 64 token windows
    att, boxes, eta = cluster_activation_masking(TokenRegionEncoder(), toy_clustering(), poisoned_image(), masks,
                                                 fp32(), batch_size=20, window=2, patch=PATCH)
    assert att.shape == (1, S, S) and boxes[0].tolist() == [20, 4, 8, 8] and eta.tolist() == [0]
    with pytest.raises(ValueError, match="with patch 4"):
        cluster_activation_masking(TokenRegionEncoder(), toy_clustering(), poisoned_image(),
                                   torch.ones(1, S, S, dtype=torch.bool), fp32(), window=2, patch=PATCH)
