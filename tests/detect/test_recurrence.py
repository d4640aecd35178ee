"""The recurrence test: copies of one picture among the top-k windows form a group; random windows do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonscan.detect.records import Evidence
from poisonscan.detect.recurrence import (COMPARE_SIZE, changed_copies, changed_copies_test, largest_group,
                                          pixel_recurrence_tests, recurrence_test, recurring_group, trigger_group,
                                          window_similarity)

W = 9


def _natural(rng: np.random.Generator, n: int, w: int = W) -> torch.Tensor:
    """``n`` uint8 windows of smooth random content with a little noise (what random windows of photos look like)."""
    coarse = torch.as_tensor(rng.random((n, 3, 3, 3)), dtype=torch.float32)
    smooth = F.interpolate(coarse, size=(w, w), mode="bilinear", align_corners=False)
    noisy = smooth + 0.03 * torch.as_tensor(rng.normal(size=(n, 3, w, w)), dtype=torch.float32)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def _copies(rng: np.random.Generator, trigger: torch.Tensor, n: int, w: int = W) -> torch.Tensor:
    """``n`` windows of ``w`` px cut around a pasted ``trigger``, each placed a pixel or two differently, on natural
    backgrounds, with a little noise."""
    out = _natural(rng, n, w).clone()
    t = trigger.shape[-1]
    for i in range(n):
        x, y = rng.integers(0, w - t + 1, 2)
        out[i, :, y:y + t, x:x + t] = trigger
    noise = torch.as_tensor(rng.integers(-4, 5, out.shape), dtype=torch.int16)
    return (out.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


def test_window_similarity_finds_a_shifted_copy_and_ignores_brightness_and_flat_windows():
    rng = np.random.default_rng(0)
    a = torch.as_tensor(rng.integers(0, 256, (1, 3, 12, 12)), dtype=torch.uint8)
    shifted = torch.roll(a, shifts=(2, 1), dims=(2, 3))
    assert window_similarity(a)[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert window_similarity(a, shifted, max_shift=0)[0, 0] < 0.3          # unaligned: no match ...
    assert window_similarity(a, shifted, max_shift=3)[0, 0] > 0.99         # ... until the shift is searched
    darker = (a.float() * 0.5 + 20).to(torch.uint8)
    assert window_similarity(a, darker)[0, 0] > 0.98                       # normalised: contrast does not count
    flat = torch.full((1, 3, 12, 12), 128, dtype=torch.uint8)
    assert window_similarity(a, flat)[0, 0] == 0.0 and window_similarity(flat)[0, 0] == 0.0
    big = F.interpolate(a.float(), size=(48, 48), mode="nearest").to(torch.uint8)
    assert COMPARE_SIZE < 48 and window_similarity(big)[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        window_similarity(a, big)
    with pytest.raises(ValueError):
        window_similarity(a[0])


def test_largest_group_is_centred_on_the_most_alike_window():
    alike = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert largest_group(alike) == (3, [0, 1, 2])
    assert largest_group(np.zeros((0, 0), dtype=bool)) == (0, [])


def test_copies_of_a_trigger_recur_and_random_windows_do_not():
    rng = np.random.default_rng(1)
    trigger = torch.as_tensor(rng.integers(0, 256, (3, 8, 8)), dtype=torch.uint8)
    null = _natural(rng, 1024)
    top = torch.cat([_copies(rng, trigger, 12), _natural(rng, 8)])          # an impure top-20: 12 copies
    rec = recurrence_test(top, null, n_boot=300, seed=0)
    assert rec["signature"] == "pixels" and Evidence.from_json({"recurrence": rec}).recurrence.size == rec["size"]
    assert rec["size"] >= 12 and set(rec["members"]) >= set(range(12)) and rec["members"][0] < 12
    assert rec["p_value"] < 0.01 and rec["null_group_p99"] < 5 and rec["n_reference"] == 256 and rec["k"] == 20
    clean = recurrence_test(_natural(rng, 20), null, n_boot=300, seed=0)
    assert clean["size"] < 5 and clean["p_value"] > 0.05
    assert Evidence.from_json({"recurrence": {**rec, "signature": "destinations"}}).recurrence is None  # another test


def test_too_few_random_windows_give_no_evidence():
    rng = np.random.default_rng(2)
    trigger = torch.as_tensor(rng.integers(0, 256, (3, 8, 8)), dtype=torch.uint8)
    rec = recurrence_test(_copies(rng, trigger, 5), _natural(rng, 3), n_boot=50)
    assert rec["size"] == 5 and rec["p_value"] == 1.0


class PooledColours(torch.nn.Module):
    """A stand-in threat model that learned a trigger's colours, not their layout: fixed pointwise features,
    pooled over the image, so a copy turned, mirrored or scaled gives nearly the same features."""

    image_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(32, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


def _changed_copies(rng: np.random.Generator, trigger: torch.Tensor, n: int) -> torch.Tensor:
    """Copies of ``trigger`` changed one by one: turned by a quarter turn, mirrored, scaled to 7-9 px, and pasted
    into a natural window."""
    out = _natural(rng, n).clone()
    for i in range(n):
        t = torch.rot90(trigger, int(rng.integers(4)), dims=(1, 2))
        t = torch.flip(t, dims=(2,)) if rng.random() < 0.5 else t
        side = int(rng.integers(7, 10))
        t = F.interpolate(t[None].float(), size=(side, side), mode="nearest")[0].to(torch.uint8)
        x, y = rng.integers(0, W - side + 1, 2)
        out[i, :, y:y + side, x:x + side] = t
    return out


def test_copies_changed_one_by_one_look_alike_to_the_model_though_not_pixel_for_pixel():
    from poisonscan.detect.recurrence import embed_windows, feature_recurrence_test
    from poisonscan.runtime import setup_runtime

    rng = np.random.default_rng(3)
    runtime = setup_runtime("cpu", "fp32")
    model = PooledColours().eval()
    on = torch.as_tensor(rng.random((8, 8)) < 0.5)                # a random layout of magenta and green
    trigger = torch.stack([on, ~on, on]).to(torch.uint8) * 255
    top = torch.cat([_changed_copies(rng, trigger, 12), _natural(rng, 8)])     # an impure top-20: 12 copies
    null = _natural(rng, 300)                                     # the windows the search picks in random images
    pixels = recurrence_test(top, null, n_boot=300, seed=0)
    feats = feature_recurrence_test(model, top, null, 32, runtime, n_boot=300, seed=0)
    assert pixels["size"] < 8 and pixels["p_value"] > 0.01                       # turned copies are not alike
    assert feats["signature"] == "features" and feats["n_reference"] == 256 and feats["k"] == 20
    assert feats["size"] >= 9 and feats["p_value"] < 0.01 and all(m < 12 for m in feats["members"])
    clean = feature_recurrence_test(model, _natural(rng, 20), null, 32, runtime, n_boot=300, seed=0)
    assert clean["size"] < 6 and clean["p_value"] > 0.05
    # the window alone, the canvas masked like cluster activation masking: only the window's pixels count
    one = top[:1]
    assert torch.allclose(embed_windows(model, one, 32, runtime), embed_windows(model, one, 24, runtime), atol=1e-5)
    # the group the gate and the classifier take: the recurring picture first, else the feature group
    ev = Evidence.from_json({"recurrence": pixels, "feature_recurrence": feats})
    assert ev.feature_recurrence.signature == "features" and trigger_group(ev, 0.01) is ev.feature_recurrence
    assert trigger_group(ev, feats["p_value"] / 2) is None
    both = Evidence.from_json({"recurrence": {**pixels, "p_value": 0.001}, "feature_recurrence": feats})
    assert trigger_group(both, 0.01) is both.recurrence
    assert Evidence.from_json({"feature_recurrence": pixels}).feature_recurrence is None    # another test's record


def _turned_copies(rng: np.random.Generator, trigger: torch.Tensor, n: int) -> torch.Tensor:
    """Copies of ``trigger`` (3 x 8 x 8) each turned by up to 20 degrees, scaled by 0.8-1.2 and recoloured (RGB gains
    0.8-1.2), pasted into a natural window: ``poisonscan poison --rotation 20 --scale-jitter 0.2 --colour-jitter
    0.2``."""
    out = _natural(rng, n).clone()
    t = trigger.float()[None] / 255
    for i in range(n):
        a, s = math.radians(rng.uniform(-20, 20)), rng.uniform(0.8, 1.2)
        theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, 0], [math.sin(a) / s, math.cos(a) / s, 0]],
                             dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 3, 8, 8], align_corners=False)
        c = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        c = (c * torch.as_tensor(rng.uniform(0.8, 1.2, (3, 1, 1)), dtype=torch.float32)).clamp(0, 1)
        x, y = rng.integers(0, W - 8 + 1, 2)
        out[i, :, y:y + 8, x:x + 8] = (c * 255).round().to(torch.uint8)
    return out


def test_copies_changed_a_little_are_alike_against_each_windows_own_bar():
    rng = np.random.default_rng(2)
    trigger = torch.as_tensor(rng.integers(0, 256, (3, 8, 8)), dtype=torch.uint8)
    top = torch.cat([_turned_copies(rng, trigger, 12), _natural(rng, 8)])      # an impure top-20: 12 copies
    null = _natural(rng, 300)
    pixels, changed = pixel_recurrence_tests(top, null, n_boot=300, seed=0)
    assert pixels == recurrence_test(top, null, n_boot=300, seed=0)
    assert changed == changed_copies_test(top, null, n_boot=300, seed=0)
    assert pixels["p_value"] > 0.01                          # smooth random windows set the shared bar too high
    assert changed["signature"] == "changed" and changed["n_reference"] == 256 and changed["k"] == 20
    assert changed["size"] >= 6 and changed["p_value"] < 0.01 and all(m < 12 for m in changed["members"])
    assert 0 < changed["bar"] < 1
    clean = changed_copies_test(_natural(rng, 20), null, n_boot=300, seed=0)
    assert clean["size"] < 4 and clean["p_value"] > 0.05
    # the picture the match and the classifier take: exact copies first, then changed ones, then the features'
    ev = Evidence.from_json({"recurrence": pixels, "changed_recurrence": changed,
                             "feature_recurrence": {**changed, "signature": "features", "p_value": 0.001}})
    assert recurring_group(ev, 0.01) is ev.changed_recurrence and changed_copies(ev, 0.01)
    assert trigger_group(ev, 0.01) is ev.changed_recurrence
    exact = Evidence.from_json({"recurrence": {**pixels, "p_value": 0.001}, "changed_recurrence": changed})
    assert recurring_group(exact, 0.01) is exact.recurrence and not changed_copies(exact, 0.01)
    assert Evidence.from_json({"changed_recurrence": pixels}).changed_recurrence is None    # another test's record
