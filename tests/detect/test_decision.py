"""The decision: the gate's verdict read with the picture match, and the removal it makes."""

from __future__ import annotations

import numpy as np

from poisonscan.detect.decision import DecisionSettings, decide
from poisonscan.detect.evidence import evidence_gate
from poisonscan.detect.records import ClassifierResult, Evidence, Matching, PictureMatch, Verification

N = 12
POISONS = [2, 5, 7]
GROUP = {"signature": "pixels", "size": 3, "k": 5, "null_group_p99": 2.0, "p_value": 0.001, "members": POISONS,
         "bar": 0.8}


def _neighbours(k: int) -> np.ndarray:
    """Each image's ``k`` nearest neighbours: the next images in order (the classifier's P is flat, so any do)."""
    return (np.arange(N)[:, None] + np.arange(1, k + 1)[None, :]) % N


def _evidence(**kw: float) -> Evidence:
    """A weakly learned trigger: the top-k move one flip-set image more than random windows (z 2, effect 0.4%),
    significantly (p 0.0005), and three of the top five windows show one picture."""
    return Evidence.from_json({"z": 2.0, "p_value": 0.0005, "topk_median": 3.0, "null_median": 2.0, "n_flip": 250,
                               "recurrence": GROUP, **kw})


def _run(ev: Evidence, contain: int, settings: DecisionSettings | None = None, probs: np.ndarray | None = None,
         classifier: bool = True):
    settings = settings or DecisionSettings()
    found, reason = evidence_gate(ev, settings.min_evidence, settings.min_effect, settings.max_recurrence_p,
                                  settings.weak_signal_p)
    if probs is None and found and classifier:
        probs = np.full(N, 0.1, dtype=np.float32)
    clf = ClassifierResult(trained=probs is not None, backdoor_found=found, reason=reason, probs=probs)
    match = np.full(N, 0.3, dtype=np.float32)
    match[POISONS[:contain]] = 0.95
    pm = PictureMatch(threshold=0.9 if contain else 1.3, bar=0.8, outlier_bar=0.9 if contain else 1.3, templates=3,
                      contain=contain)
    matching = Matching(searched=True, picture_match=pm, match=match) if found else Matching()
    return decide(settings, ev, clf, Verification(), matching, N, _neighbours)


def test_a_weakly_learned_recurring_trigger_is_removed_by_the_picture_match() -> None:
    d = _run(_evidence(), contain=3)
    assert d.backdoor_found and d.verdict == "backdoor signal found"
    assert np.flatnonzero(d.removed).tolist() == POISONS and d.n_removed == 3
    assert "though z = 2.00 is below the minimum evidence 3" in d.reason and "learned weakly" in d.reason


def test_a_weak_signal_no_image_holds_apart_is_withdrawn() -> None:
    d = _run(_evidence(), contain=0)
    assert not d.backdoor_found and d.n_removed == 0 and "a common pattern, not a pasted trigger" in d.reason


def test_without_the_weak_path_or_significance_nothing_is_found() -> None:
    assert not _run(_evidence(), 3, DecisionSettings(weak_signal_p=0.0)).backdoor_found
    weak = _run(_evidence(p_value=0.3), contain=3)
    assert not weak.backdoor_found and "responds to too weakly" in weak.reason
    assert "--set decision.force=true removes the images that hold it" in weak.reason      # what the user can do
    assert not _run(_evidence(recurrence={**GROUP, "p_value": 0.2}), contain=3).backdoor_found


def test_a_signal_the_flip_test_carries_alone_stands_without_the_picture() -> None:
    """z and the effect over their bars: the verdict does not rest on the picture, so an empty match keeps it."""
    strong = _evidence(z=12.0, topk_median=120.0, null_median=20.0)
    d = _run(strong, contain=0)
    assert d.backdoor_found and d.reason.startswith("backdoor signal: z = 12.00")


def test_a_signal_the_effect_carries_falls_back_to_the_classifier_when_no_image_holds_the_picture() -> None:
    """The picture searched for is in no image, but the flip test alone shows a backdoor: the classifier removes."""
    strong = _evidence(z=12.0, topk_median=120.0, null_median=20.0)
    probs = np.full(N, 0.1, dtype=np.float32)
    probs[[1, 4]] = 0.99
    d = _run(strong, contain=0, settings=DecisionSettings(neighbours=0), probs=probs)
    assert d.backdoor_found and np.flatnonzero(d.removed).tolist() == [1, 4]
    assert d.picture_match is not None and (d.picture_match.flagged_without, d.picture_match.added) == (2, 0)


def test_the_picture_match_removes_without_a_classifier_and_compares_its_flags_with_one() -> None:
    alone = _run(_evidence(), contain=3, classifier=False)
    assert np.flatnonzero(alone.removed).tolist() == POISONS and alone.removal_score is None
    assert alone.picture_match.flagged_without is None and alone.picture_match.added is None
    probs = np.full(N, 0.1, dtype=np.float32)
    probs[[2, 9]] = 0.99
    both = _run(_evidence(), contain=3, settings=DecisionSettings(neighbours=0), probs=probs)
    assert np.flatnonzero(both.removed).tolist() == POISONS          # the match makes the removal
    assert (both.picture_match.flagged_without, both.picture_match.added) == (1, 2)


def test_without_a_picture_search_the_classifier_removes() -> None:
    probs = np.full(N, 0.1, dtype=np.float32)
    probs[[3]] = 0.99
    ev = _evidence(z=12.0, topk_median=120.0, null_median=20.0, recurrence=None)
    d = decide(DecisionSettings(neighbours=0), ev, ClassifierResult(trained=True, backdoor_found=True, probs=probs),
               Verification(), Matching(reason="no picture recurs among the top-k windows"), N, _neighbours)
    assert np.flatnonzero(d.removed).tolist() == [3] and d.picture_match is None


def test_force_removes_by_the_classifier_where_the_verdict_is_withdrawn() -> None:
    probs = np.full(N, 0.1, dtype=np.float32)
    probs[[4]] = 0.99
    d = _run(_evidence(), contain=0, settings=DecisionSettings(neighbours=0, force=True), probs=probs)
    assert not d.backdoor_found and d.forced and d.verdict == "no backdoor signal (removal forced)"
    assert np.flatnonzero(d.removed).tolist() == [4]


def test_a_trigger_changed_copy_by_copy_is_removed_by_the_match_and_the_classifier() -> None:
    """The group holds changed copies: the match finds the copies close to its windows, the classifier the rest,
    and the removal is both; a changed picture no image holds apart from the data is withdrawn as any other."""
    changed = {**GROUP, "signature": "changed"}
    ev = _evidence(recurrence={**GROUP, "size": 1, "p_value": 0.5}, changed_recurrence=changed)
    probs = np.full(N, 0.1, dtype=np.float32)
    probs[[5, 7, 9]] = 0.99
    d = _run(ev, contain=1, settings=DecisionSettings(neighbours=0), probs=probs)
    assert d.backdoor_found and "changed copy by copy" in d.reason
    assert np.flatnonzero(d.removed).tolist() == [2, 5, 7, 9]        # the match's 2, the classifier's 5, 7, 9
    withdrawn = _run(ev, contain=0, settings=DecisionSettings(neighbours=0), probs=probs)
    assert not withdrawn.backdoor_found and withdrawn.n_removed == 0


def test_a_confident_flag_among_changed_copies_stands_without_its_neighbours() -> None:
    """Changed copies: an image the classifier is sure of is removed even where its neighbours are not flagged."""
    changed = {**GROUP, "signature": "changed"}
    ev = _evidence(recurrence={**GROUP, "size": 1, "p_value": 0.5}, changed_recurrence=changed)
    probs = np.full(N, 0.1, dtype=np.float32)
    probs[[10, 11]] = [0.95, 0.85]                                 # isolated flags: no neighbour support
    d = _run(ev, contain=3, probs=probs)
    assert np.flatnonzero(d.removed).tolist() == POISONS + [10]    # 0.95 > 0.9 stands; 0.85 needs support
    off = _run(ev, contain=3, settings=DecisionSettings(confident_prob=1.0), probs=probs)
    assert np.flatnonzero(off.removed).tolist() == POISONS
    exact = _run(_evidence(), contain=3, probs=probs)               # an exact picture: the match alone removes
    assert np.flatnonzero(exact.removed).tolist() == POISONS


def test_a_picture_only_the_groups_own_images_hold_is_withdrawn_and_removes_nothing() -> None:
    """Each image of the group holds its own window: when no other image does, the verdict is withdrawn and the
    group's images are not removed either."""
    settings = DecisionSettings()
    ev = _evidence()
    found, reason = evidence_gate(ev, settings.min_evidence, settings.min_effect, settings.max_recurrence_p,
                                  settings.weak_signal_p)
    assert found
    match = np.full(N, 0.3, dtype=np.float32)
    match[POISONS] = 1.0
    pm = PictureMatch(threshold=0.9, bar=0.8, outlier_bar=0.9, templates=3, contain=3, beyond_group=0)
    d = decide(settings, ev, ClassifierResult(trained=False, backdoor_found=found, reason=reason), Verification(),
               Matching(searched=True, picture_match=pm, match=match), N, _neighbours)
    assert not d.backdoor_found and d.n_removed == 0 and "besides the windows' own" in d.reason
