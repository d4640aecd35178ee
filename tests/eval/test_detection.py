"""Detection evaluation on a synthetic detect run and ground truth with hand-computed answers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.eval.eval_synthetic import RUN_ROWS, TRUTH_ROWS, write_run, write_truth
from poisonscan.errors import DataError, UsageError
from poisonscan.eval.detection import (detection_plots, evaluate_detection, flatten_metrics, map_boxes_to_frame,
                                       read_run, read_truth)

IDS = [r[0] for r in RUN_ROWS]


@pytest.fixture
def result(tmp_path: Path) -> dict:
    run = read_run(write_run(tmp_path / "run"))
    truth = read_truth(write_truth(tmp_path / "truth.csv", IDS))
    return evaluate_detection(run, truth)


def test_removal_metrics(result: dict) -> None:
    rem = result["removal"]
    # removed s0, s2 (poisons) and s3 (clean); s1 missed
    assert (rem["tp"], rem["fp"], rem["fn"], rem["removed"]) == (2, 1, 1, 3)
    assert rem["recall"] == pytest.approx(2 / 3) and rem["precision"] == pytest.approx(2 / 3)
    assert result["counts"]["poisoned"] == 3 and result["counts"]["scored"] == 4
    assert result["counts"]["scored_poisoned"] == 2


def test_score_metrics(result: dict) -> None:
    ps = result["scores"]["poison_score"]
    # unscored samples tie at the bottom: positives 9, 7, (0) vs negatives 8, 1, 0 x5 -> 7 + 6 + 2.5 of 21 pairs
    assert ps["auroc"] == pytest.approx(15.5 / 21)
    assert ps["auprc"] == pytest.approx((1 + 2 / 3 + 0.3) / 3)
    assert ps["precision_at_k"] == pytest.approx(2 / 3) and ps["k"] == 3
    assert ps["tpr_at_fpr"]["0.001"] == pytest.approx(1 / 3)
    assert ps["tpr_at_fpr"]["0.01"] == pytest.approx(1 / 3)
    cp = result["scores"]["classifier_prob"]
    assert cp["auroc"] == pytest.approx(20 / 21)
    assert cp["precision_at_k"] == pytest.approx(2 / 3)


def test_trigger_retrieval(result: dict) -> None:
    trig = result["triggers"]
    assert trig["candidates"] == 4
    assert trig["box_mapping"] == "image size from the ground truth"
    # order s0 (rank 1, correct), s3 (rank 2, clean), s1 (rank 3, misses), s4 (clean)
    top5 = trig["topk"]["5"]
    assert top5["n"] == 4 and top5["accuracy"] == pytest.approx(0.25)
    assert top5["mean_iou"] == pytest.approx(25 / 64 / 4)
    assert top5["catch_rate"] == pytest.approx(0.25)
    sp = trig["scored_poisoned"]
    assert sp["n"] == 2 and sp["overlap"] == 0.5 and sp["mean_iou"] == pytest.approx(25 / 128)


def test_per_target(result: dict) -> None:
    per = {t["target"]: t for t in result["per_target"]}
    assert set(per) == {"a", "b"}
    assert per["a"]["poisoned"] == 2 and per["a"]["recall"] == 0.5
    assert per["b"]["poisoned"] == 1 and per["b"]["recall"] == 1.0
    assert per["a"]["topk"]["5"]["accuracy"] == pytest.approx(0.25)
    assert per["b"]["topk"]["5"]["accuracy"] == 0.0  # s2 was never scored
    assert per["a"]["trigger"] == "trigger_a.png"
    rows = flatten_metrics(result)
    assert {"scope": "all", "metric": "removal.recall", "value": pytest.approx(2 / 3)} in rows
    assert any(r["scope"] == "target=b" and r["metric"] == "recall" for r in rows)


def test_map_boxes_to_frame() -> None:
    # 64 x 48 -> short side 32: width int(32 * 64 / 48) = 42, crop offset round(10 / 2) = 5
    out = map_boxes_to_frame(np.array([[30, 12, 12, 12], [0, 0, 4, 4]]), np.array([[64, 48], [64, 48]]), 32)
    assert out[0] == pytest.approx([30 * 42 / 64 - 5, 8, 12 * 42 / 64, 8])
    assert np.isnan(out[1]).all()  # cropped away
    assert np.isnan(map_boxes_to_frame(np.array([[1, 1, 2, 2]]), np.array([[np.nan, np.nan]]), 32)).all()


def test_box_sizes_read_from_source(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "c"
    folder.mkdir(parents=True)
    for sid in ("p0", "n0"):
        Image.new("RGB", (64, 64)).save(folder / f"{sid}.png")
    rows = [("c/p0.png", 5, (10, 10, 8, 8), None, 1, 1), ("c/n0.png", 1, (0, 0, 8, 8), None, 0, None)]
    run = read_run(write_run(tmp_path / "run", rows, spec=str(tmp_path / "data")))
    truth = read_truth(write_truth(tmp_path / "t.csv", ["c/p0.png", "c/n0.png"],
                                   {"c/p0.png": ("a", (20, 20, 10, 10))}, sizes=False))
    res = evaluate_detection(run, truth, topk=(1,))
    assert res["triggers"]["box_mapping"] == "image size read from the source"
    assert res["triggers"]["topk"]["1"]["mean_iou"] == pytest.approx(25 / 64)
    assert res["scores"]["classifier_prob"] is None


def test_poisons_only_truth_and_unknown_size(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "run"))
    truth_path = write_truth(tmp_path / "t.csv", list(TRUTH_ROWS), sizes=False)
    res = evaluate_detection(run, read_truth(truth_path))
    assert res["counts"]["poisoned"] == 3 and res["counts"]["clean"] == 7
    assert any("poisons only" in w for w in res["warnings"])
    # no image size anywhere: boxes that fit in 32 x 32 are taken as already mapped (s0's and s1's; not s2's)
    assert any("3 trigger box(es) without an image size: 2 that fit" in w for w in res["warnings"])
    assert res["triggers"]["box_mapping"] == "assumed already in the frame"


def test_errors(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "run"))
    with pytest.raises(UsageError, match="absent from the run"):
        evaluate_detection(run, read_truth(write_truth(tmp_path / "t1.csv", IDS, extra=["zz"])))
    with pytest.raises(UsageError, match="not in the ground truth"):
        evaluate_detection(run, read_truth(write_truth(tmp_path / "t2.csv", IDS[:-1])))
    empty = write_run(tmp_path / "empty", [(sid, None, None, None, 0, None) for sid in IDS])
    with pytest.raises(UsageError, match="no scores"):
        read_run(empty)
    (tmp_path / "norun").mkdir()
    with pytest.raises(UsageError, match="not a detect run folder"):
        read_run(tmp_path / "norun")
    (write_run(tmp_path / "noscores") / "scores.csv").unlink()
    with pytest.raises(UsageError, match="no scores.csv"):
        read_run(tmp_path / "noscores")
    bad = tmp_path / "bad.csv"
    bad.write_text("sample_id,poisoned\nx,2\n")
    with pytest.raises(DataError, match="poisoned must be 0 or 1"):
        read_truth(bad)
    (tmp_path / "nocol.csv").write_text("id,poisoned\nx,1\n")
    with pytest.raises(DataError, match="lacks column"):
        read_truth(tmp_path / "nocol.csv")


def test_plots(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "run"))
    truth = read_truth(write_truth(tmp_path / "truth.csv", IDS))
    pngs = detection_plots(run, truth)
    assert set(pngs) == {"pr_curve.png", "roc_curve.png", "poison_score_hist.png", "classifier_prob_hist.png"}
    for data in pngs.values():
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_truth_in_poison_format_with_whole_image_trigger(tmp_path: Path) -> None:
    # `poison` writes x, y, w, h plus label and target_name; blend/ctrl boxes are the whole image
    truth = tmp_path / "gt.csv"
    truth.write_text("sample_id,source_id,label,poisoned,target,target_name,trigger,attack,x,y,w,h\n"
                     "p0,p0,1,1,6,garbage truck,trigger_10.png,blend,0,0,120,80\n"
                     "n0,n0,0,0,,,,,,,,\n")
    rows = [("p0", 5, (0, 0, 16, 16), 0.8, 1, 1), ("n0", 1, (8, 8, 16, 16), 0.1, 0, 2)]
    res = evaluate_detection(read_run(write_run(tmp_path / "run", rows)), read_truth(truth), topk=(1, 2))
    assert res["triggers"]["box_mapping"] == "whole-image trigger"
    # the trigger is the whole 32 x 32 frame: the 16 x 16 window catches a quarter of it
    assert res["triggers"]["topk"]["1"] == {"n": 1, "accuracy": 1.0, "mean_iou": 0.25, "catch_rate": 0.25,
                                            "poisoned": 1}
    assert res["per_target"][0]["target"] == "6" and res["per_target"][0]["target_name"] == "garbage truck"


def test_removal_score_column_is_evaluated_when_present_and_null_for_older_runs(tmp_path: Path) -> None:
    older = read_run(write_run(tmp_path / "old"))
    truth = read_truth(write_truth(tmp_path / "truth.csv", IDS))
    assert older.removal_score is None
    assert evaluate_detection(older, truth)["scores"]["removal_score"] is None
    # today's runs add the neighbour mean and the removal score after classifier_prob
    path = write_run(tmp_path / "new") / "scores.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    removal = [0.95, 0.8, 0.75, 0.3, 0.1, 0.05, 0.2, 0.1, 0.0, 0.0]   # s1 rescued, s3 dropped: perfect ranking
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0], "neighbour_prob", "removal_score"])
        w.writeheader()
        for row, r in zip(rows, removal):
            w.writerow({**row, "neighbour_prob": r, "removal_score": r})
    run = read_run(tmp_path / "new")
    assert run.removal_score is not None and run.removal_score.tolist() == removal
    res = evaluate_detection(run, truth)
    assert res["scores"]["removal_score"]["auroc"] == pytest.approx(1.0)
    assert res["scores"]["classifier_prob"]["auroc"] == pytest.approx(20 / 21)
    assert res["per_target"][0]["removal_score"]["auroc"] == pytest.approx(1.0)
    assert "removal_score_hist.png" in detection_plots(run, truth)


def test_truth_rows_match_full_paths_by_their_relative_id(tmp_path: Path) -> None:
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text("sample_id,poisoned\ncat/x.png,1\ndog/x.png,0\nx.png,0\n")
    truth = read_truth(truth_csv)
    rows = truth.rows_of(["cat/x.png", "/data/poisoned/train/dog/x.png", "/elsewhere/cat/x.png", "/data/x.png",
                          "bird/y.png", "C:\\data\\train\\cat\\x.png"])
    assert rows.tolist() == [0, 1, 0, 2, -1, 0]


def test_the_picture_match_column_is_evaluated_when_the_picture_was_searched_for(tmp_path: Path) -> None:
    truth = read_truth(write_truth(tmp_path / "truth.csv", IDS))
    path = write_run(tmp_path / "matched") / "scores.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    match = [0.95, 0.9, 0.92, 0.3, 0.1, 0.05, 0.2, 0.1, 0.0, 0.0]   # the removal's score, no classifier
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0], "picture_match"])
        w.writeheader()
        for row, m in zip(rows, match):
            w.writerow({**row, "classifier_prob": "", "picture_match": m})
    run = read_run(tmp_path / "matched")
    res = evaluate_detection(run, truth)
    assert res["scores"]["classifier_prob"] is None and res["scores"]["picture_match"]["auroc"] == pytest.approx(1.0)
    assert res["per_target"][0]["picture_match"]["auroc"] == pytest.approx(1.0)
    plots = detection_plots(run, truth)
    assert "picture_match_hist.png" in plots and "classifier_prob_hist.png" not in plots
    assert read_run(write_run(tmp_path / "plain")).picture_match is None


def test_truth_naming_a_sample_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("sample_id,poisoned\n" + "".join(f"s{i},0\n" for i in range(50_000)) + "s49999,1\n")
    with pytest.raises(DataError, match="lists sample 's49999' more than once"):   # found in one pass
        read_truth(path)
