"""Finding the recurring picture in every image: a pasted copy anywhere matches, clean images and flat ones do not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonscan import runtime as rt
from poisonscan.detect.evidence import by_effect
from poisonscan.detect.records import Evidence, PictureMatch
from poisonscan.detect.matching import (best_match, find_picture, held_beyond, match_decides, match_threshold,
                                        match_verdict)
from poisonscan.detect.recurrence import window_similarity


def _natural(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    coarse = torch.as_tensor(rng.random((n, 3, 4, 4)), dtype=torch.float32)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = smooth + 0.03 * torch.as_tensor(rng.normal(size=(n, 3, size, size)), dtype=torch.float32)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def runtime():
    return rt.setup_runtime("cpu", "fp32")


def test_a_pasted_copy_matches_anywhere_and_clean_images_do_not(runtime):
    rng = np.random.default_rng(0)
    trigger = torch.as_tensor(rng.integers(0, 256, (3, 8, 8)), dtype=torch.uint8)
    images = _natural(rng, 40, 32)
    for i in range(20):                                      # the first 20 carry the trigger, anywhere
        x, y = rng.integers(0, 32 - 8 + 1, 2)
        images[i, :, y:y + 8, x:x + 8] = trigger
    templates = torch.cat([trigger[None], trigger[None]])
    sims = best_match(images, templates, runtime, batch_size=7)
    assert sims.shape == (40,) and sims.dtype == np.float32
    assert (sims[:20] > 0.999).all() and (sims[20:] < 0.9).all()
    flat = torch.full((2, 3, 32, 32), 90, dtype=torch.uint8)
    assert (best_match(flat, templates, runtime) == 0).all()
    assert best_match(images[:0], templates, runtime).shape == (0,)


def test_the_measure_is_the_recurrence_tests(runtime):
    """On an image the size of the window, the match is window_similarity without shifts."""
    rng = np.random.default_rng(1)
    a, b = _natural(rng, 1, 9), torch.as_tensor(rng.integers(0, 256, (3, 3, 9, 9)), dtype=torch.uint8)
    expected = window_similarity(a, b, max_shift=0).max()
    assert best_match(a, b, runtime)[0] == pytest.approx(expected, abs=1e-4)


def test_wide_templates_are_compared_shrunk(runtime):
    rng = np.random.default_rng(2)
    trigger = torch.as_tensor(rng.integers(0, 256, (3, 6, 6)), dtype=torch.uint8)
    trigger = F.interpolate(trigger[None].float(), size=(40, 40), mode="nearest")[0].to(torch.uint8)
    images = _natural(rng, 4, 120)
    images[0, :, 40:80, 40:80] = trigger                      # aligned with the shrink grid
    images[1, :, 13:53, 61:101] = trigger                     # and not
    sims = best_match(images, trigger[None], runtime)
    assert sims[0] > 0.99 and sims[1] > 0.9 and (sims[2:] < 0.9).all()


def test_the_threshold_is_the_larger_of_the_pair_bar_and_an_outlier_bar():
    rng = np.random.default_rng(3)
    clean = rng.normal(0.3, 0.02, 1000)                       # noise-like images: a low pair bar is not enough
    matches = np.r_[clean, np.full(50, 1.0)]
    threshold, outlier = match_threshold(matches, bar=0.25)
    assert threshold == outlier and clean.max() < threshold < 1.0
    assert match_threshold(matches, bar=0.9) == (0.9, outlier)
    assert match_threshold(np.zeros(0), bar=0.5)[0] == 0.5


def test_a_picture_no_image_holds_apart_withdraws_a_recurrence_only_signal() -> None:
    reason = ("backdoor signal: z = 5.00, 7 of the top 20 windows show one picture (random windows: groups of up to "
              "5, p = 0.002); the top-k move 1.0% of the flip-set images random windows leave in place, below the "
              "minimum effect 15%")
    common = PictureMatch(threshold=1.36, bar=0.875, outlier_bar=1.36, templates=7, contain=0, flagged_without=0,
                          added=0)
    found, why = match_verdict(True, reason, common, by_effect=False)
    assert not found and why.startswith("no backdoor signal: z = 5.00, 7 of the top 20") and "common pattern" in why
    # a picture some images hold, a signal the flip test carries alone, or no search at all: the gate's verdict stands
    assert match_verdict(True, reason, dataclasses.replace(common, contain=250), False) == (True, reason)
    assert match_verdict(True, reason, common, True) == (True, reason)
    assert match_verdict(True, reason, None, False) == (True, reason)
    assert match_verdict(False, "no backdoor signal: z", common, False) == (False, "no backdoor signal: z")


def test_the_flip_test_alone_carries_a_signal_only_with_z_and_the_effect():
    ev = Evidence.from_json({"z": 5.0, "topk_median": 105.0, "null_median": 69.0, "n_flip": 189})   # effect 0.3
    assert by_effect(ev, 3.0, 0.15) and not by_effect(ev, 6.0, 0.15) and not by_effect(ev, 3.0, 0.5)


def test_the_match_makes_the_removal_unless_no_image_holds_the_picture_under_the_effect_or_force() -> None:
    held = PictureMatch(threshold=0.9, bar=0.8, outlier_bar=0.7, templates=5, contain=12)
    none = PictureMatch(threshold=1.2, bar=0.8, outlier_bar=1.2, templates=5, contain=0)
    assert match_decides(held, by_effect=False) and match_decides(held, by_effect=True, forced=True)
    assert match_decides(none, by_effect=False)                  # the verdict is withdrawn: nothing to remove
    assert not match_decides(none, by_effect=True) and not match_decides(none, by_effect=False, forced=True)
    assert not match_decides(None, by_effect=False)              # not searched for: the classifier decides
    assert not match_decides(held, by_effect=False, changed=True)   # changed copies: the classifier trains too
    assert match_decides(none, by_effect=False, changed=True)       # ... unless the verdict is withdrawn


def test_the_images_the_group_was_cut_from_do_not_show_a_pasted_trigger(runtime):
    """Each image of the group holds its own window: a picture only they hold is withdrawn like one none holds."""
    rng = np.random.default_rng(5)
    images = torch.as_tensor(rng.integers(100, 156, (40, 3, 32, 32)), dtype=torch.uint8)
    pattern = torch.as_tensor(rng.integers(0, 256, (3, 9, 9)), dtype=torch.uint8)
    images[[3, 8], :, 4:13, 4:13] = pattern
    templates = images[[3, 8], :, 4:13, 4:13]
    pm, _ = find_picture(images, templates, 0.5, runtime, group=[3, 8])
    assert pm.contain == 2 and pm.beyond_group == 0 and held_beyond(pm) == 0
    assert match_decides(pm, by_effect=False)                    # withdrawn: nothing to remove
    found, reason = match_verdict(True, "backdoor signal: z = 4.00", pm, by_effect=False)
    assert not found and "besides the windows' own" in reason
    images[20, :, 10:19, 10:19] = pattern                        # pasted on one more image: a trigger
    pm, _ = find_picture(images, templates, 0.5, runtime, group=[3, 8])
    assert pm.contain == 3 and held_beyond(pm) == 1 and match_verdict(True, "backdoor signal", pm, False)[0]
    legacy = PictureMatch(threshold=0.9, bar=0.8, outlier_bar=0.7, templates=2, contain=2)
    assert held_beyond(legacy) == 2                              # a record without the count: every holder
