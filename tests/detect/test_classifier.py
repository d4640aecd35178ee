"""Poison classifier: split, batched augmentation, training on pasted triggers, ensemble, safetensors round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.detect.detect_toys import trigger_batch, trigger_u8, one_torch_thread  # noqa: F401

from poisonscan.detect import augment as A
from poisonscan.detect import classifier as C
from poisonscan.detect import poison_net as N
from poisonscan.detect.decision import DecisionSettings
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.records import Evidence, Matching, PictureMatch
from poisonscan.errors import UsageError
from poisonscan.runtime import setup_runtime

TINY = (8, 16, 32, 64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runtime():
    return setup_runtime("cpu")


def test_split_orders_by_score_and_leaves_out_top_and_validation():
    scores = np.full(100, np.nan)
    scores[:30] = np.arange(30)                         # 29 is the best
    top = [29, 28, 27, 26, 25]
    split = C.classifier_split(scores, top, drop_top=0.10, seed=0)
    assert list(split.val_pos) == top
    assert len(split.val_neg) == 5
    assert np.isnan(scores[split.val_neg]).all()      # unscored images rank lowest
    excluded = set(range(20, 30))                       # top 10% of 100 images by score
    assert not excluded & set(split.train.tolist())
    assert not set(split.val_neg.tolist()) & set(split.train.tolist())
    assert len(split.train) == 100 - 10 - 5
    again = C.classifier_split(scores, top, drop_top=0.10, seed=0)
    assert np.array_equal(split.val_neg, again.val_neg)  # seeded tie-breaking


def test_split_leaves_excluded_top_k_images_out_of_training_and_validation():
    """Top-k images outside the recurring group are neither positives nor negatives, whatever --drop-top is."""
    scores = np.arange(100, dtype=np.float64)
    split = C.classifier_split(scores, [99, 98, 97], drop_top=0.0, seed=0, exclude=[96, 95])
    assert list(split.val_pos) == [99, 98, 97]
    used = set(split.train.tolist()) | set(split.val_neg.tolist())
    assert not used & {95, 96, 97, 98, 99} and len(used) == 95


def test_split_holdout_adds_random_pool_images_to_the_validation_negatives():
    scores = np.full(1000, np.nan)
    scores[:300] = np.arange(300)
    top = list(range(299, 289, -1))
    plain = C.classifier_split(scores, top, drop_top=0.10, seed=0)
    split = C.classifier_split(scores, top, drop_top=0.10, seed=0, holdout=0.1)
    n_hold = round(0.1 * len(plain.train))
    assert len(split.val_neg) == len(plain.val_neg) + n_hold
    assert set(plain.val_neg.tolist()) <= set(split.val_neg.tolist())    # the bottom k stay
    assert len(split.train) == len(plain.train) - n_hold
    assert not set(split.train.tolist()) & set(split.val_neg.tolist())
    assert set(split.train.tolist()) | set(split.val_neg.tolist()) == \
        set(plain.train.tolist()) | set(plain.val_neg.tolist())        # nothing lost, nothing added
    held = sorted(set(split.val_neg.tolist()) - set(plain.val_neg.tolist()))
    assert any(scores[i] == scores[i] for i in held)                     # drawn across the pool, scored or not
    again = C.classifier_split(scores, top, drop_top=0.10, seed=0, holdout=0.1)
    assert np.array_equal(split.val_neg, again.val_neg) and np.array_equal(split.train, again.train)


def test_split_refuses_too_few_images():
    with pytest.raises(UsageError, match="too few images"):
        C.classifier_split(np.arange(4, dtype=float), [3, 2, 1], drop_top=0.5)


def test_paste_resized_writes_the_patch_exactly_where_asked():
    x = torch.zeros(3, 3, 16, 16)
    patches = torch.ones(2, 3, 4, 4)
    patches[1] *= 0.5
    which = torch.tensor([0, -1, 1])
    out = A.paste_resized(x, patches, which, torch.tensor([4.0, 4.0, 8.0]), torch.tensor([2.0, 0.0, 8.0]),
                          torch.tensor([3.0, 0.0, 0.0]))
    assert out[0, :, 3:7, 2:6].eq(1).all() and out[0].sum() == 3 * 16
    assert out[1].eq(0).all()                            # -1: left unchanged
    assert torch.allclose(out[2, :, 0:8, 8:16], torch.full((3, 8, 8), 0.5)) and out[2].sum() == 3 * 64 * 0.5


def test_a_turned_paste_is_the_patch_turned_about_its_centre():
    x = torch.zeros(2, 3, 16, 16)
    patch = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).expand(1, 3, 8, 8) / 64
    which, sides, at = torch.tensor([0, 0]), torch.tensor([8.0, 8.0]), torch.tensor([4.0, 4.0])
    quarter = A.paste_resized(x, patch, which, sides, at, at, torch.tensor([math.pi / 2, 0.0]))
    upright = A.paste_resized(x, patch, which, sides, at, at)
    assert torch.allclose(quarter[1], upright[1])                           # no turn: upright
    turned = quarter[0, :, 4:12, 4:12]
    assert torch.allclose(turned, torch.rot90(patch[0], 1, dims=(1, 2)), atol=1e-5) or \
        torch.allclose(turned, torch.rot90(patch[0], -1, dims=(1, 2)), atol=1e-5)
    assert float(quarter[0].sum()) == pytest.approx(float(upright[0].sum()), rel=1e-5)   # the square, no more
    half = A.paste_resized(x, patch, which, sides, at, at, torch.tensor([math.pi / 4, 0.0]))
    assert half[0, :, 4, 4].eq(0).all() and half[0, :, 8, 8].gt(0).all()   # a diamond: its corner cut off


def test_random_paste_respects_sizes_margins_and_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 3, 64, 64)
    y, labels = A.random_paste(x, torch.ones(1, 3, 10, 10), 0.5, 20 / 224, 80 / 224, 10 / 224, g)
    changed = y.flatten(1).abs().sum(1) > 0
    assert torch.equal(changed, labels.bool()) and 10 < int(labels.sum()) < 54
    margin = int(10 / 224 * 64)
    for i in labels.nonzero().flatten().tolist():
        rows, cols = y[i, 0].nonzero().unbind(1)
        side = int(rows.max() - rows.min() + 1)
        assert 5 <= side <= 23
        assert rows.min() >= margin and cols.min() >= margin
        assert rows.max() < 64 - margin and cols.max() < 64 - margin


def test_decoys_paste_a_window_of_another_image_and_stay_negative():
    g = torch.Generator().manual_seed(0)
    n = 32
    x = torch.arange(1, n + 1, dtype=torch.float32).div(n + 1)[:, None, None, None].expand(n, 3, 40, 40).clone()
    windows = A.decoy_windows(x, 6, 20 / 224, 80 / 224, g)
    assert windows.shape == (n, 3, 6, 6)
    assert torch.allclose(windows, x.roll(1, 0)[:, :, :6, :6])          # image i gets a window of image i - 1
    trigger = torch.zeros(1, 3, 6, 6)
    y, labels = A.random_paste(x, trigger, 0.5, 20 / 224, 80 / 224, 10 / 224, g, decoy_prob=1.0)
    pos, neg = labels.bool(), ~labels.bool()
    assert 5 < int(pos.sum()) < n - 5
    assert (y[pos].flatten(1) == 0).any(1).all()                         # the trigger (zeros) on positives
    changed = (y != x).flatten(1).any(1)
    assert changed[neg].all() and not (y[neg] == 0).any()                # every negative got a decoy, no trigger
    for i in neg.nonzero().flatten().tolist():                           # ... whose pixels are image i - 1's
        assert torch.allclose(y[i][y[i] != x[i]], x[i - 1, 0, 0, 0].expand(int((y[i] != x[i]).sum())))
    none = A.random_paste(x, trigger, 0.0, 20 / 224, 80 / 224, 10 / 224, torch.Generator().manual_seed(0))[0]
    assert torch.equal(none, x)                                          # decoy_prob 0: PatchSearch's recipe


def test_colour_augment_keeps_range_shape_and_is_seeded():
    x = torch.rand(16, 3, 24, 24)
    a = A.colour_augment(x, torch.Generator().manual_seed(3))
    b = A.colour_augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    grey = A.colour_augment(x, torch.Generator().manual_seed(0), p_jitter=0, p_gray=1, p_flip=0)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    flipped = A.colour_augment(x, torch.Generator().manual_seed(0), p_jitter=0, p_gray=0, p_flip=1)
    assert torch.allclose(flipped, x.flip(3), atol=1e-6)


def test_training_batch_is_normalised_with_labels():
    imgs, _ = trigger_batch(8, poisoned=False)
    x, y = C.training_batch(imgs, trigger_u8()[None], C.ClassifierConfig(), torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert set(y.tolist()) <= {0, 1} and x.min() < -1 and x.max() > 1


def _trigger_task() -> tuple[torch.Tensor, torch.Tensor, C.ClassifierSplit]:
    """10 triggered images ranked on top, 200 clean ones; patches = 9 x 9 windows around the triggers."""
    clean, _ = trigger_batch(200, seed=1, poisoned=False)
    pois, corners = trigger_batch(10, seed=2, poisoned=True)
    images = torch.cat([pois, clean])
    scores = np.full(len(images), np.nan)
    scores[:10], scores[10:30] = 30, 1
    boxes = torch.stack([corners[:, 0] - 1, corners[:, 1] - 1, torch.full((10,), 9), torch.full((10,), 9)], 1)
    patches = cut_windows(pois, boxes.clamp(min=0))
    return images, patches, C.classifier_split(scores, list(range(5)), 0.10)


def test_classifier_learns_pasted_triggers_and_finds_real_ones(runtime):
    images, patches, split = _trigger_task()
    cfg = C.ClassifierConfig(iterations=150, widths=TINY, eval_every=20, decoys=0.0, ensemble=1)   # the paper's recipe
    res = C.train_poison_classifier(images, patches, split, cfg, runtime, quiet=True)
    assert res.val_f1 == 1.0 and len(res.models) == 1
    assert 1 <= res.best_iteration[0] <= res.iterations[0] <= 150
    assert res.history and {"member", "iteration", "train_loss", "val_loss", "val_f1"} <= set(res.history[0])
    # unseen images: the real trigger pasted by the attacker (not a resized candidate window) vs clean
    triggered, _ = trigger_batch(40, seed=7, poisoned=True)
    clean, _ = trigger_batch(40, seed=8, poisoned=False)
    p_trig = C.predict_poison(res.models, triggered, runtime, batch_size=16)
    p_clean = C.predict_poison(res.models, clean, runtime, batch_size=16)
    assert p_trig.dtype == np.float32 and p_trig.shape == (40,)
    assert (p_trig > 0.5).mean() >= 0.9 and (p_clean > 0.5).mean() <= 0.1


def test_decoys_keep_clean_images_with_a_foreign_square_off_the_list(runtime):
    """Clean images holding a pasted window of another image (sharp edges, foreign content, no trigger) are what a
    classifier trained on plain negatives confuses with a pasted trigger; the decoy-trained one keeps them."""
    images, patches, split = _trigger_task()
    cfg = C.ClassifierConfig(iterations=400, widths=TINY, eval_every=20, decoys=0.5, ensemble=1)
    res = C.train_poison_classifier(images, patches, split, cfg, runtime, quiet=True)
    assert len(res.history) >= 1 and res.val_f1 == 1.0
    clean, _ = trigger_batch(60, seed=9, poisoned=False)
    squares = C.decoy_validation(clean, patches, C.ClassifierConfig(seed=5))
    assert not torch.equal(squares, clean)
    triggered, _ = trigger_batch(40, seed=7, poisoned=True)
    assert (C.predict_poison(res.models, squares, runtime) > 0.5).mean() <= 0.1
    assert (C.predict_poison(res.models, triggered, runtime) > 0.5).mean() >= 0.9


def test_refinement_drops_the_real_poisons_hidden_among_the_negatives(runtime):
    images, patches, split = _trigger_task()
    hidden, _ = trigger_batch(12, seed=3, poisoned=True)                 # unscored poisons: in the training pool
    images = torch.cat([images, hidden])
    n = len(images)
    split = C.ClassifierSplit(np.concatenate([split.train, np.arange(n - 12, n)]), split.val_pos, split.val_neg)
    cfg = C.ClassifierConfig(iterations=300, widths=TINY, eval_every=20, ensemble=1)
    once = C.train_with_refinement(images, patches, split, cfg, runtime, rounds=1, quiet=True)
    assert once.dropped == [] and len(once.train) == len(split.train) and once.probs.shape == (n,)
    twice = C.train_with_refinement(images, patches, split, cfg, runtime, rounds=2, quiet=True)
    assert len(twice.dropped) == 1 and twice.dropped[0] == len(split.train) - len(twice.train)
    assert np.isin(np.arange(n - 12, n), twice.train).sum() <= 2          # the hidden poisons left the pool ...
    assert np.isin(split.train[split.train < n - 12], twice.train).mean() >= 0.95   # ... the clean ones stayed
    assert (twice.probs[n - 12:] > 0.5).mean() >= 0.9
    nbrs = np.stack([np.roll(np.arange(n), -1), np.roll(np.arange(n), 1)], axis=1)   # any index: the rule runs
    by_removal = C.train_with_refinement(images, patches, split, cfg, runtime, rounds=2, quiet=True, neighbours=nbrs)
    assert len(by_removal.dropped) == 1 and np.isin(np.arange(n - 12, n), by_removal.train).sum() <= 2


def test_refinement_by_removal_score_also_drops_the_half_missed_poisons():
    """A poison the classifier half-misses (P 0.3) among flagged neighbours leaves the negatives only when the
    refinement looks at the removal score; a flagged image among clean neighbours leaves either way."""
    probs = np.array([0.3, 0.9, 0.95, 0.9, 0.6, 0.05, 0.02, 0.04, 0.01, 0.03], dtype=np.float32)
    nbrs = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [5, 6, 7],
                     [6, 7, 8], [5, 7, 8], [5, 6, 8], [5, 6, 7], [5, 6, 7]])
    by_p = C.refinement_flags(probs, 0.5)
    by_removal = C.refinement_flags(probs, 0.5, nbrs)
    assert by_p.tolist() == [False, True, True, True, True, False, False, False, False, False]
    assert by_removal.tolist() == [True, True, True, True, True, False, False, False, False, False]
    assert C.refinement_flags(probs, 0.5, nbrs[:, :0]).tolist() == by_p.tolist()     # k = 0: P alone


def test_early_stopping_and_ensemble_and_round_trip(runtime, tmp_path):
    images, patches, split = _trigger_task()
    cfg = C.ClassifierConfig(iterations=400, widths=TINY, eval_every=10, patience=2, min_iterations=40, ensemble=2)
    res = C.train_poison_classifier(images, patches, split, cfg, runtime, quiet=True)
    assert len(res.models) == 2 and all(40 <= it < 400 for it in res.iterations)   # stopped early, not too early
    path = tmp_path / "clf.safetensors"
    path.write_bytes(N.classifier_bytes(res.models, image_size=32, threshold=0.5))
    models, meta = N.load_classifier(path)
    assert len(models) == 2 and meta == {"image_size": 32, "threshold": 0.5}
    probe = images[:12]
    assert np.allclose(C.predict_poison(models, probe, runtime), C.predict_poison(res.models, probe, runtime),
                       atol=1e-5)


def _group_evidence() -> Evidence:
    """Top-5 [10, 11, 12, 13, 14], of which 10, 12 and 14 show one picture (p 0.001)."""
    group = {"signature": "pixels", "size": 3, "k": 5, "null_group_p99": 2.0, "p_value": 0.001,
             "members": [10, 12, 14], "bar": 0.8}
    return Evidence.from_json({"z": 12.0, "effect": 0.5, "top_k": [10, 11, 12, 13, 14], "recurrence": group})


def _matching(contain: int) -> Matching:
    return Matching(searched=True, picture_match=PictureMatch(threshold=0.9, bar=0.8, outlier_bar=0.9, templates=3,
                                                              contain=contain))


def test_positives_are_the_group_unless_no_image_holds_its_picture() -> None:
    ev, settings = _group_evidence(), C.ClassifierSettings()
    assert C.classifier_positives(settings, ev, 0.01) == [10, 12, 14]
    assert C.classifier_positives(settings, ev, 0.01, _matching(contain=30)) == [10, 12, 14]
    # a picture no image holds apart from the data is a common pattern: the other top-k windows are learned
    assert C.classifier_positives(settings, ev, 0.01, _matching(contain=0)) == [11, 13]
    assert C.classifier_positives(C.ClassifierSettings(positives="all"), ev, 0.01, _matching(0)) == [10, 11, 12, 13,
                                                                                                      14]


def test_positives_are_the_group_alike_to_the_threat_model_where_no_picture_recurs() -> None:
    doc = _group_evidence().to_json()
    feats = {"signature": "features", "size": 2, "k": 5, "null_group_p99": 1.0, "p_value": 0.004, "members": [13, 11]}
    weak_pixels = {**doc["recurrence"], "p_value": 0.2}
    ev = Evidence.from_json({**doc, "recurrence": weak_pixels, "feature_recurrence": feats})
    settings = C.ClassifierSettings()
    assert C.classifier_positives(settings, ev, 0.01) == [11, 13]              # in top-k order
    assert C.classifier_positives(settings, ev, 0.001) == [10, 11, 12, 13, 14]  # no group at that p: all top-k
    both = Evidence.from_json({**doc, "feature_recurrence": feats})
    assert C.classifier_positives(settings, both, 0.01) == [10, 12, 14]        # the recurring picture comes first


def test_the_classifier_is_skipped_only_where_the_match_makes_the_removal() -> None:
    ev, default = _group_evidence(), C.ClassifierSettings()
    held, none = _matching(contain=30), _matching(contain=0)
    assert C.skip_reason(default, DecisionSettings(), ev, held).startswith("the picture match makes the removal")
    assert C.skip_reason(C.ClassifierSettings(train="always"), DecisionSettings(), ev, held) == ""
    assert C.skip_reason(default, DecisionSettings(), ev, Matching()) == ""              # nothing searched for
    assert C.skip_reason(default, DecisionSettings(), ev, none) == ""                    # the effect carries it
    weak = Evidence.from_json({**ev.to_json(), "effect": 0.01})                          # the picture alone
    assert C.skip_reason(default, DecisionSettings(), weak, none).startswith("no image holds the recurring picture")
    assert C.skip_reason(default, DecisionSettings(force=True), weak, none) == ""       # --force: it trains


def test_changed_copies_are_the_positives_and_the_classifier_trains_beside_the_match() -> None:
    """A picture changed copy by copy that images beyond the group hold: the match finds the copies close to the
    group's windows, so the classifier still trains, on the group's windows."""
    doc = _group_evidence().to_json()
    changed = {"signature": "changed", "size": 2, "k": 5, "null_group_p99": 1.0, "p_value": 0.002,
               "members": [14, 11], "bar": 0.4}
    ev = Evidence.from_json({**doc, "recurrence": {**doc["recurrence"], "p_value": 0.2}, "changed_recurrence": changed,
                             "effect": 0.01})
    settings = C.ClassifierSettings()
    assert C.classifier_positives(settings, ev, 0.01) == [11, 14]
    assert C.skip_reason(settings, DecisionSettings(), ev, _matching(contain=30)) == ""          # it trains
    assert C.skip_reason(settings, DecisionSettings(), ev, _matching(contain=0)).startswith("no image holds")
