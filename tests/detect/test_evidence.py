"""Backdoor evidence: random null windows and the order-statistics bootstrap test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonscan.detect.evidence import (backdoor_evidence, bootstrap_is_exact, bootstrap_topk_medians, effect_of, effect_size,
                                        evidence_gate, evidence_z, null_pool, null_windows, topk_spread)
from poisonscan.detect.held_response import sign_test_p
from poisonscan.detect.records import Evidence
from poisonscan.detect.recurrence import changed_copies, recurring_group, trigger_group


def gate(ev: dict, *args: float, **kwargs: float) -> tuple[bool, str]:
    """The gate on the evidence record of the JSON object ``ev``."""
    return evidence_gate(Evidence.from_json(ev), *args, **kwargs)


def test_null_windows_are_cut_from_the_images() -> None:
    n_img, size, w = 6, 20, 7
    base = torch.arange(n_img, dtype=torch.uint8).mul(40).view(n_img, 1, 1, 1).expand(n_img, 3, size, size)
    imgs = base.clone()
    imgs[:, 1] = torch.arange(size, dtype=torch.uint8).view(1, 1, size)  # column index in channel 1
    imgs[:, 2] = torch.arange(size, dtype=torch.uint8).view(1, size, 1)  # row index in channel 2
    out = null_windows(imgs, 50, w, torch.Generator().manual_seed(0))
    assert out.shape == (50, 3, w, w) and out.dtype == torch.uint8
    sources, xs, ys = set(), set(), set()
    for win in out:
        v = int(win[0, 0, 0])
        assert (win[0] == v).all() and v % 40 == 0  # one source image per window
        x0, y0 = int(win[1, 0, 0]), int(win[2, 0, 0])
        assert torch.equal(win[1, 0], torch.arange(x0, x0 + w, dtype=torch.uint8))  # contiguous, fully inside
        assert torch.equal(win[2, :, 0], torch.arange(y0, y0 + w, dtype=torch.uint8))
        assert 0 <= x0 <= size - w and 0 <= y0 <= size - w
        sources.add(v)
        xs.add(x0)
        ys.add(y0)
    assert len(sources) == n_img and len(xs) > 5 and len(ys) > 5
    again = null_windows(imgs, 50, w, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    pooled = null_windows(imgs, 50, w, torch.Generator().manual_seed(0), pool=np.array([1, 4]))
    assert {int(win[0, 0, 0]) for win in pooled} == {40, 160}        # only images 1 and 4


def test_null_pool_leaves_out_the_top_k_clusters() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    out = "outside-topk-clusters"
    assert null_pool(labels, [0, 3], out).tolist() == [4, 5, 6]      # clusters 0 and 1 hold the top-k
    assert null_pool(labels, [0, 3]) is None and null_pool(labels, [0, 3], "all") is None   # the default: all
    assert null_pool(labels, [0, 2, 4, 6], out) is None              # nothing left: every image
    with pytest.raises(ValueError, match="null pool"):
        null_pool(labels, [0], "near")


def test_clear_outlier_gives_small_p_and_large_z() -> None:
    rng = np.random.default_rng(0)
    null = rng.poisson(3, size=400)
    topk = np.full(20, 60)
    ev = backdoor_evidence(topk, null, n_scored=2000, n_flip=100, n_boot=500)
    assert ev["p_value"] == pytest.approx(1 / 501)
    assert ev["z"] > 10
    assert ev["topk_median"] == 60.0
    assert ev["best_flip_share"] == pytest.approx(0.6)
    assert ev["null_size"] == 400
    assert ev["null_median"] < 15  # top-20 of 2000 Poisson(3) draws sit around 7-8, not 3
    assert ev["null_median"] > float(np.median(null))
    assert ev["effect"] == pytest.approx((60 - ev["null_median"]) / (100 - ev["null_median"]))


def test_null_like_topk_is_not_significant() -> None:
    """Top-k of the same number of draws from the null itself: p near 0.5, z near 0."""
    ps, zs = [], []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        null = rng.normal(20, 4, size=600).round()
        scored = rng.normal(20, 4, size=1000).round()
        topk = np.sort(scored)[-20:]
        ev = backdoor_evidence(topk, null, n_scored=1000, n_flip=100, n_boot=400, seed=seed)
        ps.append(ev["p_value"])
        zs.append(ev["z"])
    assert 0.25 < float(np.mean(ps)) < 0.8
    assert abs(float(np.mean(zs))) < 1.5
    assert min(ps) > 0.02


def test_constant_null_uses_the_scale_floor() -> None:
    ev = backdoor_evidence(np.array([2, 2, 1]), np.zeros(50), n_scored=10, n_flip=10, n_boot=100)
    assert ev["z"] == pytest.approx((ev["topk_median"] - 0.0) / 0.5)
    same = backdoor_evidence(np.zeros(3), np.zeros(50), n_scored=10, n_flip=10, n_boot=100)
    assert same["z"] == 0.0 and same["p_value"] == 1.0  # every bootstrap median ties the observation


def test_bootstrap_matches_order_statistics_and_is_seeded() -> None:
    null = np.arange(10, dtype=np.float64)
    meds = bootstrap_topk_medians(null, n_scored=10_000, k=5, n_boot=50, seed=1)
    assert (meds == 9).all()  # with 10,000 draws the top 5 are all the maximum
    a = backdoor_evidence(np.array([5, 6]), null, n_scored=30, n_flip=10, n_boot=200, seed=4)
    b = backdoor_evidence(np.array([5, 6]), null, n_scored=30, n_flip=10, n_boot=200, seed=4)
    assert a == b
    # fewer scored images than k: the draw count is raised to k instead of failing
    small = backdoor_evidence(np.array([1, 2, 3]), null, n_scored=1, n_flip=10, n_boot=20)
    assert small["n_scored"] == 3


TRIGGER_TOPK = np.array([221, 217, 215, 214, 213, 213, 212, 212, 210, 210, 210, 210, 209, 208, 208, 208, 208, 207,
                         207, 207], dtype=np.float64)                  # the measured CIFAR-10 trigger_12 run
CLEAN_TOPK = np.array([105, 89, 89, 89, 89, 85, 85, 84, 83, 82, 81, 79, 78, 78, 76, 76, 75, 74, 74, 74],
                      dtype=np.float64)                                # the model trained on clean imagenette-96


def test_z_is_the_gap_over_the_smaller_spread() -> None:
    assert topk_spread(TRIGGER_TOPK) == pytest.approx((213 - 208) / 1.349)
    assert evidence_z(TRIGGER_TOPK, 196, boot_std=15.0) == pytest.approx(14 / topk_spread(TRIGGER_TOPK))
    assert evidence_z(TRIGGER_TOPK, 196, boot_std=2.0) == pytest.approx(7.0)             # the null's spread
    assert evidence_z(np.full(20, 60.0), 8, boot_std=0.0) == pytest.approx(104)          # the 0.5 floor
    assert topk_spread(CLEAN_TOPK) == pytest.approx(7.41, abs=0.01)   # IQR 86 - 76 (interpolated) over 1.349
    assert evidence_z(CLEAN_TOPK, 75, boot_std=20.0) == pytest.approx(6.5 / topk_spread(CLEAN_TOPK))
    assert evidence_z(CLEAN_TOPK, 75, boot_std=20.0) < 1


def test_a_few_trigger_windows_in_the_null_do_not_hide_the_backdoor() -> None:
    """Two of 256 random windows cut from poisons flipped 197 and 198 of 250: the top-20 median of a 2,028-draw
    resample jumps between them and the rest, the bootstrap's std is about 15, and the first z was 1.2. The
    trigger's windows bunch together, so the gap over their own spread still counts."""
    rng = np.random.default_rng(0)
    bulk = np.clip(rng.normal(55, 25, size=254).round(), 0, 135)
    null = np.r_[bulk, 197.0, 198.0]
    ev = backdoor_evidence(TRIGGER_TOPK, null, n_scored=2028, n_flip=250, n_boot=2000)
    assert ev["boot_std"] > 10 and (ev["topk_median"] - ev["boot_mean"]) / ev["boot_std"] < 3   # the first z
    assert ev["z"] >= 3 and ev["z_scale"] == "min-spread" and ev["p_value"] == pytest.approx(1 / 2001)
    assert ev["topk_spread"] == pytest.approx(topk_spread(TRIGGER_TOPK))
    clean = backdoor_evidence(TRIGGER_TOPK, bulk, n_scored=2028, n_flip=250, n_boot=2000)
    assert clean["null_median"] < 150 < ev["null_median"] and clean["effect"] > 0.5 > ev["effect"] > 0.15


def test_a_spread_out_top_k_over_a_tight_null_needs_the_effect_test() -> None:
    """The clean-model case: the top-k sit 6.5 flips over a tight null. Against the null's spread that is a large z;
    only the effect test (5.7%) says it is small."""
    null = np.r_[np.full(250, 30.0), np.full(6, 75.0)]
    ev = backdoor_evidence(CLEAN_TOPK, null, n_scored=1548, n_flip=189, n_boot=300)
    assert ev["null_median"] == 75.0 and ev["z"] > 3 and ev["effect"] == pytest.approx(6.5 / 114)
    assert not gate(ev, 3.0, 0.15)[0]


def test_evidence_rejects_empty_inputs() -> None:
    with pytest.raises(ValueError):
        backdoor_evidence(np.array([]), np.ones(3), 10, 10)
    with pytest.raises(ValueError):
        backdoor_evidence(np.ones(3), np.array([]), 10, 10)


def test_significant_but_small_effect_fails_the_gate() -> None:
    """The clean-model failure mode: a tight null, top-k a few flips above it: large z, small effect."""
    null = np.r_[np.full(250, 30.0), np.full(6, 75.0)]
    ev = backdoor_evidence(np.full(20, 81.0), null, n_scored=1500, n_flip=189, n_boot=300)
    assert ev["z"] > 3 and ev["effect"] == pytest.approx((81 - 75) / (189 - 75))
    found, reason = gate(ev, min_evidence=3.0, min_effect=0.15)
    assert not found and "minimum effect 15%" in reason and "5.3%" in reason
    assert gate(ev, min_evidence=3.0, min_effect=0.0)[0]
    strong = backdoor_evidence(np.full(20, 110.0), null, n_scored=1500, n_flip=189, n_boot=300)
    found, reason = gate(strong, 3.0, 0.15)
    assert found and reason.startswith("backdoor signal: z = ") and "30.7%" in reason


def test_effect_is_measured_against_the_headroom_the_null_leaves() -> None:
    """At 32 px random windows move most of the flip set: 24 more flips of the 59 left is a large effect."""
    assert effect_size(215, 191, 250) == pytest.approx(24 / 59)
    assert effect_size(81.5, 75, 189) == pytest.approx(6.5 / 114)
    assert effect_size(100, 100, 100) == 0.0 and effect_size(90, 95, 100) == pytest.approx(-1.0)


def test_gate_reports_low_z_first_and_computes_the_effect_from_the_record() -> None:
    found, reason = gate({"z": 1.2, "effect": 0.5}, 3.0, 0.15)
    assert not found and reason.startswith("no backdoor signal: z = 1.20 is below the minimum evidence 3 (")
    assert "responds to no trigger, or learned it too weakly" in reason               # what that means, in words
    rec = {"z": 5.0, "topk_median": 105.0, "null_median": 69.0, "n_flip": 189}
    assert effect_of(Evidence.from_json(rec)) == pytest.approx(0.3) and gate(rec, 3.0, 0.15)[0]
    assert effect_of(Evidence.from_json({**rec, "effect": 36 / 189})) == pytest.approx(0.3)     # from the fields
    no_flip = {"z": 5.0, "topk_median": 1.0, "null_median": 0.0, "n_flip": 0, "effect": 0.25}
    assert effect_of(Evidence.from_json(no_flip)) == 0.25


def test_a_recurring_picture_stands_in_for_a_small_effect() -> None:
    """Where random windows already move most of the flip set, a trigger's effect stays small: a picture recurring
    among the top-k passes the gate instead; its windows must still stand above random ones (z, or for a weakly
    learned trigger the bootstrap's p), and without the test the effect alone decides."""
    null = np.r_[np.full(250, 120.0), np.full(6, 124.0)]
    ev = backdoor_evidence(np.r_[np.full(10, 140.0), np.full(10, 135.0)], null, n_scored=1500, n_flip=250,
                           n_boot=300)
    assert ev["z"] > 3 and ev["effect"] < 0.15
    found, reason = gate(ev, 3.0, 0.15)
    assert not found and "and the record has no recurrence test: " in reason
    weak = {**ev, "recurrence": {"signature": "pixels", "size": 3, "k": 20, "null_group_p99": 5.0, "p_value": 0.4}}
    found, reason = gate(weak, 3.0, 0.15)
    assert not found and "no picture recurs among the top-k (largest group 3 of 20" in reason
    strong = {**ev, "recurrence": {**weak["recurrence"], "size": 13, "p_value": 0.001}}
    found, reason = gate(strong, 3.0, 0.15)
    assert found and "13 of the top 20 windows show one picture" in reason and "below the minimum effect" in reason
    found, reason = gate(strong, 3.0, 0.15, max_recurrence_p=0.0)          # 0: the effect alone decides
    assert not found and "a recurring picture is not asked for (decision.max_recurrence_p = 0): " in reason
    assert strong["p_value"] < 0.01
    found, reason = gate({**strong, "z": 2.0}, 3.0, 0.15)                      # weakly learned: p stands in for z
    assert found and reason.startswith("backdoor signal: 13 of the top 20 windows show one picture")
    assert "though z = 2.00 is below the minimum evidence 3" in reason and "learned weakly" in reason
    found, reason = gate({**strong, "z": 2.0, "p_value": 0.2}, 3.0, 0.15)     # not above random windows: no
    assert not found and "is below the minimum evidence 3, though 13 of the top 20 windows show one picture" in reason
    assert "do not stand above random windows' (p = 0.200, asked: 0.01)" in reason
    assert not gate({**strong, "z": 2.0}, 3.0, 0.15, max_recurrence_p=0.0)[0]   # without the test z decides
    other = {**strong, "recurrence": {**strong["recurrence"], "signature": "destinations"}}
    assert not gate(other, 3.0, 0.15)[0]             # a record of another test is not read as this one
    big = {**strong, "effect": 0.5, "topk_median": 200.0}
    found, reason = gate(big, 3.0, 0.15)
    assert found and "13 of the top 20 windows show one picture" in reason


def test_the_bootstrap_is_exact_when_every_resample_reads_windows_tested_in_full() -> None:
    scores = np.array([30, 25, 20] + [1] * 97, dtype=np.float64)
    resolved = np.zeros(100, bool)
    resolved[:3] = True
    # top-3 median of 300 draws: the 2nd largest; about 9 draws per resample land on the three resolved windows
    assert bootstrap_is_exact(scores, resolved, ceiling=5.0, n_scored=300, k=3, n_boot=200, seed=0)
    # a ceiling above them: a stopped window could outrank them, not exact
    assert not bootstrap_is_exact(scores, resolved, ceiling=30.0, n_scored=300, k=3, n_boot=200, seed=0)
    # 30 draws: many resamples miss the resolved windows and read the stopped ones
    assert not bootstrap_is_exact(scores, resolved, ceiling=5.0, n_scored=30, k=3, n_boot=200, seed=0)


def test_the_adaptive_null_gives_the_exact_nulls_evidence_with_fewer_forwards() -> None:
    import torch

    from poisonscan.detect.evidence import adaptive_null
    from tests.detect.test_fliptest import _flip_test, patch

    flip = _flip_test()                                       # 64 flip images; bright windows flip them all
    values = [250] * 6 + [120] * 10 + [5] * 112               # a bright tail, then windows that flip nothing
    patches = torch.stack([patch(v) for v in values])
    exact = flip.scores(patches, None, "null")
    staged = adaptive_null(flip, patches, None, n_scored=300, k=6, delta=1e-4, n_boot=500)
    assert (staged.tested < 64).sum() > 100                   # the dim windows stopped after a slice
    resolved = staged.tested == 64
    assert (staged.scores[resolved] == exact[resolved]).all()
    top = np.array([64, 64, 63, 60, 64, 62])
    a = backdoor_evidence(top, exact, 300, 64, n_boot=500, seed=flip.seed)
    b = backdoor_evidence(top, staged.scores, 300, 64, n_boot=500, seed=flip.seed)
    assert (a["z"], a["null_median"], a["boot_std"], a["p_value"]) == (b["z"], b["null_median"], b["boot_std"],
                                                                       b["p_value"])
    # too few draws for the resolved tail to fill every resample: the whole null is tested
    full = adaptive_null(flip, patches, None, n_scored=10, k=6, delta=1e-4, n_boot=500)
    assert (full.tested == 64).all() and (full.scores == exact).all()


def test_a_group_alike_to_the_threat_model_stands_in_where_no_picture_recurs() -> None:
    """A trigger changed copy by copy recurs in the threat model's features, not in pixels: that group passes the
    gate as the recurring picture would, and the reason says which test found it."""
    null = np.r_[np.full(250, 120.0), np.full(6, 124.0)]
    ev = backdoor_evidence(np.r_[np.full(10, 140.0), np.full(10, 135.0)], null, n_scored=1500, n_flip=250,
                           n_boot=300)
    pixels = {"signature": "pixels", "size": 4, "k": 20, "null_group_p99": 5.0, "p_value": 0.03}
    feats = {"signature": "features", "size": 9, "k": 20, "null_group_p99": 4.0, "p_value": 0.001}
    found, reason = gate({**ev, "recurrence": pixels, "feature_recurrence": feats}, 3.0, 0.15)
    assert found and "9 of the top 20 windows look alike to the threat model, though not pixel for pixel" in reason
    assert "windows the search picks in random images: groups of up to 4, p = 0.001" in reason
    found, reason = gate({**ev, "recurrence": pixels, "feature_recurrence": {**feats, "size": 3, "p_value": 0.5}},
                         3.0, 0.15)
    assert not found and "no picture recurs among the top-k (largest group 4 of 20" in reason
    assert "nor do they look alike to the threat model (largest group 3; search-like windows: up to 4, p = 0.500)" \
        in reason
    changed = {"signature": "changed", "size": 3, "k": 20, "null_group_p99": 3.0, "p_value": 0.04}
    found, reason = gate({**ev, "recurrence": pixels, "changed_recurrence": changed}, 3.0, 0.15)
    assert not found and "nor as changed copies (each window's own bar: largest group 3; random windows: up to 3, " \
        "p = 0.040)" in reason
    found, reason = gate({**ev, "recurrence": pixels, "changed_recurrence": {**changed, "size": 8, "p_value": 0.001},
                          "feature_recurrence": feats}, 3.0, 0.15)
    assert found and "8 of the top 20 windows show one picture, changed copy by copy" in reason   # before features
    found, reason = gate({**ev, "z": 1.0, "recurrence": pixels, "feature_recurrence": feats}, 3.0, 0.15)
    assert found and "learned weakly" in reason                         # the weak-signal path holds for it too
    found, reason = gate({**ev, "z": 1.0, "p_value": 0.2, "recurrence": pixels, "feature_recurrence": feats},
                         3.0, 0.15)
    assert not found and "is below the minimum evidence 3, though 9 of the top 20 windows look alike" in reason
    assert not gate({**ev, "recurrence": pixels, "feature_recurrence": feats}, 3.0, 0.15, max_recurrence_p=0.0)[0]


def test_a_picture_held_across_the_data_set_stands_in_where_the_top_k_hold_too_few_copies() -> None:
    """Two copies of a trigger among the top 20 form no group, but the data set's images hold their picture: the
    gate passes on it (after exact and changed copies, before the features, and before changed copies most of
    whose windows it holds) and says so; without it, the reason names the held-picture test too."""
    null = np.r_[np.full(250, 120.0), np.full(6, 124.0)]
    ev = backdoor_evidence(np.r_[np.full(10, 140.0), np.full(10, 135.0)], null, n_scored=1500, n_flip=250,
                           n_boot=300)
    pixels = {"signature": "pixels", "size": 2, "k": 20, "null_group_p99": 5.0, "p_value": 0.7}
    changed = {"signature": "changed", "size": 3, "k": 20, "null_group_p99": 3.0, "p_value": 0.03}
    held = {"signature": "held", "size": 2, "k": 20, "null_group_p99": 0.018, "p_value": 0.001, "holders": 123,
            "gap": 0.288, "members": [7, 9], "bar": 0.59}
    feats = {"signature": "features", "size": 9, "k": 20, "null_group_p99": 4.0, "p_value": 0.001}
    record = {**ev, "recurrence": pixels, "changed_recurrence": changed, "held_recurrence": held,
              "feature_recurrence": feats}
    found, reason = gate(record, 3.0, 0.15)
    assert found and ("the picture of 2 of the top 20 windows is held by 123 images of the data set, set apart from "
                      "the others by a gap of 0.288 in similarity (random windows' pictures: gaps up to 0.018, "
                      "p = 0.001)") in reason
    parsed = Evidence.from_json(record)
    assert recurring_group(parsed, 0.01) is parsed.held_recurrence and trigger_group(parsed, 0.01).signature == "held"
    assert not changed_copies(parsed, 0.01)
    exact = Evidence.from_json({**record, "recurrence": {**pixels, "size": 9, "p_value": 0.001}})
    assert recurring_group(exact, 0.01) is exact.recurrence                       # exact copies come first
    # changed copies whose windows the held group mostly holds are alike as they are: the held group decides
    alike = {**changed, "p_value": 0.001, "size": 3, "members": [9, 7, 11]}
    both = Evidence.from_json({**record, "changed_recurrence": alike})
    assert recurring_group(both, 0.01) is both.held_recurrence and not changed_copies(both, 0.01)
    assert "is held by 123 images" in gate({**record, "changed_recurrence": alike}, 3.0, 0.15)[1]
    many = Evidence.from_json({**record, "changed_recurrence": {**alike, "size": 8, "members": [7, *range(10, 17)]}})
    assert recurring_group(many, 0.01) is many.changed_recurrence and changed_copies(many, 0.01)   # 1 of 8 held
    empty = Evidence.from_json({**record, "held_recurrence": {**held, "size": 0}})
    assert recurring_group(empty, 0.01) is None                                   # a p without a group holds nothing
    found, reason = gate({**record, "held_recurrence": {**held, "p_value": 0.4, "size": 0, "gap": 0.01},
                          "feature_recurrence": {**feats, "p_value": 0.5}}, 3.0, 0.15)
    assert not found and ("nor is a window's picture held across the data set (largest gap 0.010; random windows' "
                          "pictures: up to 0.018, p = 0.400)") in reason
    tiny_p = {**record, "held_recurrence": {**held, "p_value": 1e-9}}
    assert "gaps up to 0.018, p < 0.001)" in gate(tiny_p, 3.0, 0.15)[1]
    assert Evidence.from_json({"held_recurrence": pixels}).held_recurrence is None          # another test's record


def test_a_p_value_of_zero_does_not_pass_where_no_recurring_picture_is_asked_for() -> None:
    held = {"signature": "held", "size": 2, "k": 20, "p_value": 0.0, "holders": 123, "gap": 0.288}
    ev = Evidence.from_json({"held_recurrence": held, "feature_recurrence": {**held, "signature": "features"}})
    assert recurring_group(ev, 0.0) is None and trigger_group(ev, 0.0) is None
    assert recurring_group(ev, 0.01) is ev.held_recurrence


def test_the_held_pictures_response_stands_in_for_the_bootstrap_of_a_weakly_learned_trigger() -> None:
    """z below the bar and the bootstrap's p above it: a held picture whose copies beat alike windows passes the
    weak-signal path and says so; one they do not beat fails and the reason names both tests; the response speaks
    only for the held group (or a group it mostly holds), and ``weak_signal_p = 0`` asks for z."""
    null = np.r_[np.full(250, 120.0), np.full(6, 124.0)]
    ev = backdoor_evidence(np.r_[np.full(10, 140.0), np.full(10, 135.0)], null, n_scored=1500, n_flip=250,
                           n_boot=300)
    held = {"signature": "held", "size": 5, "k": 20, "null_group_p99": 0.021, "p_value": 1e-9, "holders": 495,
            "gap": 0.39, "members": [3, 4, 5, 6, 7], "bar": 0.59}
    response = {"pairs": 64, "wins": 31, "losses": 3, "holders_mean": 1.2, "others_mean": 0.3,
                "p_value": sign_test_p(31, 3)}
    record = {**ev, "z": 2.0, "p_value": 0.038, "held_recurrence": held, "held_response": response}
    found, reason = gate(record, 3.0, 0.15)
    assert found and reason.startswith("backdoor signal: the picture of 5 of the top 20 windows is held by 495")
    assert ("and the threat model responds to it (copies from 64 images that hold it against alike windows of "
            "images of their clusters: 31 moved more of the flip set, 3 fewer, p < 0.001), though z = 2.00") in reason
    assert "learned weakly" in reason
    assert Evidence.from_json(record).held_response.wins == 31
    flat = {**response, "wins": 12, "losses": 10, "p_value": sign_test_p(12, 10)}
    found, reason = gate({**record, "held_response": flat}, 3.0, 0.15)
    assert not found and "do not stand above random windows' (p = 0.038, asked: 0.01), nor does the threat model " \
        "respond to it (copies from 64 images that hold it" in reason and "12 moved more" in reason
    found, reason = gate(record, 3.0, 0.15, weak_signal_p=0.0)                  # 0: z is needed, nothing else asked
    assert not found and "nor does the threat model respond" not in reason
    pixels = {"signature": "pixels", "size": 6, "k": 20, "null_group_p99": 5.0, "p_value": 0.001,
              "members": [10, 11, 12, 13, 14, 15]}
    other = {**record, "recurrence": pixels}                                  # another picture decides: not read
    found, reason = gate(other, 3.0, 0.15)
    assert not found and "6 of the top 20 windows show one picture" in reason
    assert "nor does the threat model respond" not in reason
    mostly = {**record, "recurrence": {**pixels, "members": [3, 4, 5, 6, 20, 21]}}   # 4 of 6 in the held group
    assert gate(mostly, 3.0, 0.15)[0]
    assert not gate({**record, "held_response": None}, 3.0, 0.15)[0]           # not run: the bootstrap alone
