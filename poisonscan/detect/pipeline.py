"""The detect pipeline: the driver that runs the stages in order, with done-markers and resume, and each stage's
compute and load functions.

Stages (each writes its files, then ``stages/<stage>.done``; ``--resume`` skips finished ones):

1. ``store``      decode the data set at the threat model's resolution (``store/``)
2. ``features``   L2-normalised encoder features (``features.npy``, ``ids.json``)
3. ``clusters``   k-means on rank 0, broadcast (``clusters.npz``)
4. ``search``     iterative search; each round: candidate windows (cluster activation masking, or Grad-CAM for
                  ``search.method = "patchsearch"``) and poison scores on the flip test set; ``search.json`` after
                  every round so a killed search resumes from its last finished round with the same result
5. ``evidence``   random windows scored like candidates; do the top-k stand out? (``evidence.json``)
6. ``classifier`` the evidence gate, then the poison classifier when it passes or ``decision.force``
7. ``verify``     the opt-in flip test of isolated flags, and the search for a recurring picture (``verify.json``)
8. ``outputs``    detect/outputs.py: ``scores.csv``, ``removed.txt``, ``gallery/``, ``report.html``, ``summary.json``

The state the stages share is a :class:`poisonscan.detect.context.Context`; the run folder and what a resume reruns
are detect/resume.py's. Under torchrun the features, candidate detection and poison scores are split across ranks by
index and gathered; every random draw is made from a generator seeded before the split, so the result does not
depend on the world size. Classifier, verify and outputs run on rank 0 only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poisonscan import runtime as rt
from poisonscan.config import DetectConfig, check_window, validate_config
from poisonscan.data.sources import open_source
from poisonscan.data.store import build_store, open_store, write_errors_csv
from poisonscan.detect.classifier import (ClassifierConfig, classifier_bytes, classifier_split, load_classifier,
                                          train_with_refinement)
from poisonscan.detect.clustering import Clustering, choose_n_clusters, fit_kmeans
from poisonscan.detect.context import (STAGES, Context, RoundHook, boxes_of, candidates, decide, derive_seed,
                                       flip_scores, neighbours_of, null_sources_of, scores_of, torch_gen, verified_of)
from poisonscan.detect.decision import refinement_neighbours
from poisonscan.detect.evidence import backdoor_evidence, evidence_gate, null_pool, null_sources, null_windows
from poisonscan.detect.features import extract_features, prepare_encoder
from poisonscan.detect.masking import MaskingConfig, cut_windows, make_masks
from poisonscan.detect.matching import best_match, match_threshold
from poisonscan.detect.outputs import stage_outputs
from poisonscan.detect.recurrence import recurrence_test, recurring_group
from poisonscan.detect.resume import open_run
from poisonscan.detect.search import iterative_search, top_k
from poisonscan.detect.verification import occlusion_windows, verification_bar, verification_candidates
from poisonscan.errors import DataError
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runs import releases_run_locks


def _stage_store(ctx: Context) -> dict[str, Any]:
    source = ctx.source if ctx.source is not None else open_source(ctx.cfg.data)
    ctx.store = build_store(source, ctx.size, ctx.run.file("store"), ctx.runtime, ctx.quiet)
    if len(ctx.store) == 0:
        if ctx.runtime.is_main:
            write_errors_csv(ctx.store.errors, ctx.run.file("errors.csv"))
        raise DataError(f"{ctx.cfg.data}: no readable image ({len(ctx.store.errors)} unreadable, see "
                        f"{ctx.run.file('errors.csv')})")
    return {"n": len(ctx.store), "errors": len(ctx.store.errors), "size": ctx.size}


def _load_store(ctx: Context) -> None:
    ctx.store = open_store(ctx.run.file("store"))
    if ctx.store.size != ctx.size:
        raise DataError(f"{ctx.run.file('store')} holds {ctx.store.size} px images but the model needs {ctx.size} "
                        "px (start a new run)")


def _stage_features(ctx: Context) -> dict[str, Any]:
    ctx.features = extract_features(ctx.encoder, ctx.store.images, ctx.runtime, ctx.cfg.batch_size, ctx.quiet,
                                    dtype=ctx.cfg.feature_dtype)
    if ctx.runtime.is_main:
        ctx.run.save_npy("features.npy", ctx.features)
        ctx.run.write_json("ids.json", ctx.store.ids)
    return {"dim": int(ctx.features.shape[1])}


def _load_features(ctx: Context) -> None:
    # memory-mapped in its stored dtype: k-means and the flip set read it in chunks
    ctx.features = np.load(ctx.run.file("features.npy"), mmap_mode="r", allow_pickle=False)
    if ctx.features.shape[0] != len(ctx.store):
        raise DataError(f"{ctx.run.file('features.npy')} does not match the image store (start a new run)")


def _stage_clusters(ctx: Context) -> dict[str, Any]:
    n = choose_n_clusters(len(ctx.store), ctx.cfg.clusters)
    clustering = None
    if ctx.runtime.is_main:
        clustering = fit_kmeans(ctx.features, n, ctx.cfg.seed)
        clustering.save(ctx.run.file("clusters.npz"))
    ctx.clustering = rt.broadcast_object(clustering)
    return {"n_clusters": n, "requested": ctx.cfg.clusters}


def _load_clusters(ctx: Context) -> None:
    ctx.clustering = Clustering.load(ctx.run.file("clusters.npz"))


def _search_doc(ctx: Context, result: Any, entries: dict[int, dict[str, Any]], completed: bool) -> dict[str, Any]:
    rounds = [{k: r[k] for k in ("round", "live_clusters", "scored", "retired", "dropped") if k in r}
              for r in result.rounds]
    return {"format": "poisonscan-search", "completed": completed, "method": ctx.cfg.search.method,
            "window": ctx.window, "n_masks": ctx.cfg.search.masks, "mask_strategy": ctx.cfg.search.mask_strategy,
            "rule": ctx.cfg.search.score_rule, "aggregate": ctx.cfg.search.aggregate,
            "flip_set": [int(i) for i in ctx.flip], "rounds": rounds,
            "scored": [entries[i] for i in result.order],
            "cluster_scores": [[int(c), float(s)] for c, s in sorted(result.cluster_scores.items())]}


def _stage_search(ctx: Context) -> dict[str, Any]:
    cfg, run, main = ctx.cfg, ctx.run, ctx.runtime.is_main
    ctx.flip_data()
    masks = make_masks(MaskingConfig(cfg.search.masks, ctx.window, cfg.search.mask_strategy, batch_size=cfg.batch_size),
                       ctx.size, torch_gen(cfg.seed, "masks"))
    # a search killed after some rounds: keep what they computed (search.json is rewritten after every round)
    saved = rt.broadcast_object(run.read_json("search.json") if main and run.exists("search.json") else None)
    entries: dict[int, dict[str, Any]] = {int(e["index"]): e for e in (saved or {}).get("scored", [])}
    labels = ctx.clustering.labels
    state: dict[str, Any] = {"rounds_done": 0, "pending": None}

    def score_fn(indices: np.ndarray) -> np.ndarray:
        rnd = state["rounds_done"] + 1
        att, boxes, eta = candidates(ctx, indices, masks)
        patches = cut_windows(ctx.store.images[torch.as_tensor(indices)], torch.as_tensor(boxes))
        scores = flip_scores(ctx, patches, labels[indices], "round", rnd)
        for j, i in enumerate(indices):
            entries[int(i)] = {"index": int(i), "poison_score": int(scores[j]), "box": [int(v) for v in boxes[j]],
                               "eta": int(eta[j]), "cluster": int(labels[i]), "round": rnd}
        state["pending"] = att
        return scores

    def on_round(result: Any) -> None:
        state["rounds_done"] = rnd = len(result.rounds)
        if main:
            if state["pending"] is not None:
                run.save_npy(f"search/attention_{rnd:04d}.npy", state["pending"])
            run.write_json("search.json", _search_doc(ctx, result, entries, completed=False))
        state["pending"] = None
        bar.update(info=f"round {rnd}: {result.rounds[-1]['live_clusters']} live clusters, "
                        f"{len(result.order)} scored")
        bar.advance(result.rounds[-1]["scored"])
        if ctx.on_round is not None:
            ctx.on_round(rnd)

    with rt.progress("search", total=None, quiet=ctx.quiet) as bar:
        result = iterative_search(labels, score_fn, cfg.search.samples_per_cluster, cfg.search.drop_fraction,
                                  np.random.default_rng(derive_seed(cfg.seed, "search")),
                                  already_scored={i: e["poison_score"] for i, e in entries.items()},
                                  on_round=on_round, aggregate=cfg.search.aggregate)
    doc = _search_doc(ctx, result, entries, completed=True)
    if main:
        chunks = [np.load(run.file(f"search/attention_{r:04d}.npy")) for r in range(1, len(result.rounds) + 1)
                  if run.exists(f"search/attention_{r:04d}.npy")]
        attention = np.concatenate(chunks) if chunks else np.zeros((0, ctx.size, ctx.size), np.float16)
        if attention.shape[0] != len(result.order):
            raise DataError(f"{run.file('search')}: attention maps of {attention.shape[0]} images for "
                            f"{len(result.order)} scored (start a new run)")
        run.save_npy("attention.npy", attention.astype(np.float16))
        run.write_json("search.json", doc)
    ctx.search = doc
    return {"rounds": len(result.rounds), "n_scored": len(result.order)}


def _load_search(ctx: Context) -> None:
    ctx.search = ctx.run.read_json("search.json")
    ctx.flip = np.asarray(ctx.search["flip_set"], dtype=np.int64)
    if ctx.runtime.is_main:                 # killed right after the search finished: drop its per-round maps
        shutil.rmtree(ctx.run.file("search"), ignore_errors=True)


def _stage_evidence(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    scores = scores_of(ctx)
    top = top_k(scores, cfg.evidence.top_k)
    gen = torch_gen(cfg.seed, "null")
    images = ctx.store.images
    labels = ctx.clustering.labels
    pool = null_pool(labels, top, cfg.evidence.null_pool)   # None: all images
    src = null_sources(len(images), cfg.evidence.null_size, gen, pool)       # the images the null windows are cut from
    if cfg.search.score_rule == "to_source":  # the null windows need their source image's cluster
        patches = torch.cat([null_windows(images[int(i):int(i) + 1], 1, ctx.window, gen) for i in src])
        sources = labels[src.numpy()]
    else:
        patches, sources = null_windows(images, cfg.evidence.null_size, ctx.window, gen, sources=src), None
    null = flip_scores(ctx, patches, sources, "null")
    n_flip = len(ctx.flip)
    ev = backdoor_evidence(np.array([scores[i] for i in top]), null, len(scores), n_flip, seed=cfg.seed)
    ev["recurrence"] = _recurrence(ctx, top, patches)
    excluded = sorted({int(c) for c in labels[np.asarray(top, dtype=np.int64)]}) if pool is not None else []
    ev.update(top_k=top, topk_scores=[scores[i] for i in top], null_scores=null.tolist(), n_flip=n_flip,
              null_sources=src.tolist(),
              null_pool=cfg.evidence.null_pool if pool is not None else "all",
              null_pool_size=len(pool) if pool is not None
              else len(images), null_excluded_clusters=excluded)
    if ctx.runtime.is_main:
        ctx.run.write_json("evidence.json", ev)
    ctx.evidence = ev
    return {"z": ev["z"]}


def _recurrence(ctx: Context, top: list[int], null_patches: Tensor) -> dict[str, Any]:
    """The recurrence test (detect/recurrence.py) on the top-k windows, cut again from their images, against the
    evidence test's random windows (no forward pass)."""
    boxes = boxes_of(ctx)
    idx = torch.as_tensor(top, dtype=torch.int64)
    patches = cut_windows(ctx.store.images[idx], torch.as_tensor([boxes[i] for i in top], dtype=torch.int64))
    rec = recurrence_test(patches, null_patches, seed=ctx.cfg.seed)
    rec["members"] = [int(top[j]) for j in rec["members"]]      # image indices
    return rec


def _load_evidence(ctx: Context) -> None:
    ctx.evidence = ctx.run.read_json("evidence.json")


def _stage_classifier(ctx: Context) -> dict[str, Any]:
    cfg, n = ctx.cfg, len(ctx.store)
    dec = cfg.decision
    found, reason = evidence_gate(ctx.evidence, dec.min_evidence, dec.min_effect, dec.max_recurrence_p)
    info: dict[str, Any] = {"trained": False, "ensemble": cfg.classifier.ensemble, "iterations": 0, "val_f1": None,
                            "threshold": cfg.decision.threshold, "backdoor_found": bool(found),
                            "forced": bool(cfg.decision.force and not found), "reason": reason}
    if not (found or cfg.decision.force):
        for stale in ("classifier.safetensors", "classifier_probs.npy"):
            ctx.run.file(stale).unlink(missing_ok=True)
        ctx.run.write_json("classifier.json", info)
        ctx.classifier, ctx.probs = info, None
        return {"trained": False}
    scores = scores_of(ctx)
    score_arr = np.full(n, np.nan)
    score_arr[list(scores)] = list(scores.values())
    top = _positives(ctx)
    split = classifier_split(score_arr, top, cfg.classifier.drop_top, seed=cfg.seed,
                             holdout=cfg.classifier.holdout,
                             exclude=[int(i) for i in ctx.evidence["top_k"] if int(i) not in set(top)])
    boxes = boxes_of(ctx)
    top_t = torch.as_tensor(top)
    patches = cut_windows(ctx.store.images[top_t], torch.as_tensor([boxes[i] for i in top]))
    ccfg = ClassifierConfig(iterations=cfg.classifier.iterations, ensemble=cfg.classifier.ensemble,
                            predict_batch_size=cfg.batch_size, decoys=cfg.classifier.decoys, seed=cfg.seed)
    refine_k = refinement_neighbours(cfg.classifier, cfg.decision)
    nbrs = neighbours_of(ctx, refine_k) if refine_k else None
    refined = train_with_refinement(ctx.store.images, patches, split, ccfg, ctx.runtime, cfg.classifier.rounds,
                                    cfg.decision.threshold, cfg.batch_size, ctx.quiet, neighbours=nbrs)
    res, probs = refined.result, refined.probs
    ctx.run.write_bytes("classifier.safetensors", classifier_bytes(res.models, image_size=ctx.size,
                                                                   threshold=cfg.decision.threshold, val_f1=res.val_f1))
    ctx.run.save_npy("classifier_probs.npy", probs)
    info.update(trained=True, iterations=max(res.iterations), iterations_per_model=res.iterations,
                best_iteration=res.best_iteration, val_f1=res.val_f1,
                split={"train": len(split.train), "val_pos": len(split.val_pos), "val_neg": len(split.val_neg)},
                positives=top, rounds=1 + len(refined.dropped), refinement_dropped=refined.dropped,
                refine_by=cfg.classifier.refine_by if cfg.classifier.rounds > 1 else None,
                history=res.history)
    ctx.run.write_json("classifier.json", info)
    ctx.classifier, ctx.probs = info, probs
    return {"trained": True, "val_f1": res.val_f1}


def _positives(ctx: Context) -> list[int]:
    """The images whose windows the classifier learns as the trigger: the recurring group of the top-k when the
    recurrence test found one at ``p <= max_recurrence_p`` (``classifier_positives="recurring"``), else every top-k
    image (the paper)."""
    top = [int(i) for i in ctx.evidence["top_k"]]
    rec = recurring_group(ctx.evidence, ctx.cfg.decision.max_recurrence_p)
    if ctx.cfg.classifier.positives != "recurring" or rec is None:
        return top
    members = {int(i) for i in rec["members"]}
    return [i for i in top if i in members]


def _load_classifier(ctx: Context) -> None:
    ctx.classifier = ctx.run.read_json("classifier.json")
    ctx.probs = (np.load(ctx.run.file("classifier_probs.npy"), allow_pickle=False)
                 if ctx.classifier.get("trained") else None)


def _stage_verify(ctx: Context) -> dict[str, Any]:
    """Flip-test the window of each image the classifier flags (P > verify_min_prob) but the removal score keeps
    (see ``verification``): removed when it moves more flip-set images than every null window cut from an image
    the classifier does not flag."""
    cfg = ctx.cfg
    cand = (verification_candidates(ctx.probs, decide(ctx), cfg.decision.verify_min_prob) if ctx.probs is not None
            else np.zeros(0, dtype=np.int64))
    bar = (verification_bar(ctx.evidence.get("null_scores", []), null_sources_of(ctx),
                            ctx.probs <= cfg.decision.threshold)
           if ctx.probs is not None else -1)
    entries: list[dict[str, Any]] = []
    if len(cand):
        models, _ = load_classifier(ctx.run.file("classifier.safetensors"))
        models = [m.to(ctx.runtime.device) for m in models]
        images = ctx.store.images[torch.as_tensor(cand)]
        boxes, p_min = occlusion_windows(models, images, ctx.window, ctx.runtime, batch_size=cfg.batch_size)
        flips = flip_scores(ctx, cut_windows(images, boxes), ctx.clustering.labels[cand], "verify", split=False)
        entries = [{"index": int(i), "prob": float(ctx.probs[i]), "box": [int(v) for v in boxes[j]],
                    "occluded_prob": float(p_min[j]), "poison_score": int(flips[j]),
                    "verified": bool(flips[j] > bar)} for j, i in enumerate(cand)]
    ctx.verify = {"min_prob": cfg.decision.verify_min_prob, "bar": bar, "n_candidates": len(entries),
                  "n_verified": sum(e["verified"] for e in entries), "candidates": entries}
    ctx.verify["picture_match"] = _picture_match(ctx)
    ctx.run.write_json("verify.json", ctx.verify)
    return {"candidates": len(entries), "verified": ctx.verify["n_verified"]}


def _picture_match(ctx: Context) -> dict[str, Any] | None:
    """With a backdoor signal and a recurring picture (``match_picture``), search every image for it
    (detect/matching.py): ``picture_match.npy`` and the record of ``verify.json``; else ``None``."""
    rec = recurring_group(ctx.evidence, ctx.cfg.decision.max_recurrence_p)
    ctx.match = None
    ctx.run.file("picture_match.npy").unlink(missing_ok=True)
    if not ctx.cfg.decision.match_picture or ctx.probs is None or rec is None:
        return None
    boxes, members = boxes_of(ctx), [int(i) for i in rec["members"]]
    templates = cut_windows(ctx.store.images[torch.as_tensor(members)],
                            torch.as_tensor([boxes[i] for i in members], dtype=torch.int64))
    ctx.match = best_match(ctx.store.images, templates, ctx.runtime, ctx.cfg.batch_size, ctx.quiet)
    ctx.run.save_npy("picture_match.npy", ctx.match)
    threshold, outlier = match_threshold(ctx.match, rec["bar"])
    contains = ctx.match >= threshold - 1e-9
    flagged = decide(ctx) | verified_of(ctx, ctx.verify)
    return {"threshold": threshold, "bar": float(rec["bar"]), "outlier_bar": outlier, "templates": len(members),
            "contain": int(contains.sum()), "flagged_without": int((flagged & ~contains).sum()),
            "added": int((contains & ~flagged).sum())}


def _load_verify(ctx: Context) -> None:
    ctx.verify = ctx.run.read_json("verify.json")
    ctx.match = (np.load(ctx.run.file("picture_match.npy"), allow_pickle=False)
                 if ctx.verify.get("picture_match") else None)


STAGE_FUNCS: dict[str, tuple[Callable[[Context], dict[str, Any]], Callable[[Context], None] | None]] = {
    "store": (_stage_store, _load_store),
    "features": (_stage_features, _load_features),
    "clusters": (_stage_clusters, _load_clusters),
    "search": (_stage_search, _load_search),
    "evidence": (_stage_evidence, _load_evidence),
    "classifier": (_stage_classifier, _load_classifier),
    "verify": (_stage_verify, _load_verify),
    "outputs": (stage_outputs, None),
}
MAIN_ONLY = ("classifier", "verify", "outputs")


@releases_run_locks
def run_detect(cfg: DetectConfig, runtime: rt.Runtime | None = None, quiet: bool = False,
               on_round: RoundHook | None = None) -> dict[str, Any]:
    """Run (or resume) detection and return the summary (the content of ``summary.json``; ``{}`` on ranks > 0).

    Every check of the settings and inputs (a new run's data source included) comes before the run folder is
    written, so a refused command leaves no ``config.json`` that would make its rerun find the folder not empty.
    The folder is locked while this runs. ``on_round(round)`` is called after each search round has been saved
    (tests use it to simulate a kill).
    """
    validate_config(cfg)
    runtime = runtime or rt.setup_runtime(cfg.device, cfg.precision)
    quiet = quiet or cfg.quiet
    rt.seed_everything(cfg.seed)
    encoder, meta = load_encoder(cfg.model, arch=cfg.arch, image_size=cfg.image_size,
                                 trust_pickle=cfg.trust_checkpoint)
    check_window(cfg.search.window, int(encoder.image_size))
    source = None if cfg.resume else open_source(cfg.data)     # a resumed run opens it only to redo the store
    run = open_run(cfg, runtime)
    main = runtime.is_main
    done = rt.broadcast_object({s: run.stage_done(s) for s in STAGES} if main else None)
    if done["outputs"]:                     # a finished run: its summary
        return run.read_json("summary.json") if main else {}
    ctx = Context(cfg, runtime, run, quiet, on_round, prepare_encoder(encoder.eval(), runtime), meta, source=source)
    for stage in STAGES:
        if stage in MAIN_ONLY and not main:
            return {}                       # ranks > 0 have nothing left to share
        compute, load = STAGE_FUNCS[stage]
        if done[stage] and load is not None:
            load(ctx)
            if main:
                ctx.timings[stage] = float(run.read_json(f"stages/{stage}.done").get("seconds", 0.0))
            continue
        ctx.stage_start = time.perf_counter()
        info = compute(ctx)
        seconds = time.perf_counter() - ctx.stage_start
        ctx.timings.setdefault(stage, seconds)
        if main:
            run.mark_done(stage, {"seconds": seconds, **info})
            if stage == "search":
                shutil.rmtree(run.file("search"), ignore_errors=True)   # per-round maps, now in attention.npy
        if stage not in MAIN_ONLY:
            rt.barrier()
    return run.read_json("summary.json")
