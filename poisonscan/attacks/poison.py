"""Write a poisoned copy of a labelled data set, its ground truth and a patched validation set.

Output folder (built in ``<out>.partial`` and renamed when complete)::

    train/                    the poisoned training set, same kind as the input (folder, file list, shards)
    ground_truth.csv          one row per sample of train/, in the order open_source(train spec) lists them
    val_patched/              every --val image with the trigger applied (same kind as --val), labels kept,
    val_patched/ground_truth.csv
    triggers/                 copies of the trigger files
    TRIGGER_LICENSE.txt       the HTBA MIT notice when an HTBA trigger is used
    summary.json, config.json

Everything written is a function of the inputs and the config: same seed, same bytes.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from poisonscan import __version__
from poisonscan.attacks.blend import blend_trigger
from poisonscan.attacks.ctrl import ctrl_trigger
from poisonscan.attacks.patch import corner_range, load_trigger, paste_trigger, resize_trigger, trigger_side
from poisonscan.attacks.presets import apply_preset
from poisonscan.config import PoisonConfig
from poisonscan.settings import config_to_dict
from poisonscan.data.sources import (IMAGE_EXTENSIONS, WDS_IMAGE_EXTS, FileListSource, FileSource, SampleError, Source,
                                     decode_image, open_source)
from poisonscan.data.writers import TarWriter, overlaps, unique_name
from poisonscan.errors import DataError, UsageError
from poisonscan.runs import absolute_settings, atomic_write_json, atomic_write_text
from poisonscan.runtime import broadcast_object, is_distributed, progress

ATTACKS = ("patch", "blend", "ctrl")
POISON_SUFFIX = "__poison"
PATCHED_SUFFIX = "__patched"
PNG_COMPRESS_LEVEL = 6
TRAIN_DIR, VAL_DIR, TRIGGER_DIR = "train", "val_patched", "triggers"
GROUND_TRUTH = "ground_truth.csv"
GT_COLUMNS = ("sample_id", "source_id", "label", "poisoned", "target", "target_name", "trigger", "attack",
              "x", "y", "w", "h", "image_w", "image_h")
PARTIAL_MARKER = ".poisonscan-partial"
#: sha256 of the HTBA trigger patches (Saha et al., AAAI 2020; MIT), see data/triggers/PROVENANCE.md
HTBA_SHA256 = {
    "f23b61ac3ee82057b8b3396463e495e64a704982b259914e6b39c0b6b0d333ef": "trigger_10.png",
    "9c76effad5bb62c608ca68cd3e92ee75f7b81e1e3d2f8787872a0dc7c5f544d5": "trigger_11.png",
    "9d5459251570c195494c8dbd1a3d32765a0b51caf87c962b87f74e2fc9147a76": "trigger_12.png",
    "bbc470049a2161b3be2dc0cfc3107ddf0e4971435091bc91f89a700577bfd1db": "trigger_13.png",
    "c3837d1e2638a17ca45703dcccfd7c9cee6c18e06fcaa22e2243a8cc353fed0f": "trigger_14.png",
}
Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------------------------------
# targets


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


def validate_config(cfg: PoisonConfig) -> PoisonConfig:
    """Check every setting that needs no data; returns the config with the effective rate filled in."""
    if cfg.attack not in ATTACKS:
        close = difflib.get_close_matches(cfg.attack, ATTACKS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"--attack {cfg.attack!r} is unknown{hint}: choose {', '.join(ATTACKS)}")
    if not cfg.data:
        raise UsageError("no data set: give DATA or --preset")
    if not cfg.out:
        raise UsageError("no output folder: give --out")
    if not cfg.targets:
        raise UsageError("no target: give --target CLASS=TRIGGER.png (repeat for a multi-target attack)")
    if cfg.attack == "ctrl" and len(cfg.targets) > 1:
        raise UsageError("the ctrl attack has one spectral trigger: give a single --target")
    if cfg.rate is not None and cfg.dataset_rate is not None:
        raise UsageError("give either --rate (fraction of the target class) or --dataset-rate, not both")
    for flag, value in (("--rate", cfg.rate), ("--dataset-rate", cfg.dataset_rate), ("--opacity", cfg.opacity),
                        ("--blend-alpha", cfg.blend_alpha)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
            raise UsageError(f"{flag} {value}: must be in (0, 1]")
    for flag, value in (("--margin", cfg.margin), ("--val-margin", cfg.val_margin)):
        if not 0.0 <= value < 0.5:
            raise UsageError(f"{flag} {value}: must be in [0, 0.5)")
    if cfg.trigger_size <= 0:
        raise UsageError(f"--trigger-size {cfg.trigger_size}: give pixels (>= 1) or a fraction of the side (< 1)")
    if cfg.trigger_size >= 1 and cfg.trigger_size != int(cfg.trigger_size):
        raise UsageError(f"--trigger-size {cfg.trigger_size}: a size of 1 or more is in whole pixels")
    if cfg.attack == "patch" and cfg.trigger_size < 1:
        for flag, m in (("--margin", cfg.margin), ("--val-margin", cfg.val_margin)):
            if cfg.trigger_size > 1 - 2 * m:
                raise UsageError(f"--trigger-size {cfg.trigger_size:g} of the side does not fit between "
                                 f"{flag} {m:g} (at most {1 - 2 * m:g})")
    if cfg.ctrl_block < 0 or cfg.ctrl_block == 1:
        raise UsageError(f"--ctrl-block {cfg.ctrl_block}: give a block side >= 2, or 0 to scale with the image")
    if cfg.rate is None and cfg.dataset_rate is None:
        cfg = replace(cfg, rate=0.5)
    return cfg


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def poison_counts(cfg: PoisonConfig, source: Source, targets: list[Target]) -> list[int]:
    """How many images of its class each target poisons."""
    sizes = [sum(1 for lab in source.labels if lab == t.label) for t in targets]
    if cfg.dataset_rate is not None:
        total = max(len(targets), _round_half_up(cfg.dataset_rate * len(source)))
        base, extra = divmod(total, len(targets))
        counts = [base + (1 if k < extra else 0) for k in range(len(targets))]
    else:
        counts = [max(1, _round_half_up(float(cfg.rate) * n)) for n in sizes]
    for t, size in zip(targets, sizes):
        if size == 0:
            raise UsageError(f"class {t.cls!r} has no images in {cfg.data}")
    demand: dict[int, int] = {}
    for t, n in zip(targets, counts):
        demand[t.label] = demand.get(t.label, 0) + n
    for t, size in zip(targets, sizes):
        if demand[t.label] > size:
            raise UsageError(f"{demand[t.label]} poisoned images are needed from class {t.cls!r}, which has only "
                             f"{size}: lower --rate/--dataset-rate")
    return counts


@dataclass
class Plan:
    """The poisoned training samples: index -> (target, box) and the images left out because unreadable."""

    poisoned: dict[int, tuple[Target, Box]]
    unreadable: list[SampleError]


def _image_box(cfg: PoisonConfig, rng: np.random.Generator, w: int, h: int, margin: float, sample_id: str) -> Box:
    """The trigger box on a ``w x h`` image: a random corner for patch, the whole image for blend/ctrl."""
    if cfg.attack != "patch":
        return 0, 0, w, h
    size = trigger_side(cfg.trigger_size, w, h)
    if size > min(w, h):
        raise UsageError(f"trigger of {size} px is larger than image {sample_id} ({w}x{h}): lower --trigger-size")
    try:
        x_lo, x_hi = corner_range(w, size, margin)
        y_lo, y_hi = corner_range(h, size, margin)
    except ValueError:
        raise UsageError(f"trigger of {size} px does not fit between margins {margin:g} of image {sample_id} "
                         f"({w}x{h}): lower --trigger-size or the margin") from None
    x, y = rng.integers((x_lo, y_lo), (x_hi + 1, y_hi + 1))
    return int(x), int(y), size, size


def plan_poisons(cfg: PoisonConfig, source: Source, targets: list[Target], counts: list[int], quiet: bool) -> Plan:
    """Pick the poisoned images of each target class (unreadable ones are replaced) and draw their boxes."""
    select_rng = np.random.default_rng([cfg.seed, 0])
    box_rng = np.random.default_rng([cfg.seed, 1])
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(source.labels):
        if lab is not None:
            by_class.setdefault(lab, []).append(i)
    taken: set[int] = set()
    chosen: dict[int, Target] = {}
    sizes: dict[int, tuple[int, int]] = {}
    unreadable: list[SampleError] = []
    with progress("poison: choose", total=sum(counts), quiet=quiet) as bar:
        for t, n in zip(targets, counts):
            pool = [i for i in by_class.get(t.label, []) if i not in taken]
            order = [pool[j] for j in select_rng.permutation(len(pool))]
            got = 0
            while got < n and order:
                batch, order = order[: n - got], order[n - got:]
                for i, item in source.iter_indexed(sorted(batch)):
                    taken.add(i)
                    if isinstance(item, SampleError):
                        unreadable.append(item)
                        continue
                    chosen[i] = t
                    sizes[i] = item.image.size
                    got += 1
                    bar.advance()
            if got < n:
                raise UsageError(f"class {t.cls!r} has only {got} readable images left, {n} needed "
                                 f"({len(unreadable)} unreadable): lower --rate/--dataset-rate")
    poisoned = {i: (chosen[i], _image_box(cfg, box_rng, *sizes[i], cfg.margin, source.ids[i])) for i in sorted(chosen)}
    return Plan(poisoned, unreadable)


# --------------------------------------------------------------------------------------------------------------------
# applying an attack


def apply_attack(cfg: PoisonConfig, image: Image.Image, target: Target, box: Box, magnitude: float) -> np.ndarray:
    """The attacked pixels of ``image`` (``H x W x 3`` uint8); ``box`` comes from the plan."""
    if cfg.attack == "patch":
        x, y, size, _ = box
        return paste_trigger(image, target.patch(size), x, y, size, cfg.opacity)
    if cfg.attack == "blend":
        assert target.trigger is not None
        return blend_trigger(image, target.trigger, cfg.blend_alpha)
    return ctrl_trigger(np.asarray(image.convert("RGB")), magnitude, block=cfg.ctrl_block or None)


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG with a fixed compression level and no metadata (byte-identical for equal pixels)."""
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# writers: one per output kind; each returns the id open_source(output) gives the written sample


class FileSetWriter:
    """Image folder (same relative paths) or file list (``images/...`` plus a new list with the same name)."""

    needs_bytes = False

    def __init__(self, source: Source, dest: Path, link: bool = False) -> None:
        self.source, self.dest, self.link = source, dest, link
        assert isinstance(source, FileSource)
        self.paths: list[str] = list(source.paths)
        self.is_list = isinstance(source, FileListSource)
        if self.is_list:
            common = os.path.commonpath([os.path.dirname(p) for p in self.paths])
            self.rels = ["images/" + os.path.relpath(p, common).replace(os.sep, "/") for p in self.paths]
            self.list_name = Path(str(source.spec())).name
        else:
            self.rels = list(source.ids)
        self.used: set[str] = set()
        self.taken: list[str] = [unique_name(r, self.used, fold_case=True) for r in self.rels]
        self.lines: list[tuple[str, int | None]] = []
        self.linked = self.copied = 0
        dest.mkdir(parents=True, exist_ok=True)
        for name in source.class_names or []:
            (dest / name).mkdir(parents=True, exist_ok=True)

    def order(self, indices: list[int]) -> list[int]:
        return indices

    def _target(self, rel: str) -> Path:
        path = self.dest.joinpath(*rel.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add_clean(self, i: int, members: dict[str, bytes] | None) -> str:
        rel = self.taken[i]
        dst = self._target(rel)
        if self.link:
            try:
                os.link(self.paths[i], dst)
                self.linked += 1
            except OSError:
                shutil.copy2(self.paths[i], dst)
                self.copied += 1
        else:
            shutil.copy2(self.paths[i], dst)
            self.copied += 1
        self.lines.append((rel, self.source.labels[i]))
        return rel

    def add_image(self, i: int, suffix: str, png: bytes, members: dict[str, bytes] | None) -> str:
        parent, _, fname = self.rels[i].rpartition("/")
        stem = os.path.splitext(fname)[0]
        rel = unique_name(f"{parent + '/' if parent else ''}{stem}{suffix}.png", self.used, fold_case=True)
        with open(self._target(rel), "wb") as fh:
            fh.write(png)
        self.lines.append((rel, self.source.labels[i]))
        return rel

    def finish(self) -> str:
        """Write the file list (file lists only); returns the output spec relative to ``dest``."""
        if not self.is_list:
            return "."
        text = "".join(f"{rel}\n" if lab is None else f"{rel} {lab}\n" for rel, lab in self.lines)
        (self.dest / self.list_name).write_text(text, encoding="utf-8", errors="surrogateescape")
        return self.list_name


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


class WdsWriter:
    """WebDataset shards with the input's relative names; samples in input order, members sorted by extension."""

    needs_bytes = True

    def __init__(self, source: Source, dest: Path, link: bool = False) -> None:
        self.source, self.dest = source, dest
        self.sinks: dict[str, TarWriter] = {}
        self.done: set[str] = set()
        self.keys: dict[str, set[str]] = {}
        for sid in source.ids:
            rel, _, key = sid.partition("::")
            self.keys.setdefault(rel, set()).add(key)
        self.linked = self.copied = 0
        dest.mkdir(parents=True, exist_ok=True)

    def _split(self, i: int) -> tuple[str, str]:
        rel, sep, key = self.source.ids[i].partition("::")
        if not sep or not _safe_rel(rel):
            raise DataError(f"{self.source.ids[i]}: not a '<shard>::<key>' WebDataset id")
        return rel, key

    def order(self, indices: list[int]) -> list[int]:
        """``indices`` grouped by shard (first appearance), input order within a shard."""
        first: dict[str, int] = {}
        for k, i in enumerate(indices):
            first.setdefault(self._split(i)[0], k)
        return sorted(indices, key=lambda i: first[self._split(i)[0]])

    def _sink(self, rel: str) -> TarWriter:
        if rel not in self.sinks:
            if rel in self.done:
                raise RuntimeError(f"shard {rel} reopened: samples must come shard by shard")
            for other in list(self.sinks):      # samples come shard by shard: close the finished shard
                self.sinks.pop(other).close()
                self.done.add(other)
            path = self.dest.joinpath(*rel.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sinks[rel] = TarWriter(path)
        return self.sinks[rel]

    def _write(self, rel: str, key: str, members: dict[str, bytes]) -> str:
        self._sink(rel).add_sample(key, members)
        return f"{rel}::{key}"

    def add_clean(self, i: int, members: dict[str, bytes] | None) -> str:
        assert members is not None
        rel, key = self._split(i)
        self.copied += 1
        return self._write(rel, key, members)

    def add_image(self, i: int, suffix: str, png: bytes, members: dict[str, bytes] | None) -> str:
        rel, key = self._split(i)
        new_key = unique_name(f"{key}{suffix}", self.keys[rel])
        image_ext = self.source.image_ext(i)
        extra = {e: d for e, d in (members or {}).items() if e != image_ext and e not in _IMAGE_EXTS}
        label = self.source.labels[i]
        if "cls" not in extra and label is not None:
            extra["cls"] = str(label).encode()
        return self._write(rel, new_key, {**extra, "png": png})

    def finish(self) -> str:
        for rel in list(self.sinks):
            self.sinks.pop(rel).close()
        return "."


_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS} | set(WDS_IMAGE_EXTS)


def make_writer(source: Source, dest: Path, link: bool) -> FileSetWriter | WdsWriter:
    if isinstance(source, FileSource):
        return FileSetWriter(source, dest, link)
    if source.is_sharded:
        return WdsWriter(source, dest)
    raise UsageError(f"cannot write a data set of kind {source.kind!r}")


# --------------------------------------------------------------------------------------------------------------------
# writing the sets


@dataclass
class Row:
    """One ground-truth row."""

    sample_id: str
    source_id: str
    label: int | None
    target: Target | None = None
    box: Box | None = None
    size: tuple[int, int] | None = None     # (w, h) of the attacked image the box refers to


def _gt_text(rows: list[Row], attack: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(GT_COLUMNS)
    for r in rows:
        t = r.target
        trig = "" if t is None else (t.file_name or attack)
        box = list(r.box) if r.box is not None else ["", "", "", ""]
        size = list(r.size) if r.size is not None else ["", ""]
        w.writerow([r.sample_id, r.source_id, "" if r.label is None else r.label, int(t is not None),
                    "" if t is None else t.label, "" if t is None else t.name, trig, "" if t is None else attack,
                    *box, *size])
    return buf.getvalue()


def _ordered(rows: list[Row], out_source: Source, what: str) -> list[Row]:
    """``rows`` in the order of ``out_source`` (fails loudly if the written ids are not the predicted ones)."""
    by_id = {r.sample_id: r for r in rows}
    if set(by_id) != set(out_source.ids) or len(by_id) != len(rows):
        missing = sorted(set(by_id) ^ set(out_source.ids))[:3]
        raise RuntimeError(f"{what}: written ids differ from the ids open_source reports (e.g. {missing})")
    return [by_id[s] for s in out_source.ids]


def write_train(cfg: PoisonConfig, source: Source, plan: Plan, dest: Path, quiet: bool) -> dict[str, Any]:
    """Copy clean samples, write poisoned ones; returns the set's summary (rows under ``"rows"``)."""
    writer = make_writer(source, dest, cfg.link)
    rows: list[Row] = []
    dropped: list[SampleError] = []
    order = writer.order(list(range(len(source))))
    stream = source.iter_raw(order) if writer.needs_bytes else ((i, None) for i in order)
    with progress("poison: train", total=len(source), quiet=quiet) as bar:
        for i, members in stream:
            bar.advance()
            if isinstance(members, SampleError):
                dropped.append(members)
                continue
            sid = source.ids[i]
            if i in plan.poisoned:
                target, box = plan.poisoned[i]
                data = members if members is not None else source.read_members(i)
                image = decode_image(data[source.image_ext(i)], sid, source.max_pixels)
                png = encode_png(apply_attack(cfg, image, target, box, cfg.ctrl_magnitude))
                rows.append(Row(writer.add_image(i, POISON_SUFFIX, png, data), sid, source.labels[i], target, box,
                                image.size))
            else:
                rows.append(Row(writer.add_clean(i, members), sid, source.labels[i]))
    spec = writer.finish()
    return {"rows": rows, "spec": spec, "dropped": dropped, "linked": writer.linked, "copied": writer.copied}


def write_val(cfg: PoisonConfig, source: Source, targets: list[Target], dest: Path, quiet: bool) -> dict[str, Any]:
    """Every validation image attacked once per target (margin ``val_margin``), labels kept."""
    writer = make_writer(source, dest, link=False)
    rng = np.random.default_rng([cfg.seed, 2])
    rows: list[Row] = []
    dropped: list[SampleError] = []
    suffixes = [PATCHED_SUFFIX if len(targets) == 1 else f"{PATCHED_SUFFIX}-t{t.index}" for t in targets]
    with progress("poison: val", total=len(source), quiet=quiet) as bar:
        for i, item in source.iter_raw(writer.order(list(range(len(source))))):
            bar.advance()
            if isinstance(item, SampleError):
                dropped.append(item)
                continue
            sid = source.ids[i]
            try:
                image = decode_image(item[source.image_ext(i)], sid, source.max_pixels)
            except DataError as exc:
                dropped.append(SampleError(sid, str(exc)))
                continue
            for t, suffix in zip(targets, suffixes):
                box = _image_box(cfg, rng, *image.size, cfg.val_margin, sid)
                png = encode_png(apply_attack(cfg, image, t, box, cfg.ctrl_val_magnitude))
                rows.append(Row(writer.add_image(i, suffix, png, None), sid, source.labels[i], t, box, image.size))
    spec = writer.finish()
    if not rows:
        raise UsageError(f"--val {cfg.val}: no readable image")
    return {"rows": rows, "spec": spec, "dropped": dropped}


# --------------------------------------------------------------------------------------------------------------------
# output folder handling


def check_output(out: Path, overwrite: bool, sources: list[Source]) -> None:
    """Refuse an output that exists (unless --overwrite on a poison output) or overlaps an input."""
    for src in sources:
        for root in src.input_paths():
            if overlaps(out, root):
                raise UsageError(f"output {out} overlaps the input {root}: the input is never modified")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} exists (use --overwrite to replace it)")
        try:
            previous = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("command") != "poison":
            raise UsageError(f"refusing to replace {out}: it is not a poisonscan poison output (no summary.json)")
    partial = _partial(out)
    if partial.exists() and not (partial / PARTIAL_MARKER).exists():
        raise UsageError(f"{partial} exists and was not made by poisonscan: remove it or choose another --out")


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _commit(partial: Path, out: Path) -> None:
    """Replace ``out`` by ``partial`` (the old output survives until the new one is in place)."""
    (partial / PARTIAL_MARKER).unlink()
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old)


def _licence_text(targets: list[Target]) -> str:
    used = ", ".join(sorted({t.file_name or "" for t in targets if t.htba}))
    notice = resources.files("poisonscan").joinpath("assets/triggers/LICENSE-HTBA.txt").read_text(encoding="utf-8")
    return (f"The trigger patches of this data set ({used}) are HTBA triggers from Saha, Subramanya and Pirsiavash, "
            f"\"Hidden Trigger Backdoor Attacks\" (AAAI 2020), distributed under the MIT licence:\n\n{notice}")


def _versions() -> dict[str, str]:
    return {"poisonscan": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
            "pillow": PIL.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION}


def _counts(rows: list[Row], source: Source, aliases: dict[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        cls, _ = class_display(r.label, source, aliases)
        entry = out.setdefault(cls, {"n": 0, "poisoned": 0})
        entry["n"] += 1
        entry["poisoned"] += int(r.target is not None)
    return dict(sorted(out.items()))


def _names(rows: list[Row], source: Source, aliases: dict[str, int]) -> dict[str, str]:
    """Readable names of the classes present (from classes.tsv) where they differ from the data set's own."""
    pairs = {class_display(lab, source, aliases) for lab in {r.label for r in rows}}
    return dict(sorted((cls, name) for cls, name in pairs if cls != name))


def _dropped(errors: list[SampleError]) -> dict[str, Any]:
    return {"n": len(errors), "examples": [{"id": e.id, "reason": e.reason} for e in errors[:5]]}


# --------------------------------------------------------------------------------------------------------------------
# entry point


def poison_dataset(cfg: PoisonConfig, quiet: bool = False) -> dict[str, Any]:
    """Write the poisoned data set described by ``cfg``; returns the summary (also written as summary.json).

    Everything that can be checked before writing is checked first (``UsageError``, nothing written); the output is
    built in ``<out>.partial`` and renamed at the end. Under torchrun only rank 0 writes; the summary is broadcast.
    """
    if not is_distributed():
        rank = int(os.environ.get("RANK", "0"))
        if rank > 0:    # launched by torchrun without a process group: rank 0 alone writes
            return {"command": "poison", "skipped": f"rank {rank}: only rank 0 writes the data set"}
        return _poison(cfg, quiet)
    import torch.distributed as dist

    result: dict[str, Any] | None = None
    if dist.get_rank() == 0:
        try:
            result = _poison(cfg, quiet)
        except Exception as exc:
            broadcast_object({"error": str(exc)})
            raise
    result = broadcast_object(result)
    if result is not None and set(result) == {"error"}:
        raise UsageError(result["error"])
    return result or {}


def _poison(cfg: PoisonConfig, quiet: bool) -> dict[str, Any]:
    cfg = validate_config(apply_preset(cfg))
    out = Path(cfg.out)
    source = open_source(cfg.data)
    if not source.has_labels:
        raise UsageError(f"{cfg.data} has no labels: poisoning needs each image's class (ImageFolder layout, "
                         f"'path label' lists, or .cls members)")
    val_source = open_source(cfg.val) if cfg.val else None
    check_output(out, cfg.overwrite, [s for s in (source, val_source) if s is not None])
    targets = build_targets(cfg, source)
    counts = poison_counts(cfg, source, targets)
    plan = plan_poisons(cfg, source, targets, counts, quiet)

    partial = _partial(out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("poisonscan poison output in progress\n")
    try:
        summary = _write_all(cfg, source, val_source, targets, plan, partial, quiet)
        _commit(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {**summary, "out": str(out)}


def _write_all(cfg: PoisonConfig, source: Source, val_source: Source | None, targets: list[Target], plan: Plan,
               partial: Path, quiet: bool) -> dict[str, Any]:
    aliases = class_aliases(source)
    train = write_train(cfg, source, plan, partial / TRAIN_DIR, quiet)
    train_spec = TRAIN_DIR if train["spec"] == "." else f"{TRAIN_DIR}/{train['spec']}"
    rows = _ordered(train["rows"], open_source(partial / train_spec), "train")
    atomic_write_text(partial / GROUND_TRUTH, _gt_text(rows, cfg.attack))

    for t in targets:
        if t.trigger_path is not None and t.file_name is not None:
            dst = partial / TRIGGER_DIR / t.file_name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(t.trigger_path, dst)
    licence = None
    if any(t.htba for t in targets):
        licence = "TRIGGER_LICENSE.txt"
        atomic_write_text(partial / licence, _licence_text(targets))

    # the paths absolute (the data set, its val set, each trigger), so the settings name the same files anywhere
    settings = absolute_settings({k: v for k, v in config_to_dict(cfg).items() if k not in ("out", "overwrite")})
    summary: dict[str, Any] = {
        "command": "poison",
        "attack": cfg.attack,
        "seed": cfg.seed,
        "input": {"kind": source.kind, "spec": cfg.data, "n": len(source), "unlisted_errors": len(source.errors)},
        "train": {
            "kind": "wds" if source.is_sharded else source.kind, "spec": train_spec,
            "ground_truth": GROUND_TRUTH, "n": len(rows), "poisoned": len(plan.poisoned),
            "poison_fraction": round(len(plan.poisoned) / max(1, len(rows)), 6),
            "per_class": _counts(rows, source, aliases),
            "class_names": _names(rows, source, aliases),
            "copied": train["copied"], "linked": train["linked"],
            "dropped_unreadable": _dropped(train["dropped"]),
            "replaced_unreadable_candidates": _dropped(plan.unreadable),
        },
        "targets": [{
            "index": t.index, "label": t.label, "class": t.cls, "name": t.name,
            "trigger": t.file_name, "trigger_source": str(t.trigger_path) if t.trigger_path else None,
            "trigger_sha256": t.sha256, "htba": t.htba, "class_size": sum(1 for lab in source.labels if lab == t.label),
            "poisoned": sum(1 for tt, _ in plan.poisoned.values() if tt is t),
        } for t in targets],
        "val_patched": None,
        "licence": licence,
        "settings": settings,
        "versions": _versions(),
    }
    if val_source is not None:
        val = write_val(cfg, val_source, targets, partial / VAL_DIR, quiet)
        val_spec = VAL_DIR if val["spec"] == "." else f"{VAL_DIR}/{val['spec']}"
        vrows = _ordered(val["rows"], open_source(partial / val_spec), "val_patched")
        atomic_write_text(partial / VAL_DIR / GROUND_TRUTH, _gt_text(vrows, cfg.attack))
        val_aliases = class_aliases(val_source)
        summary["val_patched"] = {
            "kind": "wds" if val_source.is_sharded else val_source.kind, "spec": val_spec,
            "source": cfg.val, "ground_truth": f"{VAL_DIR}/{GROUND_TRUTH}", "n": len(vrows),
            "margin": cfg.val_margin,
            "per_target": {str(t.index): sum(1 for r in vrows if r.target is t) for t in targets},
            "per_class": _counts(vrows, val_source, val_aliases),
            "dropped_unreadable": _dropped(val["dropped"]),
        }
    atomic_write_json(partial / "config.json", settings)
    atomic_write_json(partial / "summary.json", summary)
    return summary

