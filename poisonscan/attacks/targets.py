"""The attack targets of ``poisonscan poison``: ``CLASS=TRIGGER`` pairs resolved against the source's classes."""

from __future__ import annotations

import csv
import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from poisonscan.attacks.patch import load_trigger, resize_trigger
from poisonscan.config import PoisonConfig
from poisonscan.data.sources import Source
from poisonscan.errors import UsageError

#: sha256 of the HTBA trigger patches (Saha et al., AAAI 2020; MIT), see data/triggers/PROVENANCE.md
HTBA_SHA256 = {
    "f23b61ac3ee82057b8b3396463e495e64a704982b259914e6b39c0b6b0d333ef": "trigger_10.png",
    "9c76effad5bb62c608ca68cd3e92ee75f7b81e1e3d2f8787872a0dc7c5f544d5": "trigger_11.png",
    "9d5459251570c195494c8dbd1a3d32765a0b51caf87c962b87f74e2fc9147a76": "trigger_12.png",
    "bbc470049a2161b3be2dc0cfc3107ddf0e4971435091bc91f89a700577bfd1db": "trigger_13.png",
    "c3837d1e2638a17ca45703dcccfd7c9cee6c18e06fcaa22e2243a8cc353fed0f": "trigger_14.png",
}


@dataclass(eq=False)
class Target:
    """One (target class, trigger) pair of the attack."""

    index: int
    label: int
    cls: str                        # the class as the data set names it (folder name or label index)
    name: str                       # a readable name (classes.tsv) or ``cls``
    trigger_path: Path | None = None
    trigger: Image.Image | None = None
    sha256: str | None = None
    file_name: str | None = None    # name of the copy under triggers/
    _patches: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def htba(self) -> bool:
        return self.sha256 in HTBA_SHA256

    def patch(self, size: int) -> np.ndarray:
        """The trigger resized to ``size x size`` (cached)."""
        if size not in self._patches:
            assert self.trigger is not None
            self._patches[size] = resize_trigger(self.trigger, size)
        return self._patches[size]


def split_target(spec: str, attack: str) -> tuple[str, str | None]:
    """``CLASS=TRIGGER.png`` -> (class, trigger path); CTRL takes ``CLASS`` alone (its trigger is spectral)."""
    cls, sep, trig = spec.partition("=")
    cls, trig = cls.strip(), trig.strip()
    if not cls:
        raise UsageError(f"--target {spec!r}: give CLASS=TRIGGER.png (class name or index)")
    if attack == "ctrl":
        if trig:
            raise UsageError(f"--target {spec!r}: the ctrl attack uses no trigger image; give the class alone")
        return cls, None
    if not sep or not trig:
        raise UsageError(f"--target {spec!r}: give CLASS=TRIGGER.png (class name or index, then the trigger image)")
    return cls, trig


def class_aliases(source: Source) -> dict[str, int]:
    """Readable class names from a ``classes.tsv`` (``index`` column plus name columns) next to the data set.

    Used only when its rows agree with the data set's class folders; an unreadable file is ignored.
    """
    for folder in (Path(source.root), Path(source.root).parent):
        path = folder / "classes.tsv"
        if not path.is_file():
            continue
        try:
            rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t"))
            table = {int(r["index"]): [v.strip() for k, v in r.items() if k != "index" and v] for r in rows}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        names = source.class_names
        if names is not None and not all(0 <= k < len(names) and names[k] in vals for k, vals in table.items()):
            continue
        return {v: k for k, vals in table.items() for v in vals}
    return {}


def resolve_class(cls: str, source: Source, aliases: dict[str, int]) -> int:
    """The label of ``cls`` (class folder name, readable name or index); unknown -> ``UsageError`` with hints."""
    names = source.class_names or []
    labels = sorted({lab for lab in source.labels if lab is not None})
    if cls in names:
        return names.index(cls)
    if cls in aliases:
        return aliases[cls]
    folded = {k.casefold(): v for k, v in {**aliases, **{n: i for i, n in enumerate(names)}}.items()}
    if cls.casefold() in folded:
        return folded[cls.casefold()]
    if re.fullmatch(r"-?\d+", cls):
        label = int(cls)
        n_classes = len(names) if names else (max(labels) + 1 if labels else 0)
        if 0 <= label < n_classes:
            return label
        raise UsageError(f"class index {label} is out of range: the data set has labels 0..{n_classes - 1}")
    known = list(names) + list(aliases)
    close = difflib.get_close_matches(cls, known, n=3, cutoff=0.5)
    if not close:
        close = [k for k in known if cls.casefold() in k.casefold()][:3]
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    if not known:
        raise UsageError(f"class {cls!r}: this data set has no class names, give a label index "
                         f"({labels[0]}..{labels[-1]})")
    raise UsageError(f"class {cls!r} is not in the data set{hint}")


def class_display(label: int | None, source: Source, aliases: dict[str, int]) -> tuple[str, str]:
    """(the data set's name for ``label``, a readable name) of a label."""
    if label is None:
        return "unlabelled", "unlabelled"
    names = source.class_names
    cls = names[label] if names and 0 <= label < len(names) else str(label)
    readable = [a for a, k in aliases.items() if k == label and a != cls and not re.fullmatch(r"\d+", a)]
    return cls, (readable[-1] if readable else cls)


def build_targets(cfg: PoisonConfig, source: Source) -> list[Target]:
    """Parse, resolve and load every ``--target``; triggers are read and hashed here."""
    aliases = class_aliases(source)
    targets: list[Target] = []
    for k, spec in enumerate(cfg.targets):
        cls_text, trig = split_target(spec, cfg.attack)
        label = resolve_class(cls_text, source, aliases)
        cls, name = class_display(label, source, aliases)
        t = Target(k, label, cls, name)
        if trig is not None:
            t.trigger_path = Path(trig)
            t.trigger = load_trigger(t.trigger_path)
            t.sha256 = hashlib.sha256(t.trigger_path.read_bytes()).hexdigest()
        targets.append(t)
    pairs = [(t.label, t.sha256) for t in targets]
    if len(set(pairs)) != len(pairs):
        raise UsageError("the same class and trigger are given twice in --target")
    used: dict[str, str | None] = {}
    for t in targets:
        if t.trigger_path is None:
            continue
        fname = t.trigger_path.name
        if fname in used and used[fname] != t.sha256:
            fname = f"t{t.index}-{fname}"
        used[fname] = t.sha256
        t.file_name = fname
    return targets


# --------------------------------------------------------------------------------------------------------------------
# validation and selection
