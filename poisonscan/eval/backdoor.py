"""How strong a backdoor does a threat model carry? (docs/commands/eval.md)

k-NN accuracy on clean val and k-NN "ASR" with the trigger pasted; linear-probe ASR when labelled train features are
given; with the training set's ground truth, the purity of the clusters holding the poisons; and the "oracle flips":
the real trigger pasted on the flip test set (the image nearest each centroid) and how many change cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from poisonscan import runtime as rt
from poisonscan.settings import PAPER
from poisonscan.data.store import ImageStore
from poisonscan.detect.clustering import choose_n_clusters, fit_kmeans
from poisonscan.detect.features import extract_features
from poisonscan.errors import DataError, UsageError
from poisonscan.eval import metrics as M
from poisonscan.eval.knn import knn_vote
from poisonscan.eval.patching import TRIGGER_SIZE, VAL_MARGIN, apply_trigger_batch
from poisonscan.eval.probe import linear_probe, probe_report, stratified_subset

__all__ = ["knn_predict", "flip_test_rows", "oracle_flips", "backdoor_strength"]


def knn_predict(bank_feats: np.ndarray, bank_labels: Sequence[int] | np.ndarray, query_feats: np.ndarray,
                n_classes: int, k: int = 20, temperature: float = 0.07, exclude_self: bool = False,
                chunk: int = 1024, device: str | torch.device = "cpu") -> np.ndarray:
    """``knn_vote`` on numpy features: the predicted class of each query (int64).

    ``exclude_self``: query row ``i`` never votes with bank row ``i`` (leave-one-out when the bank is the query set
    itself, or its clean version).
    """
    bank = torch.as_tensor(np.asarray(bank_feats, dtype=np.float32), device=device)
    labels = torch.as_tensor(np.asarray(bank_labels, dtype=np.int64), device=device)
    query = torch.as_tensor(np.asarray(query_feats, dtype=np.float32))
    if min(int(k), bank.shape[0] - int(exclude_self)) < 1:
        raise UsageError("the k-NN bank needs at least two samples")
    pred = knn_vote(bank, labels, query, n_classes, k, temperature, exclude_self, chunk)
    return pred.cpu().numpy().astype(np.int64)


def flip_test_rows(cluster_labels: np.ndarray, distances: np.ndarray, n_clusters: int) -> np.ndarray:
    """Row of the sample nearest each (non-empty) centroid: the flip test set, one image per cluster."""
    rows = np.arange(cluster_labels.size)
    order = np.lexsort((rows, distances, cluster_labels))
    first = np.r_[True, np.diff(cluster_labels[order]) != 0]
    return order[first][: n_clusters]


def oracle_flips(encoder: nn.Module, images_u8: torch.Tensor, flip_rows: np.ndarray, clustering: Any,
                 trigger: torch.Tensor | np.ndarray, runtime: rt.Runtime, *, size: float = TRIGGER_SIZE,
                 margin: float = VAL_MARGIN, seed: int = 0, batch_size: int = 256,
                 poison_clusters: Sequence[int] = (), attack: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply the real trigger to the flip test set and count the images whose cluster assignment changes.

    ``attack``: keyword arguments of :func:`apply_trigger_batch` beyond size, margin and seed (default: a patch)."""
    flip_rows = np.asarray(flip_rows, dtype=np.int64)
    before = clustering.labels[flip_rows]
    patched = apply_trigger_batch(images_u8[torch.as_tensor(flip_rows)], trigger, size=size, margin=margin,
                                  seed=seed, **(attack or {}))
    after, _ = clustering.assign(extract_features(encoder, patched, runtime, batch_size=batch_size, quiet=True))
    changed = after != before
    dest, counts = np.unique(after[changed], return_counts=True)
    top = int(np.argmax(counts)) if counts.size else None
    return {
        "flip_set": int(flip_rows.size),
        "changed": int(changed.sum()),
        "changed_share": float(changed.mean()) if flip_rows.size else 0.0,
        "top_destination": {"cluster": int(dest[top]), "count": int(counts[top])} if top is not None else None,
        "to_poison_clusters": int(np.isin(after[changed], list(poison_clusters)).sum()) if poison_clusters else None,
    }


def _labels_or_none(store: ImageStore) -> np.ndarray | None:
    if any(label is None for label in store.labels):
        return None
    return np.asarray(store.labels, dtype=np.int64)


def backdoor_strength(encoder: nn.Module, train_store: ImageStore | None, val_store: ImageStore,
                      trigger_u8: torch.Tensor | np.ndarray, target: int, runtime: rt.Runtime,
                      truth_mask: np.ndarray | None = None, *, k: int = 20, temperature: float = 0.07,
                      trigger_size: float = TRIGGER_SIZE, margin: float = VAL_MARGIN, seed: int = 0,
                      n_clusters: int | None = None, probe_fraction: float = 0.01, probe_epochs: int = 100,
                      batch_size: int = 256, train_feats: np.ndarray | None = None,
                      val_feats: np.ndarray | None = None, patched_feats: np.ndarray | None = None,
                      quiet: bool = True, attack: dict[str, Any] | None = None) -> dict[str, Any]:
    """Backdoor strength of ``encoder`` for ``(trigger, target)``: a JSON-ready dict (docs/commands/eval.md).

    ``val_store`` needs labels. ``train_store`` (optional) is the poisoned training set: the k-NN bank when labelled
    (else the val set leave-one-out), the linear probe's training data, the clustering; ``truth_mask`` (bool per
    train sample) marks its poisons. Precomputed L2-normalised features may be passed to skip encoding.
    """
    val_labels = _labels_or_none(val_store)
    if val_labels is None:
        raise DataError("the validation set needs a label for every sample (k-NN accuracy and ASR)")
    known = [int(val_labels.max())]
    if train_store is not None:
        known += [int(label) for label in train_store.labels if label is not None]
    n_classes = max(max(known) + 1, len(val_store.class_names or []))
    if not 0 <= target < n_classes:
        raise UsageError(f"target class {target} is outside 0..{n_classes - 1}")
    warnings: list[str] = []
    if val_feats is None:
        val_feats = extract_features(encoder, val_store.images, runtime, batch_size=batch_size, quiet=quiet)
    if patched_feats is None:
        patched = apply_trigger_batch(val_store.images, trigger_u8, size=trigger_size, margin=margin, seed=seed,
                                      **(attack or {}))
        patched_feats = extract_features(encoder, patched, runtime, batch_size=batch_size, quiet=quiet)
    train_labels = _labels_or_none(train_store) if train_store is not None else None
    if train_store is not None and train_feats is None:
        train_feats = extract_features(encoder, train_store.images, runtime, batch_size=batch_size, quiet=quiet)
    if train_store is not None and train_labels is None:
        warnings.append("the training set has unlabelled samples: k-NN uses the val set (leave-one-out), no probe")

    non_target = val_labels != target
    if train_labels is not None:
        bank, bank_labels, loo, bank_name = train_feats, train_labels, False, "train"
    else:
        bank, bank_labels, loo, bank_name = val_feats, val_labels, True, "val (leave-one-out)"
    in_bank = int((bank_labels == target).sum())
    if in_bank < k:     # e.g. a set cleaned of a fully poisoned class: the vote can hardly name the target
        warnings.append(f"the k-NN bank holds {in_bank} image(s) of the target class (fewer than k = {k}), so the "
                        "k-NN ASR is near 0 by construction; give a labelled --train that has the class (e.g. the "
                        "original data) to measure the backdoor")
    pred_clean = knn_predict(bank, bank_labels, val_feats, n_classes, k, temperature, exclude_self=loo)
    pred_patched = knn_predict(bank, bank_labels, patched_feats, n_classes, k, temperature, exclude_self=loo)
    n_nt = int(non_target.sum())
    result: dict[str, Any] = {
        "target": int(target),
        "target_name": val_store.class_names[target] if val_store.class_names and target < len(
            val_store.class_names) else str(target),
        "n_val": int(len(val_labels)), "n_train": int(len(train_store)) if train_store is not None else 0,
        "image_size": int(val_store.images.shape[-1]),
        "trigger": {"size": trigger_size, "margin": margin, "seed": seed},
        "knn": {
            "k": int(k), "temperature": temperature, "bank": bank_name,
            "bank_target_count": in_bank,
            "accuracy": float((pred_clean == val_labels).mean()),
            "accuracy_patched": float((pred_patched == val_labels).mean()),
            "non_target": n_nt,
            "target_rate_clean": float((pred_clean[non_target] == target).mean()) if n_nt else None,
            "asr": float((pred_patched[non_target] == target).mean()) if n_nt else None,
        },
        "probe": None, "clusters": None, "flips": None, "warnings": warnings,
    }
    if train_labels is not None:
        subset = stratified_subset(train_labels, probe_fraction, seed)
        probe = linear_probe(train_feats[subset], train_labels[subset], n_classes, epochs=probe_epochs, seed=seed)
        rep = probe_report(probe, val_feats, val_labels, [target], patched_feats, val_labels)
        result["probe"] = {"fraction": probe_fraction, "n_train": int(subset.size),
                           "accuracy": rep["clean"]["accuracy"], "accuracy_patched": rep["patched"]["accuracy"],
                           **{key: rep["targets"][0][key] for key in ("fp_clean", "fp_patched", "fp_rate_clean",
                                                                      "asr")}}
    if train_store is not None:
        result["clusters"], result["flips"] = _cluster_measures(encoder, train_store, train_feats, truth_mask,
                                                                trigger_u8, runtime, n_clusters, trigger_size,
                                                                margin, seed, batch_size, attack)
    return result


def _cluster_measures(encoder: nn.Module, train_store: ImageStore, train_feats: np.ndarray,
                      truth_mask: np.ndarray | None, trigger: torch.Tensor | np.ndarray, runtime: rt.Runtime,
                      n_clusters: int | None, trigger_size: float, margin: float, seed: int,
                      batch_size: int, attack: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """k-means on the train features (l like detect), poison purity with the truth, and the oracle flips."""
    n = train_feats.shape[0]
    if n < 2:
        raise UsageError("the training set needs at least two readable samples to cluster")
    l = choose_n_clusters(n, n_clusters or PAPER.n_clusters)
    clustering = fit_kmeans(train_feats, l, seed)
    clusters: dict[str, Any] = {"n_clusters": l, "purity": None, "poison_share": None, "n_poisons": None, "top": []}
    poison_clusters: list[int] = []
    if truth_mask is not None:
        mask = np.asarray(truth_mask, dtype=bool)
        if mask.shape != (n,):
            raise ValueError(f"truth_mask must have one entry per train sample ({n}), got {mask.shape}")
        pur = M.poison_cluster_purity(clustering.labels, mask, top=3)
        clusters.update({"purity": pur["purity"], "poison_share": pur["poison_share"],
                         "n_poisons": pur["n_poisons"], "top": pur["clusters"]})
        poison_clusters = [c["cluster"] for c in pur["clusters"]]
    rows = flip_test_rows(clustering.labels, clustering.distances, l)
    flips = oracle_flips(encoder, train_store.images, rows, clustering, trigger, runtime, size=trigger_size,
                         margin=margin, seed=seed + 1, batch_size=batch_size, poison_clusters=poison_clusters,
                         attack=attack)
    return clusters, flips
