"""Find the recurring picture in every image: the decision for a patch trigger the recurrence test has seen.

When the top-k windows hold copies of one picture (detect/recurrence.py), each image is searched for it: its best
window's similarity to any of the group's windows, with the recurrence test's measure (normalised cross-correlation,
each channel centred, :func:`~poisonscan.detect.recurrence.window_similarity`) at every position. An image
contains the picture when that similarity reaches both the recurrence test's bar (the 99th percentile of the
similarities between random windows of the run) and an outlier bar over all images' best matches
(:func:`match_threshold`): an image's best match is a maximum over hundreds of windows, so where random windows are
little alike (noise-like images) a clean image's best window can pass the pair-level bar by chance. Computed as
convolutions over whole batches of images, so the scan costs about as much as one small forward pass per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from poisonscan import runtime as rt
from poisonscan.detect.records import PictureMatch
from poisonscan.detect.recurrence import COMPARE_SIZE, FLAT_STD, as_compared, normalised


#: an image's best match must stand this many robust standard deviations (1.4826 x MAD) above the median of all
#: images' best matches: most images are clean, so the median and MAD are the clean images', whatever the poisons.
#: Set on two runs where this bar, not the recurrence bar, decided: the clean-data CIFAR-10 50k model (its common
#: pattern is withdrawn only above 2.3 sd: the median best match is 0.78) and CIFAR-10 50k with 5% poisoned (the
#: poisons' lowest best match is 4.8 sd up; 6 sd kept 314 of its 2,500 poisons); 4 lies between. On the other
#: recorded runs (the demo, CIFAR-10 50k at 0.5-2%, tinyimagenet100 at 0.5-1%, imagenette-96 at 2%) the recurrence
#: bar is the threshold at 4 as at 6, with every clean image's best match below it (docs/design.md).
OUTLIER_SIGMAS = 4.0


def match_threshold(matches: np.ndarray, bar: float) -> tuple[float, float]:
    """``(threshold, outlier_bar)``: the larger of the recurrence test's ``bar`` and ``median + OUTLIER_SIGMAS x
    1.4826 x MAD`` of all images' best ``matches``, and that outlier bar."""
    m = np.asarray(matches, dtype=np.float64)
    if m.size == 0:
        return float(bar), float("-inf")
    med = float(np.median(m))
    outlier = med + OUTLIER_SIGMAS * 1.4826 * float(np.median(np.abs(m - med)))
    return max(float(bar), outlier), outlier


def _prepare(templates_u8: Tensor) -> tuple[Tensor, float]:
    """The templates as the recurrence test compares windows (shrunk, each channel centred, unit norm, flat ones
    zeroed), as convolution kernels; and the factor the images must be shrunk by to match."""
    t = as_compared(templates_u8)
    w = int(templates_u8.shape[-1])
    return normalised(t).view_as(t), (COMPARE_SIZE / w if w > COMPARE_SIZE else 1.0)


def best_match(images_u8: Tensor, templates_u8: Tensor, runtime: rt.Runtime, batch_size: int = 256,
               quiet: bool = True) -> np.ndarray:
    """For each image (uint8 N x 3 x S x S), the largest similarity of any of its windows to any template (uint8
    k x 3 x w x w), in [-1, 1] (float32 N); windows flatter than :data:`FLAT_STD` count 0."""
    n = int(images_u8.shape[0])
    if n == 0 or templates_u8.shape[0] == 0:
        return np.zeros(n, dtype=np.float32)
    tmpl, scale = _prepare(templates_u8)
    device = runtime.device
    tmpl = tmpl.to(device)
    k, c, w, _ = tmpl.shape
    area = float(w * w)
    out = np.empty(n, dtype=np.float32)
    with torch.inference_mode(), rt.progress("picture match", n, quiet) as bar:
        for start in range(0, n, batch_size):
            x = images_u8[start:start + batch_size].to(device).float() / 255.0
            if scale != 1.0:
                side = max(w, int(round(x.shape[-1] * scale)))
                x = F.interpolate(x, size=(side, side), mode="area")
            if x.shape[-1] < w:
                out[start:start + len(x)] = 0.0
                bar.advance(len(x))
                continue
            # the templates are centred per channel, so the numerator needs no window mean
            num = F.conv2d(x, tmpl)                                            # B x k x P x P
            mean = F.avg_pool2d(x, w, stride=1)                                # B x C x P x P
            sq = F.avg_pool2d(x * x, w, stride=1)
            var = ((sq - mean * mean).clamp_min(0.0) * area).sum(1, keepdim=True)  # squared norm, centred window
            norm = var.sqrt()
            flat = norm < FLAT_STD * (c * area) ** 0.5
            sim = torch.where(flat, torch.zeros_like(num), num / norm.clamp_min(1e-12))
            out[start:start + len(x)] = sim.amax(dim=(1, 2, 3)).float().cpu().numpy()
            bar.advance(len(x))
    return out


def find_picture(images_u8: Tensor, templates_u8: Tensor, bar: float, flagged: np.ndarray, runtime: rt.Runtime,
                 batch_size: int = 256, quiet: bool = True) -> tuple[PictureMatch, np.ndarray]:
    """Search every image for the recurring picture (``templates_u8``: the recurring group's windows; ``bar``: the
    recurrence test's): the record (threshold, how many images contain it, how many of the ``flagged`` lack it and
    how many unflagged hold it) and every image's best match."""
    match = best_match(images_u8, templates_u8, runtime, batch_size, quiet)
    threshold, outlier = match_threshold(match, bar)
    contains = match >= threshold - 1e-9
    flagged = np.asarray(flagged, dtype=bool)
    return PictureMatch(threshold=threshold, bar=float(bar), outlier_bar=outlier, templates=int(len(templates_u8)),
                        contain=int(contains.sum()), flagged_without=int((flagged & ~contains).sum()),
                        added=int((contains & ~flagged).sum())), match


def match_verdict(found: bool, reason: str, picture_match: PictureMatch | None, by_effect: bool) -> tuple[bool, str]:
    """The run's verdict once the picture was searched for: a signal that rests on the recurring picture (not
    ``by_effect``: :func:`~poisonscan.detect.evidence.by_effect`) is withdrawn when no image holds the picture apart
    from the data (``contain`` 0: the outlier bar over all images' best matches is above every image's match). Such
    a group is a pattern common to the data that the search's windows share, not a pasted trigger."""
    if not found or picture_match is None or picture_match.contain > 0 or by_effect:
        return found, reason
    return False, (f"no backdoor signal: {reason.removeprefix('backdoor signal: ')}; but no image holds that "
                   f"picture apart from the data (best matches must reach {picture_match.threshold:.2f}, the "
                   f"median of all images' plus {OUTLIER_SIGMAS:g} robust sd): a common pattern, not a pasted "
                   f"trigger")
