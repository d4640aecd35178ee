"""Find the recurring picture in every image: the decision for a patch trigger the recurrence test has seen.

When the top-k windows hold copies of one picture (detect/recurrence.py), or a top-k window's picture is held by
many images of the data set (detect/holders.py), each image is searched for it: its best
window's similarity to any of the group's windows, with the recurrence test's measure (normalised cross-correlation,
each channel centred, :func:`~poisonscan.detect.recurrence.window_similarity`) at every position. An image
contains the picture when that similarity reaches both the group's bar (for the recurrence test the 99th
percentile of the similarities between random windows of the run; for changed copies the lowest of the group's own
bars; for a held picture the middle of the gap its holders share) and an outlier bar over all images' best matches
(:func:`match_threshold`): an image's best match is a maximum over hundreds of windows, so where random windows are
little alike (noise-like images) a clean image's best window can pass the pair-level bar by chance. Computed as
convolutions over whole batches of images, so the scan costs about as much as one small forward pass per image.

The match stage (:func:`run_match`) runs after the evidence and before the classifier: where the picture match
makes the removal (:func:`match_decides`) the classifier is not trained.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from poisonscan import runtime as rt
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.records import Evidence, Matching, PictureMatch, SearchResult
from poisonscan.detect.holders import window_matches
from poisonscan.detect.recurrence import recurring_group


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


def best_match(images_u8: Tensor, templates_u8: Tensor, runtime: rt.Runtime, batch_size: int = 256,
               quiet: bool = True) -> np.ndarray:
    """For each image (uint8 N x 3 x S x S), the largest similarity of any of its windows to any template (uint8
    k x 3 x w x w), in [-1, 1] (float32 N); windows flatter than :data:`~poisonscan.detect.recurrence.FLAT_STD`
    count 0 (:func:`~poisonscan.detect.holders.window_matches`)."""
    matches = window_matches(images_u8, templates_u8, runtime, batch_size, quiet)
    if matches.shape[1] == 0:
        return np.zeros(len(matches), dtype=np.float32)
    return matches.amax(dim=1).numpy().astype(np.float32)


def find_picture(images_u8: Tensor, templates_u8: Tensor, bar: float, runtime: rt.Runtime, batch_size: int = 256,
                 quiet: bool = True, group: list[int] | None = None) -> tuple[PictureMatch, np.ndarray]:
    """Search every image for the recurring picture (``templates_u8``: the recurring group's windows, cut from the
    images ``group``; ``bar``: the recurrence test's): the record (threshold, how many images contain it, how many
    of them outside ``group``) and every image's best match."""
    match = best_match(images_u8, templates_u8, runtime, batch_size, quiet)
    threshold, outlier = match_threshold(match, bar)
    contains = match >= threshold - 1e-9
    outside = np.ones(len(match), dtype=bool)
    outside[np.asarray(group or [], dtype=np.int64)] = False
    return PictureMatch(threshold=threshold, bar=float(bar), outlier_bar=outlier, templates=int(len(templates_u8)),
                        contain=int(contains.sum()), beyond_group=int((contains & outside).sum())), match


def held_beyond(pm: PictureMatch) -> int:
    """How many images hold the picture besides those its templates were cut from (each holds its own window):
    what shows a pasted trigger rather than the group itself (``contain`` for a record without the count)."""
    return pm.contain if pm.beyond_group is None else pm.beyond_group


def holds_picture(matching: Matching) -> np.ndarray | None:
    """Bool per image: its best match reaches the threshold (``None`` when the picture was not searched for)."""
    pm = matching.picture_match
    if pm is None or matching.match is None:
        return None
    return np.asarray(matching.match) >= pm.threshold - 1e-9


def match_decides(picture_match: PictureMatch | None, by_effect: bool, forced: bool = False,
                  changed: bool = False) -> bool:
    """Does the picture match make the removal (and the classifier need not train)? Where the picture was searched
    for: when some image holds it, and when none does and the signal rests on the picture alone (the verdict is
    then withdrawn, :func:`match_verdict`, and nothing is removed). A signal the flip test carries by its effect
    (``by_effect``), or a forced removal, whose picture no image holds apart from the data goes to the classifier.
    A picture changed copy by copy (``changed``: :func:`~poisonscan.detect.recurrence.changed_copies`) that some
    image holds does not decide alone: the match finds the copies close to the group's windows, the classifier
    the rest, and the removal is both (``decision.decide``)."""
    if picture_match is None:
        return False
    held = held_beyond(picture_match) > 0
    if changed and held:
        return False
    return held or not (by_effect or forced)


def run_match(images_u8: Tensor, search: SearchResult, evidence: Evidence, runtime: rt.Runtime, signal: bool,
              max_recurrence_p: float, enabled: bool = True, batch_size: int = 256,
              quiet: bool = True) -> Matching:
    """The match stage (rank 0): with a backdoor signal (``signal``: the evidence gate passed, or the removal is
    forced) and one picture recurring at ``p <= max_recurrence_p`` (exact or changed copies among the top-k windows,
    or held across the data set: :func:`~poisonscan.detect.recurrence.recurring_group`), search every image for it
    (:func:`find_picture`, the group's windows as templates, the group's bar: for changed copies the lowest of its
    windows' own bars, for a held picture the middle of the gap its holders share); ``enabled`` is
    ``decision.match_picture``. The record says why the picture was not searched for when it was not."""
    if not enabled:
        return Matching(reason="not asked for (decision.match_picture = false)")
    if not signal:
        return Matching(reason="no backdoor signal")
    rec = recurring_group(evidence, max_recurrence_p)
    if rec is None:
        return Matching(reason="no picture recurs among the top-k windows or across the data set")
    members = [int(i) for i in rec.members]
    boxes = search.boxes
    templates = cut_windows(images_u8[torch.as_tensor(members)],
                            torch.as_tensor([boxes[i] for i in members], dtype=torch.int64))
    pm, match = find_picture(images_u8, templates, rec.bar, runtime, batch_size, quiet, group=members)
    if rec.signature == "held":
        why = f"the picture of {rec.size} of the top {rec.k} windows is held by {rec.holders} images of the data set"
    else:
        why = f"{rec.size} of the top {rec.k} windows show one picture" + (
            ", changed copy by copy" if rec.signature == "changed" else "")
    return Matching(searched=True, reason=why,
                    picture_match=pm, match=match)


def match_verdict(found: bool, reason: str, picture_match: PictureMatch | None, by_effect: bool) -> tuple[bool, str]:
    """The run's verdict once the picture was searched for: a signal that rests on the recurring picture (not
    ``by_effect``: :func:`~poisonscan.detect.evidence.by_effect`) is withdrawn when no image holds the picture apart
    from the data (:func:`held_beyond` 0: no image but those the group's windows were cut from reaches the
    threshold, the outlier bar over all images' best matches or the group's bar). Such a group is a pattern common
    to the data that the search's windows share, not a pasted trigger."""
    if not found or picture_match is None or held_beyond(picture_match) > 0 or by_effect:
        return found, reason
    pm = picture_match
    bar = (f"the median of all images' plus {OUTLIER_SIGMAS:g} robust sd" if pm.outlier_bar >= pm.bar
           else "the group's bar")
    return False, (f"no backdoor signal: {reason.removeprefix('backdoor signal: ')}; but no image besides the "
                   f"windows' own holds that picture apart from the data (best matches must reach "
                   f"{pm.threshold:.2f}, {bar}): a common pattern, not a pasted trigger")
