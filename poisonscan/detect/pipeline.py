"""The detect pipeline: stages with done-markers and resume, work split across ranks, and the run's outputs.

Stages (each writes its files, then ``stages/<stage>.done``; ``--resume`` skips finished ones):

1. ``store``      decode the data set at the threat model's resolution (``store/``)
2. ``features``   L2-normalised encoder features (``features.npy``, ``ids.json``)
3. ``clusters``   k-means on rank 0, broadcast (``clusters.npz``)
4. ``search``     iterative search; each round: candidate windows (cluster activation masking, or Grad-CAM for
                  ``--method patchsearch``) and poison scores on the flip test set; ``search.json`` after every round
                  so a killed search resumes from its last finished round with the same result (``attention.npy``)
5. ``evidence``   random windows scored like candidates; do the top-k stand out? (``evidence.json``)
6. ``classifier`` poison classifier, only when the evidence clears ``min_evidence`` or ``force``
                  (``classifier.safetensors``)
7. ``outputs``    ``scores.csv``, ``removed.txt``, ``errors.csv``, ``gallery/``, ``report.html``, ``summary.json``

Under torchrun the features, candidate detection and poison scores are split across ranks by index and gathered;
every random draw is made from a generator seeded by ``(seed, purpose, round)`` before the split, so the result does
not depend on the world size. Classifier and outputs run on rank 0 only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poisonscan import __version__
from poisonscan import runtime as rt
from poisonscan.config import DetectConfig
from poisonscan.data.sources import open_source
from poisonscan.data.store import ImageStore, build_store, open_store, write_errors_csv
from poisonscan.data.writers import write_removal_list
from poisonscan.detect.classifier import (ClassifierConfig, classifier_bytes, classifier_split, load_classifier,
                                          train_with_refinement)
from poisonscan.detect.clustering import Clustering, choose_n_clusters, fit_kmeans
from poisonscan.detect.decision import refinement_neighbours, removal_scores
from poisonscan.detect.evidence import (backdoor_evidence, effect_of, evidence_gate, null_pool, null_sources,
                                        null_windows)
from poisonscan.detect.features import extract_features, prepare_encoder
from poisonscan.detect.gradcam import gradcam_batch_size, gradcam_candidates
from poisonscan.detect.masking import MaskingConfig, cluster_activation_masking, cut_windows, make_masks, window_pixels
from poisonscan.detect.matching import best_match, match_threshold, match_verdict
from poisonscan.detect.neighbours import nearest_neighbours
from poisonscan.detect.recurrence import is_pixel_record, recurrence_test, recurring_group
from poisonscan.detect.scores import SCORE_COLUMNS
from poisonscan.detect.search import draw_positions, flip_test_set, iterative_search, poison_scores, top_k
from poisonscan.detect.verification import occlusion_windows, verification_bar, verification_candidates
from poisonscan.errors import ConfigError, DataError, UsageError
from poisonscan.models.checkpoints import load_encoder
from poisonscan.report.gallery import write_gallery
from poisonscan.report.html import write_report
from poisonscan.runs import RunDir, absolute_settings, config_record, create_run, lock_run, releases_run_locks
from poisonscan.settings import check_config, sections

STAGES = ("store", "features", "clusters", "search", "evidence", "classifier", "verify", "outputs")
SECTIONS = sections(DetectConfig)

RoundHook = Callable[[int], None]


# --------------------------------------------------------------------------------------------------- config checks


def validate_config(cfg: DetectConfig) -> None:
    """Raise ``ConfigError`` for settings the pipeline cannot run with (types, ranges and choices of every setting,
    then what no single setting shows)."""
    check_config(cfg)
    if not cfg.data:
        raise ConfigError("no data set: give DATA (a folder, file list or WebDataset shards)")
    if not cfg.model:
        raise ConfigError("no threat model: give --model CKPT")
    window = cfg.search.window
    if not (window < 1 or float(window).is_integer()):
        raise ConfigError(f"--window {window:g}: give whole pixels (17) or a fraction of the image side below 1 "
                          "(60/224, 0.27)")
    if not math.isfinite(cfg.decision.min_evidence):
        raise ConfigError("setting 'decision.min_evidence' must be a number")
    if cfg.image_size:
        check_window(window, cfg.image_size)


def unreadable_limit(fail_on: float | None, fail_on_unreadable: int | None) -> int | None:
    """The most unscanned (unreadable) samples a run may have before it exits 1: ``--fail-on-unreadable`` when
    given, else 0 when ``--fail-on`` is given (a CI gate fails closed on samples it could not scan), else none."""
    if fail_on_unreadable is not None:
        return int(fail_on_unreadable)
    return 0 if fail_on is not None else None


def check_window(window: float, image_size: int) -> None:
    """Raise ``ConfigError`` when ``window`` in pixels (>= 1) is larger than the model's ``image_size`` px images."""
    if window >= 1 and window > image_size:
        raise ConfigError(f"--window {window:g}: {window:g} px is larger than the model's {image_size} px images "
                          f"(give at most {image_size} px, or a fraction of the image side like 60/224)")


def fail_on_exceeded(fail_on: float | None, removed: int, scanned: int) -> bool:
    """``--fail-on``: a value below 1 is a fraction of the scanned images, from 1 up a count; exceeded = strictly
    more removed."""
    if fail_on is None:
        return False
    if fail_on < 1:
        return scanned > 0 and removed / scanned > fail_on
    return removed > fail_on


def derive_seed(seed: int, *tags: Any) -> int:
    """A stable 63-bit seed for ``(seed, *tags)`` (the same in every process and Python run)."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _torch_gen(seed: int, *tags: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


# ---------------------------------------------------------------------------------------------------- run folder


def _clear_from(run: RunDir, stage: str) -> None:
    """Forget ``stage`` and every later one (and a partial search when the search is redone); the decision's files
    go too, so nothing reads a removal list the new settings have not made."""
    for s in STAGES[STAGES.index(stage):]:
        run.clear_stage(s)
    for name in ("removed.txt", "scores.csv", "summary.json"):
        run.file(name).unlink(missing_ok=True)
    if STAGES.index(stage) <= STAGES.index("search"):
        run.file("search.json").unlink(missing_ok=True)
        shutil.rmtree(run.file("search"), ignore_errors=True)


def rerun_from(saved: dict[str, Any], cfg: DetectConfig) -> str | None:
    """The first stage whose settings differ between a run's saved ``config.json`` and ``cfg``: each setting's
    stage is its field's ``stage`` metadata (a section's: the section field's), see :class:`DetectConfig`."""
    new = config_record(cfg)
    changed = []
    for f in fields(DetectConfig):
        name = f.metadata.get("stage")
        if name is None or saved.get(f.name) == new.get(f.name):
            continue
        if f.name in SECTIONS:           # a section: each changed setting's own stage, else the section's
            old, now = saved.get(f.name) or {}, new[f.name]
            changed += [g.metadata.get("stage", name) for g in fields(SECTIONS[f.name])
                        if old.get(g.name) != now[g.name]]
        else:
            changed.append(name)
    return min(changed, key=STAGES.index) if changed else None


def read_run_config(path: Path) -> dict[str, Any]:
    """The settings of the detect run folder ``path`` (its ``config.json`` without the version line); a run of
    another poisonscan version, or no run at all, is refused with one line."""
    if not (path / "config.json").is_file():
        raise UsageError(f"--resume {path}: not a detect run folder (no config.json)")
    saved = RunDir(path).read_json("config.json")
    version = saved.pop("version", None) if isinstance(saved, dict) else None
    if version != __version__:
        raise UsageError(f"--resume {path}: written by poisonscan {version or 'of another version'}, this is "
                         f"{__version__}; start a new run")
    return saved


def open_run(cfg: DetectConfig, runtime: rt.Runtime) -> RunDir:
    """Create the run folder, or reopen it for ``--resume`` and forget the stages whose settings changed.

    Rank 0 locks the folder (:func:`poisonscan.runs.lock_run`, released when :func:`run_detect` ends) and writes
    ``config.json`` (absolute paths) and ``environment.json``.
    """
    if cfg.resume:
        path = Path(cfg.resume)
        saved = absolute_settings(read_run_config(path))
        run = RunDir(path, lock_run(path) if runtime.is_main else None)
        if runtime.is_main:
            rerun = rerun_from(saved, cfg)
            if rerun is not None:
                _clear_from(run, rerun)
    else:
        made = create_run("detect", cfg.out, overwrite=cfg.overwrite) if runtime.is_main else None
        path = rt.broadcast_object(made.path if made is not None else None)
        run = made if made is not None else RunDir(path)
        if runtime.is_main:
            _clear_from(run, STAGES[0])      # --overwrite of an older run: start from scratch
    if runtime.is_main:
        run.write_json("config.json", {"version": __version__, **config_record(cfg)})
        run.write_environment(cfg.seed, runtime)
    rt.barrier()
    return run


# ------------------------------------------------------------------------------------------------------ context


@dataclass
class _Ctx:
    cfg: DetectConfig
    runtime: rt.Runtime
    run: RunDir
    quiet: bool
    on_round: RoundHook | None
    encoder: nn.Module | None = None
    enc_meta: dict[str, Any] = field(default_factory=dict)
    store: ImageStore | None = None
    source: Any = None                          # the data source, opened before the run folder was written
    features: np.ndarray | None = None
    clustering: Clustering | None = None
    flip: np.ndarray | None = None
    search: dict[str, Any] | None = None
    evidence: dict[str, Any] | None = None
    classifier: dict[str, Any] | None = None
    probs: np.ndarray | None = None             # the classifier's P(poisonous), N
    neighbour_probs: np.ndarray | None = None   # mean P of each image's nearest neighbours (features), N
    neighbour_index: np.ndarray | None = None   # those neighbours' indices, N x k
    removal: np.ndarray | None = None           # the removal score thresholded by the decision, N
    verify: dict[str, Any] | None = None        # verify.json: the isolated flags flip-tested, and which passed
    match: np.ndarray | None = None             # each image's best similarity to the recurring picture, N
    timings: dict[str, float] = field(default_factory=dict)
    stage_start: float = 0.0
    _flip_cache: tuple[Tensor, Tensor] | None = None

    @property
    def size(self) -> int:
        return int(self.encoder.image_size)

    @property
    def window(self) -> int:
        return window_pixels(self.cfg.search.window, self.size)

    def flip_data(self) -> tuple[Tensor, Tensor]:
        """The flip test set's images (uint8) and their cluster labels."""
        if self.flip is None:
            self.flip = flip_test_set(self.clustering, self.features, self.cfg.search.flip_size, self.cfg.clusters)
        if self._flip_cache is None:
            idx = torch.as_tensor(self.flip)
            self._flip_cache = (self.store.images[idx], torch.as_tensor(self.clustering.labels[self.flip]))
        return self._flip_cache


def _split_gather(runtime: rt.Runtime, n: int, work: Callable[[range], Any]) -> list[Any]:
    """Run ``work`` on this rank's contiguous share of ``range(n)``; the shares of all ranks, in rank order."""
    shard = rt.shard_indices(n, runtime.rank, runtime.world_size)
    part = work(shard)
    return rt.all_gather_object(part) if runtime.world_size > 1 else [part]


def _flip_scores(ctx: _Ctx, patches: Tensor, sources: np.ndarray | None, *tags: Any,
                 split: bool = True) -> np.ndarray:
    """Poison scores of ``patches`` (n x 3 x w x w) on the flip set; positions drawn from ``(seed, *tags)`` before
    the candidates are split across ranks (``split=False``: all on this rank, for the stages rank 0 runs alone)."""
    flip_images, flip_labels = ctx.flip_data()
    positions = draw_positions(len(patches), len(flip_images), _torch_gen(ctx.cfg.seed, "paste", *tags))
    rule = ctx.cfg.search.score_rule

    def work(shard: range) -> np.ndarray:
        sl = slice(shard.start, shard.stop)
        return poison_scores(ctx.encoder, ctx.clustering, flip_images, flip_labels, patches[sl], ctx.runtime, None,
                             batch_size=ctx.cfg.batch_size, rule=rule,
                             source_clusters=sources[sl] if rule == "to_source" else None,
                             positions=positions[sl], quiet=True)

    parts = _split_gather(ctx.runtime, len(patches), work) if split else [work(range(len(patches)))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _candidates(ctx: _Ctx, indices: np.ndarray, masks: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate windows of the images ``indices``, split across ranks: (attention float16 n x S x S, boxes n x 4,
    eta n)."""
    def work(shard: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        imgs = ctx.store.images[torch.as_tensor(indices[shard.start:shard.stop])]
        if ctx.cfg.search.method == "patchsearch":
            att, boxes, eta = gradcam_candidates(ctx.encoder, ctx.clustering, imgs, ctx.window, ctx.runtime,
                                                 batch_size=gradcam_batch_size(ctx.cfg.batch_size))
        else:
            att, boxes, eta = cluster_activation_masking(ctx.encoder, ctx.clustering, imgs, masks, ctx.runtime,
                                                         batch_size=ctx.cfg.batch_size, window=ctx.window)
        return att.numpy().astype(np.float16), boxes.numpy().astype(np.int64), eta.numpy().astype(np.int64)

    parts = _split_gather(ctx.runtime, len(indices), work)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


# --------------------------------------------------------------------------------------------------------- stages


def _stage_store(ctx: _Ctx) -> dict[str, Any]:
    source = ctx.source if ctx.source is not None else open_source(ctx.cfg.data)
    ctx.store = build_store(source, ctx.size, ctx.run.file("store"), ctx.runtime, ctx.quiet)
    if len(ctx.store) == 0:
        if ctx.runtime.is_main:
            write_errors_csv(ctx.store.errors, ctx.run.file("errors.csv"))
        raise DataError(f"{ctx.cfg.data}: no readable image ({len(ctx.store.errors)} unreadable, see "
                        f"{ctx.run.file('errors.csv')})")
    return {"n": len(ctx.store), "errors": len(ctx.store.errors), "size": ctx.size}


def _load_store(ctx: _Ctx) -> None:
    ctx.store = open_store(ctx.run.file("store"))
    if ctx.store.size != ctx.size:
        raise DataError(f"{ctx.run.file('store')} holds {ctx.store.size} px images but the model needs {ctx.size} "
                        "px (start a new run)")


def _stage_features(ctx: _Ctx) -> dict[str, Any]:
    ctx.features = extract_features(ctx.encoder, ctx.store.images, ctx.runtime, ctx.cfg.batch_size, ctx.quiet,
                                    dtype=ctx.cfg.feature_dtype)
    if ctx.runtime.is_main:
        ctx.run.save_npy("features.npy", ctx.features)
        ctx.run.write_json("ids.json", ctx.store.ids)
    return {"dim": int(ctx.features.shape[1])}


def _load_features(ctx: _Ctx) -> None:
    # memory-mapped in its stored dtype: k-means and the flip set read it in chunks
    ctx.features = np.load(ctx.run.file("features.npy"), mmap_mode="r", allow_pickle=False)
    if ctx.features.shape[0] != len(ctx.store):
        raise DataError(f"{ctx.run.file('features.npy')} does not match the image store (start a new run)")


def _stage_clusters(ctx: _Ctx) -> dict[str, Any]:
    n = choose_n_clusters(len(ctx.store), ctx.cfg.clusters)
    clustering = None
    if ctx.runtime.is_main:
        clustering = fit_kmeans(ctx.features, n, ctx.cfg.seed)
        clustering.save(ctx.run.file("clusters.npz"))
    ctx.clustering = rt.broadcast_object(clustering)
    return {"n_clusters": n, "requested": ctx.cfg.clusters}


def _load_clusters(ctx: _Ctx) -> None:
    ctx.clustering = Clustering.load(ctx.run.file("clusters.npz"))


def _search_doc(ctx: _Ctx, result: Any, entries: dict[int, dict[str, Any]], completed: bool) -> dict[str, Any]:
    rounds = [{k: r[k] for k in ("round", "live_clusters", "scored", "retired", "dropped") if k in r}
              for r in result.rounds]
    return {"format": "poisonscan-search", "completed": completed, "method": ctx.cfg.search.method,
            "window": ctx.window, "n_masks": ctx.cfg.search.masks, "mask_strategy": ctx.cfg.search.mask_strategy,
            "rule": ctx.cfg.search.score_rule, "aggregate": ctx.cfg.search.aggregate,
            "flip_set": [int(i) for i in ctx.flip], "rounds": rounds,
            "scored": [entries[i] for i in result.order],
            "cluster_scores": [[int(c), float(s)] for c, s in sorted(result.cluster_scores.items())]}


def _stage_search(ctx: _Ctx) -> dict[str, Any]:
    cfg, run, main = ctx.cfg, ctx.run, ctx.runtime.is_main
    ctx.flip_data()
    masks = make_masks(MaskingConfig(cfg.search.masks, ctx.window, cfg.search.mask_strategy, batch_size=cfg.batch_size),
                       ctx.size, _torch_gen(cfg.seed, "masks"))
    # a search killed after some rounds: keep what they computed (search.json is rewritten after every round)
    saved = rt.broadcast_object(run.read_json("search.json") if main and run.exists("search.json") else None)
    entries: dict[int, dict[str, Any]] = {int(e["index"]): e for e in (saved or {}).get("scored", [])}
    labels = ctx.clustering.labels
    state: dict[str, Any] = {"rounds_done": 0, "pending": None}

    def score_fn(indices: np.ndarray) -> np.ndarray:
        rnd = state["rounds_done"] + 1
        att, boxes, eta = _candidates(ctx, indices, masks)
        patches = cut_windows(ctx.store.images[torch.as_tensor(indices)], torch.as_tensor(boxes))
        scores = _flip_scores(ctx, patches, labels[indices], "round", rnd)
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


def _load_search(ctx: _Ctx) -> None:
    ctx.search = ctx.run.read_json("search.json")
    ctx.flip = np.asarray(ctx.search["flip_set"], dtype=np.int64)
    if ctx.runtime.is_main:                 # killed right after the search finished: drop its per-round maps
        shutil.rmtree(ctx.run.file("search"), ignore_errors=True)


def _scores(ctx: _Ctx) -> dict[int, int]:
    return {int(e["index"]): int(e["poison_score"]) for e in ctx.search["scored"]}


def _stage_evidence(ctx: _Ctx) -> dict[str, Any]:
    cfg = ctx.cfg
    scores = _scores(ctx)
    top = top_k(scores, cfg.evidence.top_k)
    gen = _torch_gen(cfg.seed, "null")
    images = ctx.store.images
    labels = ctx.clustering.labels
    pool = null_pool(labels, top, cfg.evidence.null_pool)   # None: all images
    src = null_sources(len(images), cfg.evidence.null_size, gen, pool)       # the images the null windows are cut from
    if cfg.search.score_rule == "to_source":  # the null windows need their source image's cluster
        patches = torch.cat([null_windows(images[int(i):int(i) + 1], 1, ctx.window, gen) for i in src])
        sources = labels[src.numpy()]
    else:
        patches, sources = null_windows(images, cfg.evidence.null_size, ctx.window, gen, sources=src), None
    null = _flip_scores(ctx, patches, sources, "null")
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


def _recurrence(ctx: _Ctx, top: list[int], null_patches: Tensor) -> dict[str, Any]:
    """The recurrence test (detect/recurrence.py) on the top-k windows, cut again from their images, against the
    evidence test's random windows (no forward pass)."""
    boxes = _boxes(ctx)
    idx = torch.as_tensor(top, dtype=torch.int64)
    patches = cut_windows(ctx.store.images[idx], torch.as_tensor([boxes[i] for i in top], dtype=torch.int64))
    rec = recurrence_test(patches, null_patches, seed=ctx.cfg.seed)
    rec["members"] = [int(top[j]) for j in rec["members"]]      # image indices
    return rec


def _null_sources(ctx: _Ctx) -> np.ndarray:
    """The images the null windows were cut from (recorded in evidence.json)."""
    return np.asarray(ctx.evidence["null_sources"], dtype=np.int64)


def _load_evidence(ctx: _Ctx) -> None:
    ctx.evidence = ctx.run.read_json("evidence.json")


def _boxes(ctx: _Ctx) -> dict[int, list[int]]:
    return {int(e["index"]): [int(v) for v in e["box"]] for e in ctx.search["scored"]}


def _stage_classifier(ctx: _Ctx) -> dict[str, Any]:
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
    scores = _scores(ctx)
    score_arr = np.full(n, np.nan)
    score_arr[list(scores)] = list(scores.values())
    top = _positives(ctx)
    split = classifier_split(score_arr, top, cfg.classifier.drop_top, seed=cfg.seed,
                             holdout=cfg.classifier.holdout,
                             exclude=[int(i) for i in ctx.evidence["top_k"] if int(i) not in set(top)])
    boxes = _boxes(ctx)
    top_t = torch.as_tensor(top)
    patches = cut_windows(ctx.store.images[top_t], torch.as_tensor([boxes[i] for i in top]))
    ccfg = ClassifierConfig(iterations=cfg.classifier.iterations, ensemble=cfg.classifier.ensemble,
                            predict_batch_size=cfg.batch_size, decoys=cfg.classifier.decoys, seed=cfg.seed)
    refine_k = refinement_neighbours(cfg.classifier, cfg.decision)
    nbrs = _neighbours(ctx, refine_k) if refine_k else None
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


def _positives(ctx: _Ctx) -> list[int]:
    """The images whose windows the classifier learns as the trigger: the recurring group of the top-k when the
    recurrence test found one at ``p <= max_recurrence_p`` (``classifier_positives="recurring"``), else every top-k
    image (the paper)."""
    top = [int(i) for i in ctx.evidence["top_k"]]
    rec = recurring_group(ctx.evidence, ctx.cfg.decision.max_recurrence_p)
    if ctx.cfg.classifier.positives != "recurring" or rec is None:
        return top
    members = {int(i) for i in rec["members"]}
    return [i for i in top if i in members]


def _load_classifier(ctx: _Ctx) -> None:
    ctx.classifier = ctx.run.read_json("classifier.json")
    ctx.probs = (np.load(ctx.run.file("classifier_probs.npy"), allow_pickle=False)
                 if ctx.classifier.get("trained") else None)


def _neighbours(ctx: _Ctx, k: int) -> np.ndarray:
    """Each image's ``k`` nearest neighbours in the threat model's feature space (searched once per run)."""
    if ctx.neighbour_index is None or ctx.neighbour_index.shape[1] != k:
        ctx.neighbour_index = nearest_neighbours(ctx.features, k, ctx.clustering.centroids)
    return ctx.neighbour_index


def _decide(ctx: _Ctx) -> np.ndarray:
    """Removal scores (the classifier's P averaged with its feature-space neighbours', see ``neighbours``) and the
    removal decision ``score > threshold``; nothing is removed without a trained classifier."""
    if ctx.probs is None:
        return np.zeros(len(ctx.store), dtype=bool)
    k = int(ctx.cfg.decision.neighbours)
    ctx.neighbour_probs, ctx.removal = removal_scores(ctx.probs, _neighbours(ctx, k) if k > 0 else None)
    return ctx.removal > ctx.cfg.decision.threshold


def _stage_verify(ctx: _Ctx) -> dict[str, Any]:
    """Flip-test the window of each image the classifier flags (P > verify_min_prob) but the removal score keeps
    (see ``verification``): removed when it moves more flip-set images than every null window cut from an image
    the classifier does not flag."""
    cfg = ctx.cfg
    cand = (verification_candidates(ctx.probs, _decide(ctx), cfg.decision.verify_min_prob) if ctx.probs is not None
            else np.zeros(0, dtype=np.int64))
    bar = (verification_bar(ctx.evidence.get("null_scores", []), _null_sources(ctx),
                            ctx.probs <= cfg.decision.threshold)
           if ctx.probs is not None else -1)
    entries: list[dict[str, Any]] = []
    if len(cand):
        models, _ = load_classifier(ctx.run.file("classifier.safetensors"))
        models = [m.to(ctx.runtime.device) for m in models]
        images = ctx.store.images[torch.as_tensor(cand)]
        boxes, p_min = occlusion_windows(models, images, ctx.window, ctx.runtime, batch_size=cfg.batch_size)
        flips = _flip_scores(ctx, cut_windows(images, boxes), ctx.clustering.labels[cand], "verify", split=False)
        entries = [{"index": int(i), "prob": float(ctx.probs[i]), "box": [int(v) for v in boxes[j]],
                    "occluded_prob": float(p_min[j]), "poison_score": int(flips[j]),
                    "verified": bool(flips[j] > bar)} for j, i in enumerate(cand)]
    ctx.verify = {"min_prob": cfg.decision.verify_min_prob, "bar": bar, "n_candidates": len(entries),
                  "n_verified": sum(e["verified"] for e in entries), "candidates": entries}
    ctx.verify["picture_match"] = _picture_match(ctx)
    ctx.run.write_json("verify.json", ctx.verify)
    return {"candidates": len(entries), "verified": ctx.verify["n_verified"]}


def _picture_match(ctx: _Ctx) -> dict[str, Any] | None:
    """With a backdoor signal and a recurring picture (``match_picture``), search every image for it
    (detect/matching.py): ``picture_match.npy`` and the record of ``verify.json``; else ``None``."""
    rec = recurring_group(ctx.evidence, ctx.cfg.decision.max_recurrence_p)
    ctx.match = None
    ctx.run.file("picture_match.npy").unlink(missing_ok=True)
    if not ctx.cfg.decision.match_picture or ctx.probs is None or rec is None:
        return None
    boxes, members = _boxes(ctx), [int(i) for i in rec["members"]]
    templates = cut_windows(ctx.store.images[torch.as_tensor(members)],
                            torch.as_tensor([boxes[i] for i in members], dtype=torch.int64))
    ctx.match = best_match(ctx.store.images, templates, ctx.runtime, ctx.cfg.batch_size, ctx.quiet)
    ctx.run.save_npy("picture_match.npy", ctx.match)
    threshold, outlier = match_threshold(ctx.match, rec["bar"])
    contains = ctx.match >= threshold - 1e-9
    flagged = _decide(ctx) | _verified_of(ctx, ctx.verify)
    return {"threshold": threshold, "bar": float(rec["bar"]), "outlier_bar": outlier, "templates": len(members),
            "contain": int(contains.sum()), "flagged_without": int((flagged & ~contains).sum()),
            "added": int((contains & ~flagged).sum())}


def _load_verify(ctx: _Ctx) -> None:
    ctx.verify = ctx.run.read_json("verify.json")
    ctx.match = (np.load(ctx.run.file("picture_match.npy"), allow_pickle=False)
                 if ctx.verify.get("picture_match") else None)


def _verified_of(ctx: _Ctx, verify: dict[str, Any] | None) -> np.ndarray:
    """Bool N: the images the verification step removes (on top of the removal score's decision)."""
    out = np.zeros(len(ctx.store), dtype=bool)
    out[[e["index"] for e in (verify or {}).get("candidates", []) if e["verified"]]] = True
    return out


def _removed(ctx: _Ctx) -> np.ndarray:
    """Bool N, the removal: the images that contain the recurring picture when it was searched for (the
    classifier's flags without it are kept, images with it that the classifier kept are removed); else the removal
    score's decision and the verified flags."""
    pm = (ctx.verify or {}).get("picture_match")
    if pm is not None and ctx.match is not None:
        return ctx.match >= pm["threshold"] - 1e-9
    return _decide(ctx) | _verified_of(ctx, ctx.verify)


def _fmt(values: np.ndarray | None, i: int) -> str:
    return "" if values is None else f"{float(values[i]):.6f}"


def _scores_csv(ctx: _Ctx, removed: np.ndarray, ranks: dict[int, int]) -> str:
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


def _top_clusters(ctx: _Ctx, removed: np.ndarray, limit: int = 10) -> list[dict[str, Any]]:
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


def _summary(ctx: _Ctx, removed: np.ndarray) -> dict[str, Any]:
    cfg, store, ev, clf = ctx.cfg, ctx.store, ctx.evidence, ctx.classifier
    scores, boxes = _scores(ctx), _boxes(ctx)
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
    return {
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


def _stage_outputs(ctx: _Ctx) -> dict[str, Any]:
    run, store = ctx.run, ctx.store
    removed = _removed(ctx)
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
    write_gallery(run, store.images, summary, top_att, _boxes(ctx), removed, ctx.clustering.labels, _scores(ctx))
    run.write_json("summary.json", summary)
    write_report(run, summary)
    return {"removed": int(removed.sum())}


STAGE_FUNCS: dict[str, tuple[Callable[[_Ctx], dict[str, Any]], Callable[[_Ctx], None] | None]] = {
    "store": (_stage_store, _load_store),
    "features": (_stage_features, _load_features),
    "clusters": (_stage_clusters, _load_clusters),
    "search": (_stage_search, _load_search),
    "evidence": (_stage_evidence, _load_evidence),
    "classifier": (_stage_classifier, _load_classifier),
    "verify": (_stage_verify, _load_verify),
    "outputs": (_stage_outputs, None),
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
    ctx = _Ctx(cfg, runtime, run, quiet, on_round, prepare_encoder(encoder.eval(), runtime), meta, source=source)
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
