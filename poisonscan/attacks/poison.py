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

Its length is the writing of one poisoned data set end to end (attack, train, val, ground truth, the atomic
commit); the targets, the plan and the output writers are attacks/targets.py, plan.py and writers.py.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from poisonscan import __version__
from poisonscan.attacks.blend import blend_trigger
from poisonscan.attacks.ctrl import ctrl_trigger
from poisonscan.attacks.patch import IDENTITY, Transform, paste_trigger
from poisonscan.attacks.plan import Box, Plan, image_box, next_transform, plan_poisons, poison_counts
from poisonscan.attacks.presets import apply_preset
from poisonscan.attacks.targets import Target, build_targets, class_aliases, class_display
from poisonscan.attacks.writers import make_writer
from poisonscan.config import PoisonConfig
from poisonscan.data.sources import SampleError, Source, decode_image, open_source
from poisonscan.data.writers import overlaps
from poisonscan.errors import DataError, UsageError
from poisonscan.runs import absolute_settings, atomic_write_json, atomic_write_text
from poisonscan.runtime import broadcast_object, is_distributed, progress
from poisonscan.settings import config_to_dict

ATTACKS = ("patch", "blend", "ctrl")
POISON_SUFFIX = "__poison"
PATCHED_SUFFIX = "__patched"
PNG_COMPRESS_LEVEL = 6
TRAIN_DIR, VAL_DIR, TRIGGER_DIR = "train", "val_patched", "triggers"
GROUND_TRUTH = "ground_truth.csv"
GT_COLUMNS = ("sample_id", "source_id", "label", "poisoned", "target", "target_name", "trigger", "attack",
              "x", "y", "w", "h", "image_w", "image_h")
PARTIAL_MARKER = ".poisonscan-partial"


# --------------------------------------------------------------------------------------------------------------------
# targets


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
    for flag, value, top in (("--scale-jitter", cfg.scale_jitter, 0.9), ("--rotation", cfg.rotation, 180.0),
                             ("--colour-jitter", cfg.colour_jitter, 1.0)):
        if not 0.0 <= value <= top:
            raise UsageError(f"{flag} {value}: must be in [0, {top:g}]")
        if value and cfg.attack != "patch":
            raise UsageError(f"{flag} changes a pasted trigger: it applies to --attack patch only")
    if cfg.ctrl_block < 0 or cfg.ctrl_block == 1:
        raise UsageError(f"--ctrl-block {cfg.ctrl_block}: give a block side >= 2, or 0 to scale with the image")
    if cfg.rate is None and cfg.dataset_rate is None:
        cfg = replace(cfg, rate=0.5)
    return cfg


def apply_attack(cfg: PoisonConfig, image: Image.Image, target: Target, box: Box, magnitude: float,
                 transform: Transform = IDENTITY) -> np.ndarray:
    """The attacked pixels of ``image`` (``H x W x 3`` uint8); ``box`` and ``transform`` come from the plan."""
    if cfg.attack == "patch":
        x, y, size, _ = box
        return paste_trigger(image, target.patch(size), x, y, size, cfg.opacity, transform)
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
                png = encode_png(apply_attack(cfg, image, target, box, cfg.ctrl_magnitude,
                                              plan.transforms.get(i, IDENTITY)))
                rows.append(Row(writer.add_image(i, POISON_SUFFIX, png, data), sid, source.labels[i], target, box,
                                image.size))
            else:
                try:
                    rows.append(Row(writer.add_clean(i, members), sid, source.labels[i]))
                except DataError as exc:                    # a device or oversized file: listed, never copied
                    dropped.append(SampleError(sid, str(exc)))
    spec = writer.finish()
    return {"rows": rows, "spec": spec, "dropped": dropped, "linked": writer.linked, "copied": writer.copied}


def write_val(cfg: PoisonConfig, source: Source, targets: list[Target], dest: Path, quiet: bool) -> dict[str, Any]:
    """Every validation image attacked once per target (margin ``val_margin``; each copy changed like the training
    set's when the trigger jitters), labels kept."""
    writer = make_writer(source, dest, link=False)
    rng = np.random.default_rng([cfg.seed, 2])
    jitter_rng = np.random.default_rng([cfg.seed, 4])
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
                change = next_transform(cfg, jitter_rng)
                box = image_box(cfg, rng, *image.size, cfg.val_margin, sid, change.scale)
                png = encode_png(apply_attack(cfg, image, t, box, cfg.ctrl_val_magnitude, change))
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

