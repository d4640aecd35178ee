"""The outputs stage of a detect run: ``scores.csv`` (columns in detect/scores.py), ``removed.txt``, ``errors.csv``,
the gallery, ``summary.json`` (documented in docs/outputs.md), ``report.html``, and the exit code (``--fail-on``)."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonscan import __version__
from poisonscan.config import DetectConfig
from poisonscan.data.store import ImageStore, write_errors_csv
from poisonscan.data.writers import write_removal_list
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.records import (ClassifierResult, Decision, Evidence, Matching, Recurrence, SearchResult,
                                      Verification)
from poisonscan.detect.scores import SCORE_COLUMNS
from poisonscan.report.gallery import write_gallery
from poisonscan.report.html import write_report
from poisonscan.runs import RunDir

#: the keys of ``summary.json``, in order (docs/outputs.md documents each; a test keeps the three equal)
SUMMARY_KEYS = ("command", "method", "run_dir", "version", "source", "model", "counts", "clusters", "search", "top_k",
                "top_clusters", "evidence", "verdict", "classifier", "picture_match", "timings", "cost", "files", "fail_on",
                "fail_on_unreadable", "exit_code", "exit_reasons")


def unreadable_limit(fail_on: float | None, fail_on_unreadable: int | None) -> int | None:
    """The most unscanned (unreadable) samples a run may have before it exits 1: ``--fail-on-unreadable`` when
    given, else 0 when ``--fail-on`` is given (a CI gate fails closed on samples it could not scan), else none."""
    if fail_on_unreadable is not None:
        return int(fail_on_unreadable)
    return 0 if fail_on is not None else None


def fail_on_exceeded(fail_on: float | None, removed: int, scanned: int) -> bool:
    """``--fail-on``: a value below 1 is a fraction of the scanned images, from 1 up a count; exceeded = strictly
    more removed."""
    if fail_on is None:
        return False
    if fail_on < 1:
        return scanned > 0 and removed / scanned > fail_on
    return removed > fail_on


def _fmt(values: np.ndarray | None, i: int) -> str:
    return "" if values is None else f"{float(values[i]):.6f}"


@dataclass
class ScanResult:
    """What the outputs are written from: the store and clustering, the model's description, and every stage's
    record."""

    store: ImageStore
    clustering: Clustering
    model: dict[str, Any]           # checkpoint, arch, image_size, metadata
    search: SearchResult
    evidence: Evidence
    matching: Matching
    classifier: ClassifierResult
    verification: Verification
    decision: Decision


def _scores_csv(r: ScanResult, ranks: dict[int, int]) -> str:
    by_index = {e.index: e for e in r.search.scored}
    verify = {e.index: e.poison_score for e in r.verification.candidates}
    cl, dec, probs = r.clustering, r.decision, r.classifier.probs
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SCORE_COLUMNS)
    for i, sid in enumerate(r.store.ids):
        e = by_index.get(i)
        label = r.store.labels[i]
        box = e.box if e else ["", "", "", ""]
        w.writerow([i, sid, "" if label is None else label, int(cl.labels[i]), f"{float(cl.distances[i]):.6f}",
                    e.poison_score if e else "", *box, _fmt(probs, i), _fmt(dec.neighbour_probs, i),
                    _fmt(dec.removal_score, i), verify.get(i, ""), _fmt(r.matching.match, i),
                    int(dec.removed[i]), ranks.get(i, "")])
    return buf.getvalue()


def _top_clusters(r: ScanResult, limit: int = 10) -> list[dict[str, Any]]:
    cl = r.clustering
    sizes = cl.sizes()
    rem = np.bincount(cl.labels, weights=r.decision.removed.astype(np.float64),
                      minlength=cl.n_clusters).astype(np.int64)
    best: dict[int, int] = {}
    for e in r.search.scored:
        c = int(cl.labels[e.index])
        best[c] = max(best.get(c, -1), e.poison_score)
    order = sorted(range(cl.n_clusters), key=lambda c: (-rem[c], -best.get(c, -1), c))
    return [{"cluster": c, "size": int(sizes[c]), "removed": int(rem[c]), "max_score": best.get(c)}
            for c in order[:limit]]


def _group(rec: Recurrence | None) -> dict[str, Any] | None:
    """A recurrence test's record as ``summary.json`` gives it."""
    keys = ("size", "k", "p_value", "null_group_median", "null_group_p99")
    if rec is not None and rec.signature == "held":
        keys += ("holders", "gap")
    return {k: getattr(rec, k) for k in keys} if rec is not None else None


def summary_of(cfg: DetectConfig, run_dir: str, r: ScanResult, timings: dict[str, float],
               forwards: dict[str, int]) -> dict[str, Any]:
    """``summary.json`` of a run (keys in :data:`SUMMARY_KEYS`); ``forwards``: the threat model's forwards (images
    encoded) per stage and their ``total``."""
    store, ev, clf, ver, dec = r.store, r.evidence, r.classifier, r.verification, r.decision
    scores, boxes = r.search.scores, r.search.boxes
    top = [int(i) for i in ev.top_k]
    n, n_removed = len(store), dec.n_removed
    settings = cfg.decision
    evidence = {k: getattr(ev, k) for k in ("topk_median", "null_median", "z", "p_value", "effect", "best_flip_share",
                                            "null_size", "null_pool", "null_pool_size", "null_excluded_clusters",
                                            "z_scale", "topk_spread")}
    evidence.update(min_evidence=settings.min_evidence, min_effect=settings.min_effect,
                    backdoor_found=dec.backdoor_found, max_recurrence_p=settings.max_recurrence_p, forced=dec.forced,
                    recurrence=_group(ev.recurrence), changed_recurrence=_group(ev.changed_recurrence),
                    held_recurrence=_group(ev.held_recurrence),
                    held_response=ev.held_response.to_json() if ev.held_response is not None else None,
                    feature_recurrence=_group(ev.feature_recurrence),
                    reason=dec.reason)
    meta = {k: v for k, v in r.model["metadata"].items() if k not in ("missing_keys", "unexpected_keys")}
    n_unreadable = len(store.errors)
    limit = unreadable_limit(cfg.fail_on, cfg.fail_on_unreadable)
    exit_reasons = ([f"{n_removed} removed, over --fail-on {cfg.fail_on:g}"]
                    if fail_on_exceeded(cfg.fail_on, n_removed, n) else [])
    if limit is not None and n_unreadable > limit:
        exit_reasons.append(f"{n_unreadable} sample(s) could not be read and were not scanned, over "
                            f"--fail-on-unreadable {limit}")
    probs = clf.probs
    summary = {
        "command": "detect", "method": cfg.search.method, "run_dir": run_dir, "version": __version__,
        "source": {"spec": cfg.data, "kind": store.source.get("kind"), "n_samples": n + len(store.errors),
                   "n_errors": len(store.errors)},
        "model": {"checkpoint": cfg.model, "arch": r.model["arch"], "image_size": r.model["image_size"],
                  "metadata": meta},
        "counts": {"scanned": n, "scored": len(scores), "removed": n_removed,
                   "removed_fraction": n_removed / n if n else 0.0, "errors": n_unreadable,
                   "unreadable": n_unreadable},
        "clusters": {"requested": cfg.clusters, "n_clusters": r.clustering.n_clusters,
                     "flip_set": len(r.search.flip_set)},
        "search": {"rounds": [{k: x[k] for k in ("round", "live_clusters", "scored")} for x in r.search.rounds],
                   "n_scored": len(scores)},
        "top_k": [{"rank": k + 1, "index": i, "id": store.ids[i], "cluster": int(r.clustering.labels[i]),
                   "poison_score": scores[i], "box": boxes[i]} for k, i in enumerate(top)],
        "top_clusters": _top_clusters(r),
        "evidence": evidence,
        "verdict": dec.verdict,
        "classifier": {"trained": bool(clf.trained), "skipped": clf.skipped or None, "ensemble": int(clf.ensemble),
                       "iterations": int(clf.iterations), "val_f1": clf.val_f1,
                       "rounds": clf.rounds, "refine_by": clf.refine_by,
                       "threshold": float(clf.threshold), "neighbours": int(settings.neighbours),
                       "flag_rate": None if probs is None else float(np.mean(probs)),
                       "removed_by_classifier_alone": None if probs is None else
                       int((probs > settings.threshold).sum()),
                       "verification": {"min_prob": ver.min_prob, "bar": ver.bar, "n_candidates": ver.n_candidates,
                                        "n_verified": ver.n_verified}},
        "picture_match": dec.picture_match.to_json() if dec.picture_match is not None else None,
        "timings": dict(timings),
        "cost": {"forwards": dict(forwards)},
        "files": {"scores": "scores.csv", "removed": "removed.txt", "gallery": "gallery", "report": "report.html",
                  "summary": "summary.json"},
        "fail_on": cfg.fail_on, "fail_on_unreadable": limit, "exit_code": 1 if exit_reasons else 0,
        "exit_reasons": exit_reasons,
    }
    return {key: summary[key] for key in SUMMARY_KEYS}


def write_outputs(run: RunDir, cfg: DetectConfig, r: ScanResult, timings: dict[str, float],
                  forwards: dict[str, int], started: float) -> dict[str, Any]:
    """The outputs stage (rank 0): ``scores.csv``, ``removed.txt``, ``errors.csv``, the gallery, ``summary.json``
    and ``report.html``; returns the summary. ``timings`` gains ``outputs`` (from ``started``, a
    ``time.perf_counter()``), the files before the gallery and report."""
    store, removed = r.store, r.decision.removed
    top = [int(i) for i in r.evidence.top_k]
    ranks = {i: k + 1 for k, i in enumerate(top)}
    run.write_text("scores.csv", _scores_csv(r, ranks))
    write_removal_list([store.ids[i] for i in np.flatnonzero(removed)], run.file("removed.txt"))
    write_errors_csv(store.errors, run.file("errors.csv"))
    timings["outputs"] = time.perf_counter() - started     # the gallery and report come on top
    summary = summary_of(cfg, str(run.path), r, timings, forwards)
    attention = np.load(run.file("attention.npy"), mmap_mode="r")
    row = {e.index: j for j, e in enumerate(r.search.scored)}
    top_att = {i: np.asarray(attention[row[i]], dtype=np.float32) for i in top}
    write_gallery(run, store.images, summary, top_att, r.search.boxes, removed, r.clustering.labels,
                  r.search.scores)
    run.write_json("summary.json", summary)
    write_report(run, summary)
    return summary
