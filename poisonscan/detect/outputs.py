"""The outputs stage of a detect run: ``scores.csv`` (columns in detect/scores.py), ``removed.txt``, ``errors.csv``,
the gallery, ``summary.json`` (documented in docs/outputs.md), ``report.html``, and the exit code (``--fail-on``)."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import numpy as np

from poisonscan import __version__
from poisonscan.data.store import write_errors_csv
from poisonscan.data.writers import write_removal_list
from poisonscan.detect.context import Context, boxes_of, removed_of, scores_of
from poisonscan.detect.evidence import effect_of, evidence_gate
from poisonscan.detect.matching import match_verdict
from poisonscan.detect.recurrence import is_pixel_record
from poisonscan.detect.scores import SCORE_COLUMNS
from poisonscan.report.gallery import write_gallery
from poisonscan.report.html import write_report

#: the keys of ``summary.json``, in order (docs/outputs.md documents each; a test keeps the three equal)
SUMMARY_KEYS = ("command", "method", "run_dir", "version", "source", "model", "counts", "clusters", "search", "top_k",
                "top_clusters", "evidence", "verdict", "classifier", "picture_match", "timings", "files", "fail_on",
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


def _scores_csv(ctx: Context, removed: np.ndarray, ranks: dict[int, int]) -> str:
    by_index = {int(e["index"]): e for e in ctx.search["scored"]}
    verify = {int(e["index"]): e["poison_score"] for e in (ctx.verify or {}).get("candidates", [])}
    cl = ctx.clustering
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SCORE_COLUMNS)
    for i, sid in enumerate(ctx.store.ids):
        e = by_index.get(i)
        label = ctx.store.labels[i]
        box = e["box"] if e else ["", "", "", ""]
        w.writerow([i, sid, "" if label is None else label, int(cl.labels[i]), f"{float(cl.distances[i]):.6f}",
                    e["poison_score"] if e else "", *box, _fmt(ctx.probs, i), _fmt(ctx.neighbour_probs, i),
                    _fmt(ctx.removal, i), verify.get(i, ""), _fmt(ctx.match, i), int(removed[i]), ranks.get(i, "")])
    return buf.getvalue()


def _top_clusters(ctx: Context, removed: np.ndarray, limit: int = 10) -> list[dict[str, Any]]:
    cl = ctx.clustering
    sizes = cl.sizes()
    rem = np.bincount(cl.labels, weights=removed.astype(np.float64), minlength=cl.n_clusters).astype(np.int64)
    best: dict[int, int] = {}
    for e in ctx.search["scored"]:
        c = int(cl.labels[int(e["index"])])
        best[c] = max(best.get(c, -1), int(e["poison_score"]))
    order = sorted(range(cl.n_clusters), key=lambda c: (-rem[c], -best.get(c, -1), c))
    return [{"cluster": c, "size": int(sizes[c]), "removed": int(rem[c]), "max_score": best.get(c)}
            for c in order[:limit]]


def _summary(ctx: Context, removed: np.ndarray) -> dict[str, Any]:
    cfg, store, ev, clf = ctx.cfg, ctx.store, ctx.evidence, ctx.classifier
    scores, boxes = scores_of(ctx), boxes_of(ctx)
    top = [int(i) for i in ev["top_k"]]
    n, n_removed = len(store), int(removed.sum())
    dec = cfg.decision
    gate_reason = clf.get("reason") or evidence_gate(ev, dec.min_evidence, dec.min_effect, dec.max_recurrence_p)[1]
    found, reason = match_verdict(bool(clf["backdoor_found"]), gate_reason, (ctx.verify or {}).get("picture_match"),
                                  effect_of(ev), dec.min_effect)
    evidence = {k: ev[k] for k in ("topk_median", "null_median", "z", "p_value", "effect", "best_flip_share",
                                   "null_size", "null_pool", "null_pool_size", "null_excluded_clusters", "z_scale",
                                   "topk_spread")}
    evidence.update(min_evidence=dec.min_evidence, min_effect=dec.min_effect, backdoor_found=found,
                    max_recurrence_p=dec.max_recurrence_p, forced=bool(clf["forced"]),
                    recurrence=({k: ev["recurrence"][k] for k in ("size", "k", "p_value", "null_group_median",
                                                                  "null_group_p99")}
                                if is_pixel_record(ev.get("recurrence")) else None),
                    reason=reason)
    meta = {k: v for k, v in ctx.enc_meta.items() if k not in ("missing_keys", "unexpected_keys")}
    n_unreadable = len(store.errors)
    limit = unreadable_limit(cfg.fail_on, cfg.fail_on_unreadable)
    exit_reasons = ([f"{n_removed} removed, over --fail-on {cfg.fail_on:g}"]
                    if fail_on_exceeded(cfg.fail_on, n_removed, n) else [])
    if limit is not None and n_unreadable > limit:
        exit_reasons.append(f"{n_unreadable} sample(s) could not be read and were not scanned, over "
                            f"--fail-on-unreadable {limit}")
    exit_code = 1 if exit_reasons else 0
    verdict = "backdoor signal found" if found else \
        "no backdoor signal (removal forced)" if clf["forced"] else "no backdoor signal"
    summary = {
        "command": "detect", "method": cfg.search.method, "run_dir": str(ctx.run.path), "version": __version__,
        "source": {"spec": cfg.data, "kind": store.source.get("kind"), "n_samples": n + len(store.errors),
                   "n_errors": len(store.errors)},
        "model": {"checkpoint": cfg.model, "arch": getattr(ctx.encoder, "arch", None), "image_size": ctx.size,
                  "metadata": meta},
        "counts": {"scanned": n, "scored": len(scores), "removed": n_removed,
                   "removed_fraction": n_removed / n if n else 0.0, "errors": n_unreadable,
                   "unreadable": n_unreadable},
        "clusters": {"requested": cfg.clusters, "n_clusters": ctx.clustering.n_clusters,
                     "flip_set": len(ctx.search["flip_set"])},
        "search": {"rounds": [{k: r[k] for k in ("round", "live_clusters", "scored")} for r in ctx.search["rounds"]],
                   "n_scored": len(scores)},
        "top_k": [{"rank": r + 1, "index": i, "id": store.ids[i], "cluster": int(ctx.clustering.labels[i]),
                   "poison_score": scores[i], "box": boxes[i]} for r, i in enumerate(top)],
        "top_clusters": _top_clusters(ctx, removed),
        "evidence": evidence,
        "verdict": verdict,
        "classifier": {"trained": bool(clf["trained"]), "ensemble": int(clf["ensemble"]),
                       "iterations": int(clf["iterations"]), "val_f1": clf.get("val_f1"),
                       "rounds": clf.get("rounds"), "refine_by": clf.get("refine_by"),
                       "threshold": float(clf["threshold"]), "neighbours": int(cfg.decision.neighbours),
                       "flag_rate": None if ctx.probs is None else float(np.mean(ctx.probs)),
                       "removed_by_classifier_alone": None if ctx.probs is None else
                       int((ctx.probs > cfg.decision.threshold).sum()),
                       "verification": {k: (ctx.verify or {}).get(k) for k in ("min_prob", "bar", "n_candidates",
                                                                                 "n_verified")}},
        "picture_match": (ctx.verify or {}).get("picture_match"),
        "timings": dict(ctx.timings),
        "files": {"scores": "scores.csv", "removed": "removed.txt", "gallery": "gallery", "report": "report.html",
                  "summary": "summary.json"},
        "fail_on": cfg.fail_on, "fail_on_unreadable": limit, "exit_code": exit_code, "exit_reasons": exit_reasons,
    }
    return {key: summary[key] for key in SUMMARY_KEYS}


def stage_outputs(ctx: Context) -> dict[str, Any]:
    run, store = ctx.run, ctx.store
    removed = removed_of(ctx)
    top = [int(i) for i in ctx.evidence["top_k"]]
    ranks = {i: r + 1 for r, i in enumerate(top)}
    run.write_text("scores.csv", _scores_csv(ctx, removed, ranks))
    write_removal_list([store.ids[i] for i in np.flatnonzero(removed)], run.file("removed.txt"))
    write_errors_csv(store.errors, run.file("errors.csv"))
    ctx.timings["outputs"] = time.perf_counter() - ctx.stage_start   # the gallery and report come on top
    summary = _summary(ctx, removed)
    attention = np.load(run.file("attention.npy"), mmap_mode="r")
    row = {int(e["index"]): j for j, e in enumerate(ctx.search["scored"])}
    top_att = {i: np.asarray(attention[row[i]], dtype=np.float32) for i in top}
    write_gallery(run, store.images, summary, top_att, boxes_of(ctx), removed, ctx.clustering.labels, scores_of(ctx))
    run.write_json("summary.json", summary)
    write_report(run, summary)
    return {"removed": int(removed.sum())}
