"""The typed records the detect stages return, and their JSON form (the run folder's ``search.json``,
``evidence.json``, ``match.json``, ``classifier.json`` and ``verify.json``).

Each record is a dataclass whose fields, in order, are its JSON keys: :meth:`Record.to_json` writes them (nested
records and lists of records converted), :meth:`Record.from_json` reads them back. A field marked
``array()`` is an array kept beside the record in its own ``.npy`` file, not in the JSON; one marked
``when_trained()`` is written only for a trained classifier.

    SearchResult   the scored images (window, poison score, cluster, round) and the flip test set
    Evidence       the top-k against random windows: z, effect, the recurring picture (``Recurrence``) and the
                   threat model's response to a held picture (``HeldResponse``)
    Matching       the recurring picture searched for in every image (``PictureMatch``)
    ClassifierResult  the gate's answer and, when it trained, the classifier's figures and P of every image
    Verification   the isolated flags flip-tested (``VerifiedFlag``)
    Decision       the verdict, its reason in one line, and the removal
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

R = TypeVar("R", bound="Record")


def array() -> Any:
    """A field kept out of the JSON form (an array the run folder holds in a ``.npy`` file)."""
    return field(default=None, repr=False, compare=False, metadata={"json": False})


def nested(cls: type[Record], many: bool = False, **kw: Any) -> Any:
    """A field holding a record (``many``: a list of them)."""
    default = {"default_factory": list} if many else {"default": None}
    return field(**default, metadata={"record": cls, "many": many, **kw})


def when_trained(default: Any = None) -> Any:
    """A classifier field written only when the classifier was trained."""
    return field(default=default, metadata={"when_trained": True})


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Record:
    """Base of the stage records: JSON form from the fields, in order."""

    def _writes(self, f: Any) -> bool:
        return f.metadata.get("json", True)

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if self._writes(f)}

    @classmethod
    def from_json(cls: type[R], doc: Mapping[str, Any], **arrays: Any) -> R:
        """The record of the JSON object ``doc`` (keys it does not name are ignored; a missing key takes the
        field's default, and a field without one must be there); ``arrays`` fill the array fields."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if not f.metadata.get("json", True):
                continue
            if f.name not in doc:
                if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                    raise ValueError(f"{cls.__name__}: the record has no {f.name!r}")
                continue
            value = doc[f.name]
            sub = f.metadata.get("record")
            if sub is not None and value is not None:
                value = [sub.from_json(v) for v in value] if f.metadata["many"] else sub.from_json(value)
            values[f.name] = value
        return cls(**values, **arrays)


# -- search ---------------------------------------------------------------------------------------------------------

@dataclass
class ScoredImage(Record):
    """One image the search scored: its candidate window ``box`` (x0, y0, x1, y1), the window's ``poison_score``
    on the flip test set, the masks that covered the winning window (``eta``), its cluster and the round.
    ``flips_tested``: the flip-set images the window was tested on (adaptive flip testing stops a window that can no
    longer reach the top-k: its score is then its hits scaled to the whole set); 0 or the flip set's size: all,
    and the score is exact."""

    index: int
    poison_score: int
    box: list[int]
    eta: int
    cluster: int
    round: int
    flips_tested: int = 0


@dataclass
class SearchResult(Record):
    """The search stage's record (``search.json``): its settings, the flip test set, the rounds, every scored
    image in scoring order, and the clusters' final scores. ``completed`` is false while the search goes on."""

    FORMAT: ClassVar[str] = "poisonscan-search"

    format: str = FORMAT
    completed: bool = False
    method: str = "poisoncam"
    window: int = 0
    n_masks: int = 0
    mask_strategy: str = ""
    rule: str = ""
    aggregate: str = ""
    masking: str = "exact"
    masked_by: str = "pixels"
    masks_per_image: int = 0
    flip_testing: str = "exact"
    flip_error: float = 0.0
    flip_set: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scored: list[ScoredImage] = nested(ScoredImage, many=True)
    cluster_scores: list[list[float]] = field(default_factory=list)

    @property
    def scores(self) -> dict[int, int]:
        """Image index -> poison score."""
        return {e.index: e.poison_score for e in self.scored}

    @property
    def boxes(self) -> dict[int, list[int]]:
        """Image index -> candidate window."""
        return {e.index: list(e.box) for e in self.scored}

    def is_exact(self, entry: ScoredImage) -> bool:
        """Was ``entry``'s window tested on the whole flip set (its score exact, not an estimate)?"""
        return entry.flips_tested == 0 or entry.flips_tested >= len(self.flip_set)


# -- evidence -------------------------------------------------------------------------------------------------------

@dataclass
class Recurrence(Record):
    """The recurrence test (detect/recurrence.py): the largest group of alike windows among the top-k
    (``members``: image indices, the centre first) against the groups of random windows. For the held-picture test
    (``signature`` "held", detect/holders.py) the group is the top-k windows whose picture the same images hold,
    the strongest first, ``null_group_*`` are the largest gaps of random windows' pictures, ``holders`` and ``gap``
    the images beyond the group's own that hold it and the largest gap."""

    signature: str = "pixels"
    size: int = 0
    members: list[int] = field(default_factory=list)
    bar: float = 1.0
    quantile: float = 0.0
    null_group_median: float = 0.0
    null_group_p99: float = 0.0
    p_value: float = 1.0
    n_reference: int = 0
    k: int = 0
    holders: int = 0
    gap: float = 0.0


@dataclass
class HeldResponse(Record):
    """The held picture's response test (detect/held_response.py): ``pairs`` of a holder's copy and an alike window
    of an image of its cluster that does not hold it, scored on the flip test; ``wins`` / ``losses`` the pairs
    whose copy moved more / fewer flip-set images, the two sides' mean scores and the sign test's ``p_value``."""

    pairs: int = 0
    wins: int = 0
    losses: int = 0
    holders_mean: float = 0.0
    others_mean: float = 0.0
    p_value: float = 1.0


@dataclass
class Evidence(Record):
    """The evidence stage's record (``evidence.json``): the top-k poison scores against random windows' (``z``,
    ``effect``; detect/evidence.py), the recurrence test, the top-k themselves and the null windows' scores and
    source images."""

    topk_median: float = 0.0
    null_median: float = 0.0
    z: float = 0.0
    z_scale: str = ""
    topk_spread: float = 0.0
    p_value: float = 1.0
    effect: float = 0.0
    best_flip_share: float = 0.0
    null_size: int = 0
    k: int = 0
    n_scored: int = 0
    n_boot: int = 0
    boot_mean: float = 0.0
    boot_std: float = 0.0
    recurrence: Recurrence | None = nested(Recurrence)
    #: the same test with a bar per window: a trigger's copies changed copy by copy (``None``: not run)
    changed_recurrence: Recurrence | None = nested(Recurrence)
    #: a top-k window's picture held by many images of the data set (detect/holders.py; ``None``: not run)
    held_recurrence: Recurrence | None = nested(Recurrence)
    #: whether the threat model responds to the held group's picture (``None``: no held group, or not run)
    held_response: HeldResponse | None = nested(HeldResponse)
    #: the same test on the threat model's features against search-like windows (``None``: not run)
    feature_recurrence: Recurrence | None = nested(Recurrence)
    top_k: list[int] = field(default_factory=list)
    topk_scores: list[int] = field(default_factory=list)
    null_scores: list[int] = field(default_factory=list)
    null_testing: str = "exact"
    null_tested: list[int] = field(default_factory=list)
    n_flip: int = 0
    null_sources: list[int] = field(default_factory=list)
    null_pool: str = "all"
    null_pool_size: int = 0
    null_excluded_clusters: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], **arrays: Any) -> Evidence:
        for key, signature in (("recurrence", "pixels"), ("changed_recurrence", "changed"),
                               ("held_recurrence", "held"), ("feature_recurrence", "features")):
            rec = doc.get(key)
            if rec is not None and rec.get("signature") != signature:     # another test's record: not this one's
                doc = {**doc, key: None}
        return super().from_json(doc, **arrays)


# -- the picture match ----------------------------------------------------------------------------------------------

@dataclass
class PictureMatch(Record):
    """The search for the recurring picture (detect/matching.py): the match ``threshold``, the recurrence bar and
    the outlier bar it comes from, the number of templates and how many images contain the picture. With a
    classifier as well (the decision fills them): how many of its flags lack the picture (``flagged_without``) and
    how many images with it it kept (``added``); ``None`` when no classifier ran."""

    threshold: float
    bar: float
    outlier_bar: float
    templates: int
    contain: int
    #: of those, the images outside the group the templates were cut from (``None``: not counted)
    beyond_group: int | None = None
    flagged_without: int | None = None
    added: int | None = None


@dataclass
class Matching(Record):
    """The match stage's record (``match.json``): why the picture was or was not searched for (``reason``), the
    search's figures (``picture_match``), and every image's best similarity to the picture (``match``,
    ``picture_match.npy``; ``None`` when it was not searched for)."""

    searched: bool = False
    reason: str = ""
    picture_match: PictureMatch | None = nested(PictureMatch)
    match: np.ndarray | None = array()


# -- classifier -----------------------------------------------------------------------------------------------------

@dataclass
class ClassifierResult(Record):
    """The classifier stage's record (``classifier.json``): the evidence gate's answer (``backdoor_found``,
    ``reason``), whether the classifier was trained anyway (``forced``), why it was not trained with a signal
    (``skipped``: the picture match decides the removal), and when it was: its figures, the top-k images it learned
    as positives, the refinement rounds; ``probs`` is its P(poisonous) of every image (``classifier_probs.npy``)."""

    trained: bool = False
    ensemble: int = 1
    iterations: int = 0
    val_f1: float | None = None
    threshold: float = 0.5
    backdoor_found: bool = False
    forced: bool = False
    reason: str = ""
    skipped: str = ""
    iterations_per_model: list[int] | None = when_trained()
    best_iteration: list[int] | None = when_trained()
    split: dict[str, int] | None = when_trained()
    positives: list[int] | None = when_trained()
    rounds: int | None = when_trained()
    refinement_dropped: list[int] | None = when_trained()
    refine_by: str | None = when_trained()
    history: list[dict[str, float]] | None = when_trained()
    probs: np.ndarray | None = array()

    def _writes(self, f: Any) -> bool:
        return super()._writes(f) and (self.trained or not f.metadata.get("when_trained"))


# -- verification ---------------------------------------------------------------------------------------------------

@dataclass
class VerifiedFlag(Record):
    """An isolated flag flip-tested (detect/verification.py): the window whose occlusion lowers P the most, P
    with it occluded, its poison score, and whether it passed the bar."""

    index: int
    prob: float
    box: list[int]
    occluded_prob: float
    poison_score: int
    verified: bool


@dataclass
class Verification(Record):
    """The verify stage's record (``verify.json``)."""

    min_prob: float = 1.0
    bar: float = -1
    n_candidates: int = 0
    n_verified: int = 0
    candidates: list[VerifiedFlag] = nested(VerifiedFlag, many=True)

    def verified(self, n: int) -> np.ndarray:
        """Bool ``n``: the images the flip test verified."""
        out = np.zeros(n, dtype=bool)
        out[[e.index for e in self.candidates if e.verified]] = True
        return out


# -- decision -------------------------------------------------------------------------------------------------------

@dataclass
class Decision(Record):
    """The run's answer (detect/decision.py): the verdict, the one line that says why, and the removal (``removed``:
    bool per image; ``removal_score`` and ``neighbour_probs``: the classifier's P averaged with its neighbours',
    ``None`` without a classifier); ``picture_match``: the match's record with the classifier's flags compared."""

    backdoor_found: bool = False
    forced: bool = False
    verdict: str = "no backdoor signal"
    reason: str = ""
    n_removed: int = 0
    removed: np.ndarray | None = array()
    removal_score: np.ndarray | None = array()
    neighbour_probs: np.ndarray | None = array()
    picture_match: PictureMatch | None = nested(PictureMatch)
