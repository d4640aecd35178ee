"""Terminal output of a run: the ``detect`` summary tables, plain JSON, and a generic table for ``eval``.

Every string that comes from the data set, the config or the file system is shown as literal text (never parsed as
rich markup), so a sample named ``[bold]x[/bold].png`` prints as written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["print_detect_summary", "print_json", "print_table", "to_jsonable", "printable", "format_value",
           "format_seconds"]


def printable(value: Any) -> str:
    """``str(value)`` safe to encode as UTF-8 (lone surrogates from undecodable file names become ``\\udcxx``)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def format_value(value: Any, digits: int = 4) -> str:
    """Human-readable cell text: ``-`` for missing, ``yes``/``no``, ints with separators, floats to ``digits``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, np.number)) for v in value):
        return "(" + ", ".join(format_value(v, digits) for v in value) + ")"
    return printable(value)


def format_seconds(seconds: Any) -> str:
    """``0.42 s``, ``12.3 s``, ``3 min 05 s``, ``1 h 02 min``."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(s):
        return "-"
    if s < 10:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps`` writes as strict JSON: numpy scalars and arrays become Python values,
    non-finite floats become ``null``, paths and sets become strings and lists."""
    if isinstance(obj, Mapping):
        return {printable(k) if not isinstance(k, (int, float, bool)) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, Path):
        return printable(obj)
    if obj is None:
        return None
    if hasattr(obj, "item") and callable(obj.item):  # torch / numpy 0-d tensors
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return obj


def print_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON on stdout: plain ``print``, no rich markup, nothing else."""
    print(json.dumps(to_jsonable(obj), indent=2, default=str, allow_nan=False), flush=True)


def _cell(value: Any) -> Text:
    return value if isinstance(value, Text) else Text(format_value(value))


def print_table(title: str, rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], console: Console,
                columns: Sequence[str] | None = None, max_rows: int | None = None) -> None:
    """Print ``rows`` (dicts, or sequences with ``columns``) as one rich table; numbers are right-aligned.

    Columns default to the union of the dicts' keys in first-seen order; ``max_rows`` cuts long tables with a note.
    """
    rows = list(rows)
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            if not isinstance(row, Mapping):
                raise ValueError("print_table: pass columns= when rows are sequences")
            seen.update(dict.fromkeys(row.keys()))
        columns = list(seen)
    def cells(row: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
        if isinstance(row, Mapping):
            return [row.get(col) for col in columns]
        return (list(row) + [None] * len(columns))[: len(columns)]

    shown = [cells(row) for row in (rows if max_rows is None else rows[:max_rows])]
    table = Table(title=Text(printable(title), style="bold"), title_justify="left")
    for c, col in enumerate(columns):
        is_num = any(isinstance(r[c], (int, float, np.number)) and not isinstance(r[c], (bool, np.bool_))
                     for r in shown)
        table.add_column(Text(printable(col)), justify="right" if is_num else "left")
    for r in shown:
        table.add_row(*(_cell(v) for v in r))
    console.print(table)
    if max_rows is not None and len(rows) > max_rows:
        console.print(Text(f"{len(rows) - max_rows:,} more rows not shown", style="dim"))


def _kv_table(title: str, pairs: Sequence[tuple[str, Any]]) -> Table:
    table = Table(title=Text(title, style="bold"), title_justify="left", show_header=False, box=None,
                  padding=(0, 2, 0, 0))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in pairs:
        table.add_row(Text(key), _cell(value))
    return table


def _pct(fraction: Any) -> str:
    try:
        return f"{100 * float(fraction):.2f}%"
    except (TypeError, ValueError):
        return "-"


def _overview(summary: Mapping[str, Any]) -> Table:
    source = summary.get("source") or {}
    model = summary.get("model") or {}
    counts = summary.get("counts") or {}
    clusters = summary.get("clusters") or {}
    search = summary.get("search") or {}
    clf = summary.get("classifier") or {}
    rounds = search.get("rounds") or []

    src = Text(printable(source.get("spec", "-")))
    src.append(f"  ({printable(source.get('kind', '?'))}, {format_value(source.get('n_samples'))} samples)",
               style="dim")
    mdl = Text(printable(model.get("arch", "-")))
    if model.get("image_size"):
        mdl.append(f" @ {model['image_size']} px")
    if model.get("checkpoint"):
        mdl.append(f"  {printable(model['checkpoint'])}", style="dim")
    removed = Text(format_value(counts.get("removed")), style="bold")
    if counts.get("removed_fraction") is not None:
        removed.append(f"  ({_pct(counts['removed_fraction'])} of scanned)")
    errors = Text(format_value(counts.get("errors", source.get("n_errors"))))
    if counts.get("errors"):
        errors.stylize("yellow")
        errors.append("  unreadable, not scanned (errors.csv); clean leaves them out", style="dim")
    scored = Text(format_value(counts.get("scored", search.get("n_scored"))))
    if rounds:
        scored.append(f"  in {len(rounds)} search rounds", style="dim")
    clus = Text(format_value(clusters.get("n_clusters")))
    if clusters.get("requested") not in (None, clusters.get("n_clusters")):
        clus.append(f" (requested {format_value(clusters['requested'])})")
    if clusters.get("flip_set") is not None:
        clus.append(f", flip test set {format_value(clusters['flip_set'])}", style="dim")
    if clf.get("trained"):
        parts = [f"ensemble {clf.get('ensemble', 1)}", f"{format_value(clf.get('iterations'))} iterations",
                 f"val F1 {format_value(clf.get('val_f1'), 3)}", f"threshold {format_value(clf.get('threshold'), 3)}"]
        if clf.get("neighbours"):
            parts.append(f"averaged with {clf['neighbours']} feature neighbours "
                         f"({format_value(clf.get('removed_by_classifier_alone'))} above it alone)")
        ver = clf.get("verification") or {}
        if ver.get("n_candidates"):
            parts.append(f"{format_value(ver.get('n_verified'))} of {format_value(ver['n_candidates'])} isolated "
                         f"flags verified by the flip test (> {format_value(ver.get('bar'))} flips)")
        classifier = Text("trained: " + ", ".join(parts))
    elif clf.get("skipped"):
        classifier = Text(f"not trained: {clf['skipped']}", style="dim")
    elif clf:
        classifier = Text("not trained", style="dim")
    else:
        classifier = Text("-")
    pairs: list[tuple[str, Any]] = [
        ("method", summary.get("method")),
        ("source", src),
        ("model", mdl),
        ("scanned", counts.get("scanned")),
        ("scored", scored),
        ("removed", removed),
        ("errors", errors),
        ("clusters", clus),
        ("classifier", classifier),
    ]
    return _kv_table("Overview", pairs)


def _null_from(ev: Mapping[str, Any]) -> str:
    """Where the null's windows were cut, in words."""
    if ev.get("null_pool") == "outside-topk-clusters":
        return f"from images outside the top-k's {len(ev.get('null_excluded_clusters') or [])} clusters"
    return "from all images"


#: the recurrence tests in ``summary.json``'s evidence: key, what a group shows, what it was compared with
_GROUPS = {"pixels": ("recurrence", "show one picture", "random windows"),
           "changed": ("changed_recurrence", "show one picture, changed copy by copy",
                       "random windows, each against its own bar"),
           "held": ("held_recurrence", "show a picture many images of the data set hold",
                    "random windows' pictures' gaps"),
           "features": ("feature_recurrence", "look alike to the threat model",
                        "windows the search picks in random images")}


def _recurrence_text(ev: Mapping[str, Any], signature: str = "pixels") -> Text:
    key, shows, against = _GROUPS[signature]
    rec = ev.get(key)
    if not isinstance(rec, Mapping):
        return Text("-")
    if signature == "held":
        shows += (f" (held by {format_value(rec.get('holders'))} images; largest gap "
                  f"{float(rec.get('gap') or 0.0):.3f})")
    p = rec.get("p_value")
    p_text = "p < 0.001" if isinstance(p, (int, float)) and p < 0.001 else f"p = {format_value(p, 3)}"
    return Text(f"{format_value(rec.get('size'))} of the top {format_value(rec.get('k'))} windows {shows}  "
                f"({against}: up to {format_value(rec.get('null_group_p99'))}; {p_text}, maximum "
                f"{format_value(ev.get('max_recurrence_p'), 3)})")


def _response_text(ev: Mapping[str, Any]) -> Text:
    res = ev.get("held_response")
    if not isinstance(res, Mapping):
        return Text("-")
    p = res.get("p_value")
    p_text = "p < 0.001" if isinstance(p, (int, float)) and p < 0.001 else f"p = {format_value(p, 3)}"
    return Text(f"copies from {format_value(res.get('pairs'))} holders against alike windows of their clusters: "
                f"{format_value(res.get('wins'))} moved more of the flip set, {format_value(res.get('losses'))} "
                f"fewer ({p_text})")


def _evidence(ev: Mapping[str, Any]) -> Table:
    found = ev.get("backdoor_found")
    verdict = Text("yes" if found else "no", style="bold red" if found else "bold green")
    if found is None:
        verdict = Text("-")
    if ev.get("forced"):
        verdict.append("  (forced: removal ran regardless of the evidence)", style="yellow")
    pairs: list[tuple[str, Any]] = [
        ("backdoor found", verdict),
        ("z", Text(f"{format_value(ev.get('z'), 3)}  (minimum evidence {format_value(ev.get('min_evidence'), 3)})")),
        ("p-value", ev.get("p_value")),
        ("effect", Text(f"{format_value(ev.get('effect'), 3)}  (share of the flip-set images random windows leave "
                        f"in place that the top-k move; minimum {format_value(ev.get('min_effect'), 3)})")),
        ("recurrence", _recurrence_text(ev)),
        ("changed copies", _recurrence_text(ev, "changed")),
        ("held pictures", _recurrence_text(ev, "held")),
        ("held picture's response", _response_text(ev)),
        ("feature recurrence", _recurrence_text(ev, "features")),
        ("top-k median score", ev.get("topk_median")),
        ("null median score", Text(f"{format_value(ev.get('null_median'))}  "
                                   f"(null size {format_value(ev.get('null_size'))}, {_null_from(ev)})")),
        ("best flip share", ev.get("best_flip_share")),
    ]
    if ev.get("reason"):
        pairs.append(("reason", ev.get("reason")))
    return _kv_table("Evidence", pairs)


def _box_text(box: Any) -> Text:
    if box is None or (isinstance(box, float) and math.isnan(box)):
        return Text("-")
    return Text(format_value(list(box)))


def _top_k(top: Sequence[Mapping[str, Any]], max_rows: int) -> Table:
    table = Table(title=Text(f"Top-{len(top)} candidate triggers", style="bold"), title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("id", overflow="fold")
    table.add_column("cluster", justify="right")
    table.add_column("score", justify="right")
    table.add_column("box (x, y, w, h)", no_wrap=True)
    for item in top[:max_rows]:
        table.add_row(_cell(item.get("rank")), Text(printable(item.get("id", item.get("index", "-")))),
                      _cell(item.get("cluster")), _cell(item.get("poison_score")), _box_text(item.get("box")))
    if len(top) > max_rows:
        table.caption = Text(f"{len(top) - max_rows} more in scores.csv (column top_k_rank)")
    return table


def _top_clusters(clusters: Sequence[Mapping[str, Any]], max_rows: int) -> Table:
    table = Table(title=Text("Top clusters", style="bold"), title_justify="left")
    for col in ("cluster", "size", "removed", "max score"):
        table.add_column(col, justify="right")
    for c in clusters[:max_rows]:
        table.add_row(_cell(c.get("cluster")), _cell(c.get("size")), _cell(c.get("removed")),
                      _cell(c.get("max_score")))
    return table


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else ""


def _timings(timings: Mapping[str, Any], forwards: Mapping[str, Any] | None = None) -> Table:
    forwards = forwards if isinstance(forwards, Mapping) else {}
    table = Table(title=Text("Timings", style="bold"), title_justify="left")
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("share", justify="right")
    table.add_column("model forwards", justify="right")
    values = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float, np.number)) and
              math.isfinite(float(v))}
    total = sum(values.values())
    for stage, seconds in values.items():
        share = f"{100 * seconds / total:.0f}%" if total > 0 else "-"
        table.add_row(Text(printable(stage)), Text(format_seconds(seconds)), Text(share),
                      Text(_count(forwards.get(stage))))
    table.add_section()
    table.add_row(Text("total", style="bold"), Text(format_seconds(total), style="bold"), Text(""),
                  Text(_count(forwards.get("total")), style="bold"))
    return table


def _files(summary: Mapping[str, Any]) -> Table:
    run_dir = Path(str(summary.get("run_dir") or "."))
    pairs = [(printable(k), Text(printable(run_dir / str(v)))) for k, v in (summary.get("files") or {}).items()]
    return _kv_table("Files", pairs)


def _exit_line(summary: Mapping[str, Any]) -> Text | None:
    if summary.get("exit_code") is None or (summary.get("fail_on") is None
                                            and summary.get("fail_on_unreadable") is None):
        return None
    code = summary["exit_code"]
    gates = [f"{flag} {format_value(summary[key])}" for flag, key in (("--fail-on", "fail_on"),
                                                                       ("--fail-on-unreadable", "fail_on_unreadable"))
             if summary.get(key) is not None]
    text = Text(f"{', '.join(gates)}: exit code {code}", style="bold red" if code else "green")
    if code:
        text.append(f" ({'; '.join(summary.get('exit_reasons') or ['findings above the threshold'])})")
    return text


def print_detect_summary(summary: Mapping[str, Any], console: Console, max_top: int = 20,
                         max_clusters: int = 10) -> None:
    """The end-of-``detect`` report on ``console``: overview, evidence, top clusters, top-k, timings, files.

    Missing sections (e.g. no classifier for an aborted run) are left out instead of failing.
    """
    header = Text("poisonscan detect", style="bold")
    if summary.get("method"):
        header.append(f" ({printable(summary['method'])})")
    if summary.get("run_dir"):
        header.append(f"  {printable(summary['run_dir'])}", style="dim")
    console.print(header)
    console.print(_overview(summary))
    if summary.get("evidence"):
        console.print(_evidence(summary["evidence"]))
    if summary.get("top_clusters"):
        console.print(_top_clusters(summary["top_clusters"], max_clusters))
    if summary.get("top_k"):
        console.print(_top_k(summary["top_k"], max_top))
    if summary.get("timings"):
        console.print(_timings(summary["timings"], (summary.get("cost") or {}).get("forwards")))
    if summary.get("files"):
        console.print(_files(summary))
    line = _exit_line(summary)
    if line is not None:
        console.print(line)
