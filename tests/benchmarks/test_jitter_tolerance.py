"""The jitter-tolerance study's similarity that forgives turns and scales."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF

from benchmarks.studies.jitter_tolerance import tolerant_similarity
from poisonscan.detect.recurrence import window_similarity


def _pattern(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, 4, 4, generator=g) * 255).repeat_interleave(4, 1).repeat_interleave(4, 2)


def test_without_turns_or_scales_it_is_the_pixel_similarity() -> None:
    w = torch.stack([_pattern(s) for s in range(4)]).to(torch.uint8).numpy()
    np.testing.assert_allclose(tolerant_similarity(w), window_similarity(w), atol=1e-6)


def test_a_turned_copy_is_alike_only_when_turns_are_forgiven() -> None:
    base = _pattern(0)
    turned = TF.rotate(base.unsqueeze(0), 30.0, interpolation=TF.InterpolationMode.BILINEAR,
                       fill=[float(v) for v in base.mean((1, 2))])[0]
    w = torch.stack([base, turned, _pattern(1)]).to(torch.uint8).numpy()
    plain = tolerant_similarity(w)
    forgiving = tolerant_similarity(w, turns=(30.0,))
    assert forgiving[0, 1] > plain[0, 1] + 0.1 and forgiving[0, 1] > 0.8
    assert forgiving[0, 2] < 0.8                          # an unrelated pattern stays unalike


def test_a_scaled_copy_is_alike_only_when_scales_are_forgiven() -> None:
    base = _pattern(2)
    grown = torch.nn.functional.interpolate(base[None], scale_factor=1.25, mode="bilinear", align_corners=False)[0]
    o = (grown.shape[-1] - base.shape[-1]) // 2
    scaled = grown[:, o:o + base.shape[-1], o:o + base.shape[-1]]
    w = torch.stack([base, scaled]).to(torch.uint8).numpy()
    plain = tolerant_similarity(w)
    forgiving = tolerant_similarity(w, scales=(0.8, 1.25))
    assert forgiving[0, 1] > plain[0, 1] + 0.05 and forgiving[0, 1] > 0.85
