"""Linear probe: stratified subsets, training on separable features, ACC/FP/ASR report, class resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from poisonscan.errors import DataError, UsageError
from poisonscan.eval.probe import (LinearProbe, check_labels, confusion_csv, linear_probe, probe_predict,
                                   probe_report, resolve_class, stratified_subset)


def _gaussians(n: int, n_classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * 3
    y = rng.integers(0, n_classes, n)
    x = centres[y] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_stratified_subset_is_seeded_and_stratified() -> None:
    labels = np.repeat([0, 1, 2], [100, 50, 3])
    idx = stratified_subset(labels, 0.1, seed=1)
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [10, 5, 1]  # at least one of the rare class
    assert np.array_equal(idx, stratified_subset(labels, 0.1, seed=1))
    assert not np.array_equal(idx, stratified_subset(labels, 0.1, seed=2))
    with pytest.raises(UsageError):
        stratified_subset(labels, 0.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_probe_learns_separable_features(optimizer: str) -> None:
    xt, yt = _gaussians(80, seed=0)
    xv, yv = _gaussians(400, seed=1)
    model = linear_probe(xt, yt, 4, epochs=20, batch_size=32, optimizer=optimizer, seed=0)
    assert (probe_predict(model, xv) == yv).mean() > 0.97


def test_probe_is_seeded() -> None:
    xt, yt = _gaussians(40, seed=0)
    a, b, c = (linear_probe(xt, yt, 4, epochs=2, batch_size=16, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.linear.weight, b.linear.weight) and not torch.equal(a.linear.weight, c.linear.weight)


def _fixed_probe(pred_table: dict[int, int], n_classes: int = 3) -> LinearProbe:
    """A probe whose prediction for one-hot feature e_i is ``pred_table[i]``."""
    model = LinearProbe(torch.zeros(n_classes), torch.ones(n_classes), n_classes)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        for i, j in pred_table.items():
            model.linear.weight[j, i] = 1.0
    return model.eval()


def test_probe_report_by_hand() -> None:
    eye = np.eye(3, dtype=np.float32)
    model = _fixed_probe({0: 0, 1: 1, 2: 2})
    # clean val: labels 0,0,1,1,2,2 with features of their class except one class-0 image that looks like class 2
    clean_x = eye[[0, 2, 1, 1, 2, 2]]
    labels = np.array([0, 0, 1, 1, 2, 2])
    # patched: everything looks like class 2 except one class-1 image
    patched_x = eye[[2, 2, 1, 2, 2, 2]]
    rep = probe_report(model, clean_x, labels, [2], patched_x, labels, ["a", "b", "c"])
    assert rep["clean"]["accuracy"] == pytest.approx(5 / 6)
    assert rep["patched"]["accuracy"] == pytest.approx(3 / 6)
    t = rep["targets"][0]
    assert t["name"] == "c" and t["non_target_clean"] == 4 and t["fp_clean"] == 1
    assert t["fp_rate_clean"] == pytest.approx(0.25)
    assert t["fp_patched"] == 3 and t["asr"] == pytest.approx(3 / 4)
    assert rep["clean"]["confusion"] == [[1, 0, 1], [0, 2, 0], [0, 0, 2]]
    text = confusion_csv(rep["clean"]["confusion"], ["a", "b", "c"])
    assert text.splitlines()[0] == "true \\ predicted,a,b,c" and text.splitlines()[1] == "a,1,0,1"
    with pytest.raises(UsageError):
        probe_report(model, clean_x, labels, [5])


def test_resolve_class_and_labels(tmp_path: Path) -> None:
    names = ["n01", "n02", "n03"]
    assert resolve_class("n02", names) == 1
    assert resolve_class("2", names) == 2
    (tmp_path / "classes.tsv").write_text("index\twnid\tname\n0\tn01\ttench\n1\tn02\tgarbage truck\n")
    assert resolve_class("Garbage Truck", names, tmp_path / "train") == 1
    with pytest.raises(UsageError, match="unknown target class"):
        resolve_class("cat", names)
    with pytest.raises(UsageError):
        resolve_class("7", names)
    assert check_labels([0, 1], "x").tolist() == [0, 1]
    with pytest.raises(DataError, match="no label"):
        check_labels([0, None], "x")
