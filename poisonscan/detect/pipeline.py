"""The detect pipeline: the driver that runs the stages in order, writes their records, and on ``--resume`` loads
the records of the stages that finished instead of running them again.

Stages (each writes its files, then ``stages/<stage>.done``):

1. ``store``      decode the data set at the threat model's resolution (data/store.py; ``store/``)
2. ``features``   L2-normalised encoder features (detect/features.py; ``features.npy``, ``ids.json``)
3. ``clusters``   k-means on rank 0, broadcast (detect/clustering.py; ``clusters.npz``)
4. ``search``     :func:`~poisonscan.detect.search.run_search` -> ``SearchResult`` (``search.json``, written after
                  every round so a killed search resumes from its last finished round with the same result;
                  ``attention.npy``)
5. ``evidence``   :func:`~poisonscan.detect.evidence.run_evidence` -> ``Evidence`` (``evidence.json``)
6. ``match``      :func:`~poisonscan.detect.matching.run_match` -> ``Matching`` (``match.json``,
                  ``picture_match.npy``)
7. ``classifier`` :func:`~poisonscan.detect.classifier.run_classifier` -> ``ClassifierResult`` (``classifier.json``,
                  ``classifier.safetensors``, ``classifier_probs.npy``)
8. ``verify``     :func:`~poisonscan.detect.verification.run_verify` -> ``Verification`` (``verify.json``)
9. ``outputs``    :func:`~poisonscan.detect.decision.decide` -> ``Decision``, then
                  :func:`~poisonscan.detect.outputs.write_outputs`: ``scores.csv``, ``removed.txt``, ``summary.json``,
                  gallery, report

Each stage is a public function of explicit inputs that returns a typed record (detect/records.py); the driver
below holds what finished stages left (:class:`_Driver`) and is the only code that reads or writes the run folder's
records. Under torchrun the features, candidate windows and poison scores are split across ranks by index and
gathered; every random draw is made from a generator seeded before the split (detect/seeds.py), so the result does
not depend on the world size. Match, classifier, verify and outputs run on rank 0 only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from poisonscan import runtime as rt
from poisonscan.config import DetectConfig, check_window, detect_config, validate_config
from poisonscan.data.sources import open_source
from poisonscan.data.store import ImageStore, build_store, open_store, write_errors_csv
from poisonscan.detect.classifier import run_classifier
from poisonscan.detect.clustering import Clustering, choose_n_clusters, fit_kmeans
from poisonscan.detect.decision import decide, removal_flags
from poisonscan.detect.evidence import evidence_gate, run_evidence
from poisonscan.detect.features import ForwardCounter, extract_features, prepare_encoder
from poisonscan.detect.fliptest import FlipTest, flip_test_set
from poisonscan.detect.masking import window_pixels
from poisonscan.detect.matching import run_match
from poisonscan.detect.neighbours import nearest_neighbours
from poisonscan.detect.outputs import ScanResult, write_outputs
from poisonscan.detect.poison_net import classifier_bytes, load_classifier
from poisonscan.detect.records import ClassifierResult, Evidence, Matching, SearchResult, Verification
from poisonscan.detect.resume import STAGES, open_run, read_run_config
from poisonscan.detect.run import DetectRun
from poisonscan.detect.search import masking_window, run_search, search_like_windows
from poisonscan.detect.verification import run_verify
from poisonscan.errors import DataError, UsageError
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runs import RunDir, releases_run_locks
from poisonscan.settings import dotted_names, resolve_config

RoundHook = Callable[[int], None]
MAIN_ONLY = ("match", "classifier", "verify", "outputs")


class _Driver:
    """One detect run: the settings, the runtime, the run folder and the threat model, and what each finished stage
    left (the store, features, clustering, flip test and the stage records)."""

    def __init__(self, cfg: DetectConfig, runtime: rt.Runtime, run: RunDir, quiet: bool, on_round: RoundHook | None,
                 encoder: nn.Module, meta: dict[str, Any], source: Any) -> None:
        self.cfg, self.runtime, self.run, self.quiet, self.on_round = cfg, runtime, run, quiet, on_round
        self.encoder, self.meta, self.source = encoder, meta, source
        self.size = int(encoder.image_size)
        self.window = masking_window(cfg.search, encoder, window_pixels(cfg.search.window, self.size), self.size)
        self.store: ImageStore | None = None
        self.features: np.ndarray | None = None
        self.clustering: Clustering | None = None
        self.search: SearchResult | None = None
        self.evidence: Evidence | None = None
        self.matching: Matching | None = None
        self.classifier: ClassifierResult | None = None
        self.verification: Verification | None = None
        self.timings: dict[str, float] = {}
        self.forwards: dict[str, int] = {}      # threat-model forwards (images encoded) per stage, all ranks
        self.started = 0.0
        self._flip: FlipTest | None = None
        self._neighbours: np.ndarray | None = None

    # -- what several stages ask for ------------------------------------------------------------------------------

    @property
    def flip(self) -> FlipTest:
        """The flip test: the search record's flip set once there is one, else chosen from the clustering."""
        if self._flip is None:
            index = (np.asarray(self.search.flip_set, dtype=np.int64) if self.search is not None else
                     flip_test_set(self.clustering, self.features, self.cfg.search.flip_size, self.cfg.clusters))
            self._flip = FlipTest.of(self.encoder, self.clustering, self.store.images, index, self.runtime,
                                     self.cfg.seed, self.cfg.search.score_rule, self.cfg.batch_size)
        return self._flip

    def neighbours(self, k: int) -> np.ndarray:
        """Each image's ``k`` nearest neighbours in the threat model's feature space (searched once per run)."""
        if self._neighbours is None or self._neighbours.shape[1] != k:
            self._neighbours = nearest_neighbours(self.features, k, self.clustering.centroids)
        return self._neighbours

    # -- stages: compute (returns the done-marker's info) and load -------------------------------------------------

    def store_(self) -> dict[str, Any]:
        source = self.source if self.source is not None else open_source(self.cfg.data)
        self.store = build_store(source, self.size, self.run.file("store"), self.runtime, self.quiet)
        if len(self.store) == 0:
            if self.runtime.is_main:
                write_errors_csv(self.store.errors, self.run.file("errors.csv"))
            raise DataError(f"{self.cfg.data}: no readable image ({len(self.store.errors)} unreadable, see "
                            f"{self.run.file('errors.csv')})")
        return {"n": len(self.store), "errors": len(self.store.errors), "size": self.size}

    def load_store(self) -> None:
        self.store = open_store(self.run.file("store"))
        if self.store.size != self.size:
            raise DataError(f"{self.run.file('store')} holds {self.store.size} px images but the model needs "
                            f"{self.size} px (start a new run)")

    def features_(self) -> dict[str, Any]:
        self.features = extract_features(self.encoder, self.store.images, self.runtime, self.cfg.batch_size,
                                         self.quiet, dtype=self.cfg.feature_dtype)
        if self.runtime.is_main:
            self.run.save_npy("features.npy", self.features)
            self.run.write_json("ids.json", self.store.ids)
        return {"dim": int(self.features.shape[1])}

    def load_features(self) -> None:
        # memory-mapped in its stored dtype: k-means and the flip set read it in chunks
        self.features = np.load(self.run.file("features.npy"), mmap_mode="r", allow_pickle=False)
        if self.features.shape[0] != len(self.store):
            raise DataError(f"{self.run.file('features.npy')} does not match the image store (start a new run)")

    def clusters_(self) -> dict[str, Any]:
        n = choose_n_clusters(len(self.store), self.cfg.clusters)
        clustering = None
        if self.runtime.is_main:
            clustering = fit_kmeans(self.features, n, self.cfg.seed)
            clustering.save(self.run.file("clusters.npz"))
        self.clustering = rt.broadcast_object(clustering)
        return {"n_clusters": n, "requested": self.cfg.clusters}

    def load_clusters(self) -> None:
        self.clustering = Clustering.load(self.run.file("clusters.npz"))

    def search_(self) -> dict[str, Any]:
        run, main = self.run, self.runtime.is_main
        # a search killed after some rounds: keep what they computed (search.json is rewritten after every round)
        saved = rt.broadcast_object(run.read_json("search.json") if main and run.exists("search.json") else None)

        def on_round(record: SearchResult, attention: np.ndarray | None) -> None:
            rnd = len(record.rounds)
            if main:
                if attention is not None:
                    run.save_npy(f"search/attention_{rnd:04d}.npy", attention)
                run.write_json("search.json", record.to_json())
            if self.on_round is not None:
                self.on_round(rnd)

        self.search = run_search(self.cfg.search, self.store.images, self.flip, self.window, self.size, self.quiet,
                                 saved=SearchResult.from_json(saved) if saved else None, on_round=on_round,
                                 top_k=self.cfg.evidence.top_k)
        if main:
            chunks = [np.load(run.file(f"search/attention_{r:04d}.npy"))
                      for r in range(1, len(self.search.rounds) + 1) if run.exists(f"search/attention_{r:04d}.npy")]
            attention = np.concatenate(chunks) if chunks else np.zeros((0, self.size, self.size), np.float16)
            if attention.shape[0] != len(self.search.scored):
                raise DataError(f"{run.file('search')}: attention maps of {attention.shape[0]} images for "
                                f"{len(self.search.scored)} scored (start a new run)")
            run.save_npy("attention.npy", attention.astype(np.float16))
            run.write_json("search.json", self.search.to_json())
        return {"rounds": len(self.search.rounds), "n_scored": len(self.search.scored)}

    def load_search(self) -> None:
        self.search = SearchResult.from_json(self.run.read_json("search.json"))
        if self.runtime.is_main:            # killed right after the search finished: drop its per-round maps
            shutil.rmtree(self.run.file("search"), ignore_errors=True)

    def evidence_(self) -> dict[str, Any]:
        images = self.store.images

        def search_like(indices: np.ndarray) -> Any:
            return search_like_windows(self.cfg.search, images, self.flip, self.window, self.size, indices)

        self.evidence = run_evidence(self.cfg.evidence, self.search, images, self.flip, self.window, search_like,
                                     self.quiet)
        if self.runtime.is_main:
            self.run.write_json("evidence.json", self.evidence.to_json())
        return {"z": self.evidence.z}

    def load_evidence(self) -> None:
        self.evidence = Evidence.from_json(self.run.read_json("evidence.json"))

    def match_(self) -> dict[str, Any]:
        d = self.cfg.decision
        found, _ = evidence_gate(self.evidence, d.min_evidence, d.min_effect, d.max_recurrence_p, d.weak_signal_p)
        record = run_match(self.store.images, self.search, self.evidence, self.runtime, found or d.force,
                           d.max_recurrence_p, d.match_picture, self.cfg.batch_size, self.quiet)
        self.run.file("picture_match.npy").unlink(missing_ok=True)
        if record.match is not None:
            self.run.save_npy("picture_match.npy", record.match)
        self.run.write_json("match.json", record.to_json())
        self.matching = record
        return {"searched": record.searched,
                "contain": record.picture_match.contain if record.picture_match is not None else None}

    def load_match(self) -> None:
        doc = self.run.read_json("match.json")
        match = (np.load(self.run.file("picture_match.npy"), allow_pickle=False) if doc.get("picture_match")
                 else None)
        self.matching = Matching.from_json(doc, match=match)

    def classifier_(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        record, models = run_classifier(cfg.classifier, cfg.decision, self.store.images, self.search, self.evidence,
                                        self.runtime, self.neighbours, cfg.batch_size, cfg.seed, self.quiet,
                                        self.matching)
        if record.trained:
            run.write_bytes("classifier.safetensors", classifier_bytes(models, image_size=self.size,
                                                                       threshold=cfg.decision.threshold,
                                                                       val_f1=record.val_f1))
            run.save_npy("classifier_probs.npy", record.probs)
        else:
            for stale in ("classifier.safetensors", "classifier_probs.npy"):
                run.file(stale).unlink(missing_ok=True)
        run.write_json("classifier.json", record.to_json())
        self.classifier = record
        return {"trained": True, "val_f1": record.val_f1} if record.trained else {"trained": False}

    def load_classifier(self) -> None:
        doc = self.run.read_json("classifier.json")
        probs = (np.load(self.run.file("classifier_probs.npy"), allow_pickle=False) if doc.get("trained")
                 else None)
        self.classifier = ClassifierResult.from_json(doc, probs=probs)

    def verify_(self) -> dict[str, Any]:
        run = self.run
        _, _, flagged = removal_flags(self.cfg.decision, self.classifier.probs, len(self.store), self.neighbours)
        record = run_verify(self.cfg.decision, self.store.images, self.evidence, self.classifier, flagged, self.flip,
                            lambda: load_classifier(run.file("classifier.safetensors"))[0], self.window)
        run.write_json("verify.json", record.to_json())
        self.verification = record
        return {"candidates": record.n_candidates, "verified": record.n_verified}

    def load_verify(self) -> None:
        self.verification = Verification.from_json(self.run.read_json("verify.json"))

    def outputs_(self) -> dict[str, Any]:
        decision = decide(self.cfg.decision, self.evidence, self.classifier, self.verification, self.matching,
                          len(self.store), self.neighbours)
        model = {"checkpoint": self.cfg.model, "arch": getattr(self.encoder, "arch", None), "image_size": self.size,
                 "metadata": self.meta}
        result = ScanResult(self.store, self.clustering, model, self.search, self.evidence, self.matching,
                            self.classifier, self.verification, decision)
        write_outputs(self.run, self.cfg, result, self.timings, self.forwards, self.started)
        return {"removed": decision.n_removed}


#: stage -> (compute, load) on the driver; the outputs stage is always computed
STAGE_FUNCS: dict[str, tuple[Callable[[_Driver], dict[str, Any]], Callable[[_Driver], None] | None]] = {
    "store": (_Driver.store_, _Driver.load_store),
    "features": (_Driver.features_, _Driver.load_features),
    "clusters": (_Driver.clusters_, _Driver.load_clusters),
    "search": (_Driver.search_, _Driver.load_search),
    "evidence": (_Driver.evidence_, _Driver.load_evidence),
    "match": (_Driver.match_, _Driver.load_match),
    "classifier": (_Driver.classifier_, _Driver.load_classifier),
    "verify": (_Driver.verify_, _Driver.load_verify),
    "outputs": (_Driver.outputs_, None),
}


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
    driver = _Driver(cfg, runtime, run, quiet, on_round, prepare_encoder(encoder.eval(), runtime), meta, source)
    counter = ForwardCounter(driver.encoder)
    try:
        _run_stages(driver, done, counter)
    finally:
        counter.close()
    return run.read_json("summary.json") if main else {}


def _run_stages(driver: _Driver, done: dict[str, bool], counter: ForwardCounter) -> None:
    run, main = driver.run, driver.runtime.is_main
    for stage in STAGES:
        if stage in MAIN_ONLY and not main:
            return                          # ranks > 0 have nothing left to share
        compute, load = STAGE_FUNCS[stage]
        if done[stage] and load is not None:
            load(driver)
            if main:
                marker = run.read_json(f"stages/{stage}.done")
                driver.timings[stage] = float(marker.get("seconds", 0.0))
                driver.forwards[stage] = int(marker.get("forwards", 0))
            continue
        driver.started = time.perf_counter()
        counter.take()
        if stage == "outputs":
            driver.forwards["total"] = sum(driver.forwards.values())
        info = compute(driver)
        seconds = time.perf_counter() - driver.started
        forwards = counter.take()
        if stage not in MAIN_ONLY:          # the work was split across ranks: count every rank's share
            forwards = sum(rt.all_gather_object(forwards))
        if stage != "outputs":
            driver.forwards[stage] = forwards
        driver.timings.setdefault(stage, seconds)
        if main:
            run.mark_done(stage, {"seconds": seconds, "forwards": forwards, **info})
            if stage == "search":
                shutil.rmtree(run.file("search"), ignore_errors=True)   # per-round maps, folded into attention.npy
        if stage not in MAIN_ONLY:
            rt.barrier()


def scan(data: str | Path | None, model: str | Path | None, out: str | Path | None = None,
         preset: str | None = None, config: str | Path | None = None, **settings: Any) -> DetectRun | None:
    """Run detect on ``data`` with the threat model ``model`` and return the run (``None`` on ranks > 0 under
    torchrun): the ``preset``'s settings (the defaults when none), then the ``config`` file, then ``settings``
    (``masks=64``, ``min_effect=0.1``, ``device="cpu"``; see :func:`poisonscan.settings.configure`). With
    ``resume=RUN`` the run's own settings replace the preset and the file, and ``settings`` change them."""
    given = {"data": data, "model": model, "out": out, **settings}
    flags = dotted_names(DetectConfig, {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()})
    quiet = bool(settings.pop("quiet", True))
    if settings.get("resume") is not None:
        if preset is not None or config is not None:
            raise UsageError("resume continues with the run's own settings: give changes as settings, not a preset "
                             "or a config file")
        saved = read_run_config(Path(settings["resume"]))
        cfg = resolve_config(DetectConfig, None, flags, tables=[("config.json", saved)])
    else:
        cfg = detect_config(preset, config, flags)
    summary = run_detect(cfg, quiet=quiet)
    return DetectRun.load(summary["run_dir"]) if summary else None
