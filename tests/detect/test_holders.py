"""The held-picture test: a trigger's picture is held by many images, set apart by a gap; clean pictures are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonscan import runtime as rt
from poisonscan.detect.holders import (held_picture_test, largest_gap, tail_gap, tail_probability,
                                      window_matches)
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.matching import best_match

SIZE, W, T = 32, 9, 8


@pytest.fixture(scope="module")
def runtime():
    return rt.setup_runtime("cpu", "fp32")


def _natural(rng: np.random.Generator, n: int, size: int = SIZE) -> torch.Tensor:
    coarse = torch.as_tensor(rng.random((n, 3, 5, 5)), dtype=torch.float32)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = smooth + 0.04 * torch.as_tensor(rng.normal(size=(n, 3, size, size)), dtype=torch.float32)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def _data(rng: np.random.Generator, n: int, poisons: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """``n`` images, the first ``poisons`` with an 8-px trigger pasted anywhere; the trigger and where it went."""
    images = _natural(rng, n)
    trigger = torch.as_tensor(rng.integers(0, 256, (3, T, T)), dtype=torch.uint8)
    where = []
    for i in range(poisons):
        x, y = (int(v) for v in rng.integers(1, SIZE - T, 2))    # a pixel from the edges
        images[i, :, y:y + T, x:x + T] = trigger
        where.append((x, y))
    return images, trigger, where


def _boxes(rng: np.random.Generator, n: int) -> torch.Tensor:
    xy = torch.as_tensor(rng.integers(0, SIZE - W + 1, (n, 2)))
    return torch.cat([xy, torch.full_like(xy, W)], dim=1)           # x, y, w, h


def _test(images: torch.Tensor, top: list[int], top_boxes: torch.Tensor, runtime, seed: int = 0):
    rng = np.random.default_rng(seed + 1)
    ref = [int(i) for i in rng.choice(len(images), 128, replace=False)]
    windows = torch.cat([cut_windows(images[torch.as_tensor(top)], top_boxes),
                         cut_windows(images[torch.as_tensor(ref)], _boxes(rng, len(ref)))])
    matches = window_matches(images, windows, runtime, batch_size=64).numpy()
    return held_picture_test(matches, top, ref)


def test_the_largest_gap_sets_the_holders_apart_and_leaves_the_own_image_out():
    rng = np.random.default_rng(0)
    m = np.concatenate([0.95 + 0.02 * rng.random(30), 0.3 + 0.2 * rng.random(970)])
    m[500] = 1.0                                             # the window's own image
    holders, gap, low, high = largest_gap(m, own=500)
    assert holders == 30 and gap == pytest.approx(low - high) and low >= 0.95 and high <= 0.5
    copies = np.concatenate([[0.99, 0.99, 0.98], 0.3 + 0.2 * rng.random(997)])   # a near-copy of its own image
    assert largest_gap(copies)[1] < 0.1 < largest_gap(copies, min_holders=2)[1]    # under MIN_HOLDERS: no gap
    assert largest_gap(m, own=500, max_share=0.02)[0] <= 20                    # at most a share of the images
    assert largest_gap(np.zeros(100)) == (0, 0.0, 1.0, 1.0)                      # a flat window holds nothing
    assert largest_gap(np.ones(3))[0] == 0                                      # too few images to tell


def test_window_matches_gives_each_templates_best_match_and_best_match_is_their_maximum(runtime, monkeypatch):
    rng = np.random.default_rng(1)
    images, trigger, _ = _data(rng, 50, 10)
    templates = torch.cat([trigger[None], _natural(rng, 2, T)])
    m = window_matches(images, templates, runtime, batch_size=16)
    assert m.shape == (50, 3) and m.dtype == torch.float32
    assert (m[:10, 0] > 0.999).all() and (m[10:, 0] < 0.9).all()
    assert np.allclose(best_match(images, templates, runtime), m.amax(dim=1).numpy())

    def two_ranks(runtime_, n, work):                        # the shares two ranks would take, gathered
        return [work(rt.shard_indices(n, r, 2)) for r in range(2)]

    monkeypatch.setattr(rt, "split_gather", two_ranks)
    assert torch.equal(window_matches(images, templates, runtime, split=True, batch_size=16), m)
    assert window_matches(images, templates[:0], runtime).shape == (50, 0)


def test_a_trigger_on_a_few_top_windows_is_held_by_its_poisons_and_clean_windows_are_not(runtime):
    rng = np.random.default_rng(2)
    images, _, where = _data(rng, 600, 40)
    # the top 20: two windows around a trigger (poisons 0 and 1), eighteen clean windows
    top = [0, 1] + list(range(100, 118))
    boxes = _boxes(rng, 20)
    for j, (x, y) in enumerate(where[:2]):
        bx, by = min(x, SIZE - W), min(y, SIZE - W)
        boxes[j] = torch.as_tensor([bx, by, W, W])
    res = _test(images, top, boxes, runtime)
    assert res["p_value"] <= 0.01 and res["members"][0] in (0, 1) and set(res["members"]) <= {0, 1}
    assert res["holders"] == 40 - len(res["members"])              # every other poison, no clean image
    clean = _test(images, list(range(100, 120)), _boxes(rng, 20), runtime)
    assert clean["p_value"] > 0.01 and clean["size"] == 0 and clean["holders"] == 0


def test_too_few_or_flat_random_windows_give_no_evidence():
    rng = np.random.default_rng(4)
    held = np.r_[np.full(20, 0.99), 0.2 + 0.1 * rng.random(200)][:, None]
    res = held_picture_test(np.hstack([held, held]), [0], [1])
    assert res["p_value"] == 1.0 and res["n_reference"] == 1 and res["size"] == 0
    flat = held_picture_test(np.hstack([held, np.zeros((220, 64))]), [0], list(range(1, 65)))
    assert flat["p_value"] == 1.0 and flat["n_reference"] == 0                 # flat windows hold nothing: no null
    empty = held_picture_test(np.zeros((220, 3)), [], [1, 2, 3])
    assert empty["p_value"] == 1.0 and empty["null_group_p99"] == 0.0 and empty["size"] == 0


def test_two_pictures_held_by_different_images_do_not_form_one_group():
    """Two windows whose gaps overlap in similarity but whose holders differ are two pictures: the group takes the
    strongest and its holders only."""
    rng = np.random.default_rng(5)
    n = 1000
    a = 0.3 + 0.2 * rng.random(n)
    a[:40] = 0.95 + 0.03 * rng.random(40)                   # picture A: images 0-39
    b = 0.3 + 0.2 * rng.random(n)
    b[500:530] = 0.93 + 0.03 * rng.random(30)               # picture B: images 500-529, the same similarity range
    refs = 0.3 + 0.2 * rng.random((n, 128)) + 0.3 * (rng.random((n, 128)) > 0.999)
    res = held_picture_test(np.column_stack([a, b, refs]), [0, 500], list(range(600, 728)))
    assert res["p_value"] < 0.01 and res["members"] == [0] and res["holders"] == 39


def test_the_tail_reaches_past_the_largest_random_gap_and_the_level_inverts_it():
    rng = np.random.default_rng(3)
    ref = rng.exponential(0.004, 256)
    assert tail_probability(0.0, ref) == 1.0
    beyond = tail_probability(ref.max() * 1.5, ref)
    assert 0 < beyond < 1 / 257                              # rarer than any of the 256, by the fitted tail
    assert tail_probability(ref.max() * 3, ref) < beyond / 10
    g = tail_gap(ref, 20, 0.01)
    assert 1 - (1 - tail_probability(g, ref)) ** 20 == pytest.approx(0.01, rel=1e-6)
    assert tail_probability(0.01, np.array([])) == 1.0 and tail_gap(np.array([]), 20, 0.01) == 0.0
    few = np.r_[np.zeros(250), 0.01 * np.arange(1, 7)]       # too few gaps above the quantile to fit a tail
    assert tail_probability(1.0, few) == pytest.approx(1 / 257)
