"""``report.html``: one self-contained page per detect run (inline CSS, images as data URIs, no network).

Every string that comes from the data set, the config or the file system goes through :func:`esc`
(``html.escape(..., quote=True)``), so a sample named ``<script>alert(1)</script>.png`` shows as text. A Content
Security Policy allows only the page's own inline script (by hash) and inline images, as a second line of defence.

Its length is one self-contained page on purpose: the escaping, the Content Security Policy and every
section that could carry text from the data set are reviewed in one file.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from poisonscan.errors import UsageError
from poisonscan.report.plots import png_bytes, score_histogram_image
from poisonscan.report.summary import format_seconds, format_value, printable
from poisonscan.runs import RunDir

__all__ = ["write_report", "esc", "REPORT_SCRIPT"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: the page's only script: filters the removal list by a substring of any cell (the filter box stays hidden
#: where scripts do not run)
REPORT_SCRIPT = """
(function () {
  var input = document.getElementById("removal-filter");
  if (!input) { return; }
  var rows = document.querySelectorAll("#removal-table tbody tr");
  var count = document.getElementById("removal-count");
  input.hidden = false;
  input.addEventListener("input", function () {
    var q = input.value.toLowerCase(), shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var hit = rows[i].textContent.toLowerCase().indexOf(q) !== -1;
      rows[i].hidden = !hit;
      if (hit) { shown++; }
    }
    count.textContent = shown + " of " + rows.length + " rows shown";
  });
})();
"""

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --bg: #f6f7f9; --red: #c62839; --green: #237a45; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #1d2330; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 21px; word-break: break-all; }
header .meta { color: #b8c0cf; font-size: 13px; }
nav { padding: 8px 28px; background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; }
nav a { margin-right: 14px; color: #2a5bd7; text-decoration: none; font-size: 13px; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; margin: 16px 0; }
h2 { margin: 0 0 10px; font-size: 17px; }
h3 { margin: 14px 0 6px; font-size: 14px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: middle; }
th { background: #eef0f4; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; max-width: 560px; }
table.kv th { background: none; color: var(--muted); font-weight: normal; white-space: nowrap; }
.verdict { padding: 10px 14px; border-radius: 6px; font-size: 15px; margin-bottom: 12px; }
.verdict.found { background: #fde8ea; color: var(--red); border: 1px solid #f3b6bd; }
.verdict.clean { background: #e6f4ea; color: var(--green); border: 1px solid #b3dcc0; }
.verdict.unscanned { background: #fff4d6; color: #7a5200; border: 1px solid #f0d58a; }
.note { color: var(--muted); font-size: 12.5px; }
.bar { background: #5b8def; height: 10px; border-radius: 2px; min-width: 1px; }
.bartrack { width: 260px; background: #eef0f4; border-radius: 2px; }
img.pix { image-rendering: pixelated; border: 1px solid var(--line); }
img.fig { max-width: 100%; border: 1px solid var(--line); }
.figs { display: flex; flex-wrap: wrap; gap: 12px; }
.figs figure { margin: 0; }
figcaption { font-size: 12px; color: var(--muted); max-width: 720px; word-break: break-all; }
pre { background: #f3f4f7; border: 1px solid var(--line); padding: 10px; overflow: auto; max-height: 520px;
      font-size: 12.5px; }
input[type=search] { padding: 5px 8px; width: 340px; border: 1px solid #b9c0cc; border-radius: 4px; }
.scroll { max-height: 560px; overflow: auto; border: 1px solid var(--line); margin-top: 8px; }
.scroll th { position: sticky; top: 0; }
.yes { color: var(--red); font-weight: 600; } .no { color: var(--green); font-weight: 600; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value`` (``quote=True``; undecodable characters backslash-escaped)."""
    return html.escape(printable(value), quote=True)


def _cell(value: Any, digits: int = 4) -> str:
    """A ``<td>`` holding ``value`` formatted and escaped; numbers right-aligned."""
    is_num = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if is_num:
        return f'<td class="num">{esc(format_value(value, digits))}</td>'
    return f"<td>{esc(format_value(value))}</td>"


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    """Key/value table; values are HTML already (callers escape)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None,
           table_id: str | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    head = "".join(f'<th class="{"num" if n else ""}">{esc(h)}</th>' for h, n in zip(headers, numeric))
    body = []
    for row in rows:
        cells = []
        for v, n in zip(row, numeric):
            cls = "num" if n else ("id" if isinstance(v, str) else "")
            cells.append(f'<td class="{cls}">{esc(format_value(v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(parsed, raw text)``; ``(None, None)`` when missing, ``(None, text)`` when not valid JSON."""
    if not path.is_file():
        return None, None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text), text
    except json.JSONDecodeError:
        return None, text


def _num(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _int_or_none(text: str | None) -> int | None:
    v = _num(text)
    return int(v) if v is not None and float(v).is_integer() else None


@dataclass
class ScoresDigest:
    """What the report needs from ``scores.csv``, read in one streaming pass (fine for millions of rows)."""

    n_rows: int = 0
    poison_scores: list[float] = field(default_factory=list)
    poison_removed: list[bool] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)      # the thresholded score: removal score, else classifier P
    probs_removed: list[bool] = field(default_factory=list)
    smoothed: bool = False                                  # probs are removal scores (neighbour consensus)
    matches: list[float] = field(default_factory=list)     # best match to the recurring picture, when searched for
    matches_removed: list[bool] = field(default_factory=list)
    n_removed: int = 0
    removed_rows: list[dict[str, str]] = field(default_factory=list)


def read_scores(path: Path, max_rows: int) -> ScoresDigest | None:
    """Scores, classifier probabilities, picture matches and the first ``max_rows`` removed rows of
    ``scores.csv``."""
    if not path.is_file():
        return None
    digest = ScoresDigest()
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            digest.n_rows += 1
            is_removed = (row.get("removed") or "").strip() in ("1", "true", "True")
            score = _num(row.get("poison_score"))
            if score is not None:
                digest.poison_scores.append(score)
                digest.poison_removed.append(is_removed)
            prob = _num(row.get("removal_score"))
            if prob is not None:
                digest.smoothed = True
            else:
                prob = _num(row.get("classifier_prob"))
            if prob is not None:
                digest.probs.append(prob)
                digest.probs_removed.append(is_removed)
            match = _num(row.get("picture_match"))
            if match is not None:
                digest.matches.append(match)
                digest.matches_removed.append(is_removed)
            if is_removed:
                digest.n_removed += 1
                if len(digest.removed_rows) < max_rows:
                    digest.removed_rows.append(row)
    return digest


def _read_errors(path: Path, max_rows: int) -> tuple[list[tuple[str, str]], int]:
    if not path.is_file():
        return [], 0
    rows, total = [], 0
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            total += 1
            if len(rows) < max_rows:
                rows.append((row.get("id", ""), row.get("reason", "")))
    return rows, total


class _Images:
    """Gallery images as ``<img>`` sources: base64 data URIs (default) or relative links."""

    def __init__(self, root: Path, embed: bool) -> None:
        self.root, self.embed = root, embed

    def src(self, rel: str) -> str | None:
        path = self.root / rel
        if not path.is_file():
            return None
        if not self.embed:
            return esc(quote(rel))
        data = path.read_bytes()
        if not data.startswith(PNG_MAGIC):
            return None
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    def data_uri(self, png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    def img(self, rel: str, alt: str, cls: str = "fig", width: int | None = None) -> str:
        src = self.src(rel)
        if src is None:
            return f'<p class="note">{esc(rel)} not found</p>'
        w = f' width="{int(width)}"' if width else ""
        return f'<img class="{cls}" src="{src}" alt="{esc(alt)}"{w} loading="lazy">'


def _verdict(summary: Mapping[str, Any]) -> str:
    ev = summary.get("evidence") or {}
    counts = summary.get("counts") or {}
    removed, frac = counts.get("removed"), counts.get("removed_fraction")
    pct = f" ({100 * float(frac):.2f}% of {format_value(counts.get('scanned'))} scanned)" if frac is not None else ""
    if ev.get("backdoor_found"):
        text = f"Backdoor evidence found: {format_value(removed)} images removed{pct}."
        cls = "found"
    elif ev:
        why = ev.get("reason") or (f"no backdoor evidence: z = {format_value(ev.get('z'), 3)} is below the minimum "
                                   f"{format_value(ev.get('min_evidence'), 3)}")
        text = f"{why[0].upper()}{why[1:]}; {format_value(removed)} images removed{pct}."
        cls = "clean"
    else:
        text, cls = f"{format_value(removed)} images removed{pct}.", "clean"
    if ev.get("forced"):
        text += " Removal was forced regardless of the evidence."
    banner = f'<div class="verdict {cls}">{esc(text)}</div>'
    unreadable = counts.get("unreadable", counts.get("errors"))
    if unreadable:
        banner += (f'<div class="verdict unscanned">{esc(format_value(unreadable))} sample(s) could not be read and '
                   "were not scanned (listed in errors.csv): <code>poisonscan clean</code> leaves them out of the "
                   "cleaned manifest unless <code>--keep-unreadable</code>.</div>")
    return banner


def _overview(summary: Mapping[str, Any]) -> str:
    src = summary.get("source") or {}
    model = summary.get("model") or {}
    counts = summary.get("counts") or {}
    clusters = summary.get("clusters") or {}
    clf = summary.get("classifier") or {}
    rows = [
        ("method", esc(summary.get("method", "-"))),
        ("source", f'<span class="id">{esc(src.get("spec", "-"))}</span> ({esc(src.get("kind", "?"))}, '
                   f'{esc(format_value(src.get("n_samples")))} samples)'),
        ("model", f'{esc(model.get("arch", "-"))} at {esc(format_value(model.get("image_size")))} px; '
                  f'<span class="id">{esc(model.get("checkpoint", "-"))}</span>'),
        ("scanned", esc(format_value(counts.get("scanned")))),
        ("scored", esc(format_value(counts.get("scored")))),
        ("removed", esc(format_value(counts.get("removed")) + (
            f" ({100 * float(counts['removed_fraction']):.2f}%)" if counts.get("removed_fraction") is not None
            else ""))),
        ("unreadable", esc(format_value(counts.get("errors", src.get("n_errors"))))),
        ("clusters", esc(f"{format_value(clusters.get('n_clusters'))} (requested "
                         f"{format_value(clusters.get('requested'))}), flip test set "
                         f"{format_value(clusters.get('flip_set'))}")),
    ]
    if clf.get("skipped"):
        rows.append(("classifier", esc(f"not trained: {clf['skipped']}")))
    elif clf:
        rows.append(("classifier", esc(
            f"trained: {format_value(clf.get('trained'))}, ensemble {format_value(clf.get('ensemble'))}, "
            f"{format_value(clf.get('iterations'))} iterations, validation F1 {format_value(clf.get('val_f1'), 3)}, "
            f"threshold {format_value(clf.get('threshold'), 3)}")))
    if summary.get("fail_on") is not None or summary.get("fail_on_unreadable") is not None:
        reasons = "; ".join(summary.get("exit_reasons") or [])
        rows.append(("exit code", esc(f"{format_value(summary.get('exit_code'))}" + (f" ({reasons})" if reasons
                                                                                       else ""))))
    meta = model.get("metadata")
    if isinstance(meta, Mapping) and meta:
        rows.append(("model metadata", "<br>".join(f"{esc(k)}: {esc(format_value(v))}" for k, v in meta.items())))
    return _verdict(summary) + _kv_table(rows)


def _evidence(ev: Mapping[str, Any]) -> str:
    found = ev.get("backdoor_found")
    verdict = f'<span class="{"yes" if found else "no"}">{esc(format_value(found))}</span>'
    rows = [("backdoor found", verdict)]
    labels = [("z", "z"), ("p_value", "p-value"), ("min_evidence", "minimum evidence"),
              ("effect", "effect (share of the flip-set images random windows leave in place that the top-k move)"),
              ("min_effect", "minimum effect"),
              ("max_recurrence_p", "maximum recurrence p-value"), ("recurrence", "recurrence test (largest group of "
                                                                                   "top-k windows showing one "
                                                                                   "picture)"),
              ("changed_recurrence", "changed copies (largest group of top-k windows each more alike to the others "
                                     "than to 99% of random windows)"),
              ("held_recurrence", "held pictures (top-k windows whose picture many images of the data set hold, "
                                  "set apart by a gap in their best matches, against random windows' pictures)"),
              ("held_response", "held picture's response (its copies against alike windows of images of the same "
                                "clusters that do not hold it, on the flip test: pairs, wins, losses, sign test)"),
              ("feature_recurrence", "feature recurrence test (largest group of top-k windows alike to the threat "
                                     "model, against windows the search picks in random images)"),
              ("reason", "reason"),
              ("topk_median", "top-k median poison score"), ("null_median", "null median poison score"),
              ("null_size", "null size"), ("best_flip_share", "best flip share"), ("forced", "forced")]
    rows += [(label, esc(format_value(ev.get(key)))) for key, label in labels if key in ev]
    rows += [(k, esc(format_value(v))) for k, v in ev.items() if k not in dict(labels) and k != "backdoor_found"]
    return _kv_table(rows)


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int) and not isinstance(value, bool) else ""


def _timings(timings: Mapping[str, Any], forwards: Mapping[str, Any] | None = None) -> str:
    vals = {k: float(v) for k, v in timings.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    forwards = forwards if isinstance(forwards, Mapping) else {}
    total = sum(vals.values())
    peak = max(vals.values(), default=0.0)
    rows = []
    for stage, s in vals.items():
        width = 100.0 * s / peak if peak > 0 else 0.0
        share = f"{100 * s / total:.0f}%" if total > 0 else "-"
        rows.append(f'<tr><td>{esc(stage)}</td><td class="num">{esc(format_seconds(s))}</td>'
                    f'<td class="num">{esc(share)}</td><td class="num">{esc(_count(forwards.get(stage)))}</td>'
                    f'<td><div class="bartrack"><div class="bar" style="width:{width:.1f}%"></div></div></td></tr>')
    rows.append(f'<tr><th>total</th><th class="num">{esc(format_seconds(total))}</th><th></th>'
                f'<th class="num">{esc(_count(forwards.get("total")))}</th><th></th></tr>')
    return ('<table><thead><tr><th>stage</th><th class="num">time</th><th class="num">share</th>'
            '<th class="num">model forwards</th><th></th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _search(summary: Mapping[str, Any]) -> str:
    parts = []
    rounds = (summary.get("search") or {}).get("rounds") or []
    if rounds:
        parts.append("<h3>Search rounds</h3>" + _table(
            ["round", "live clusters", "scored"],
            ([r.get("round"), r.get("live_clusters"), r.get("scored")] for r in rounds), [True, True, True]))
    top_clusters = summary.get("top_clusters") or []
    if top_clusters:
        parts.append("<h3>Top clusters</h3>" + _table(
            ["cluster", "size", "removed", "max poison score"],
            ([c.get("cluster"), c.get("size"), c.get("removed"), c.get("max_score")] for c in top_clusters),
            [True, True, True, True]))
    return "".join(parts) or '<p class="note">no search information</p>'


def _topk(summary: Mapping[str, Any], images: _Images) -> str:
    top = summary.get("top_k") or []
    if not top:
        return '<p class="note">No image was scored, so there are no candidate triggers.</p>'
    from poisonscan.report.gallery import rank_name

    rows = []
    for e in top:
        name = rank_name(int(e.get("rank", 0)), len(top))
        thumb = images.img(f"gallery/triggers/{name}.png", f"trigger crop rank {e.get('rank')}", "pix", 64)
        box = e.get("box")
        rows.append("<tr>" + _cell(e.get("rank")) + f'<td class="id">{esc(e.get("id", ""))}</td>'
                    + _cell(e.get("index")) + _cell(e.get("cluster")) + _cell(e.get("poison_score"))
                    + f"<td>{esc(format_value(list(box)) if box is not None else '-')}</td>"
                    + f"<td>{thumb}</td></tr>")
    table = ('<table><thead><tr><th class="num">rank</th><th>id</th><th class="num">index</th>'
             '<th class="num">cluster</th><th class="num">poison score</th><th>box (x, y, w, h)</th>'
             f'<th>trigger crop</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    grid = "<h3>Candidate triggers, ranked</h3>" + images.img("gallery/topk.png", "top-k candidate trigger crops")
    figs = []
    for e in top:
        name = rank_name(int(e.get("rank", 0)), len(top))
        rel = f"gallery/top/{name}.png"
        if (images.root / rel).is_file():
            alt = f"attention overlay rank {e.get('rank')}"
            figs.append(f"<figure>{images.img(rel, alt)}"
                        f"<figcaption>#{esc(e.get('rank'))} {esc(e.get('id', ''))}</figcaption></figure>")
    overlays = ("<h3>Attention maps and chosen windows</h3>"
                '<p class="note">Left: the image at the model\'s resolution; middle: the trigger attention map as a '
                "heat overlay (red = high); right: the candidate window the poison score was computed with.</p>"
                f'<div class="figs">{"".join(figs)}</div>') if figs else ""
    return table + grid + overlays


def _figure(run: RunDir, images: _Images, name: str, img: Any, alt: str, caption: str) -> str:
    """A gallery PNG written to ``gallery/<name>`` and its figure (embedded or linked)."""
    png = png_bytes(img)
    run.write_bytes(f"gallery/{name}", png)
    src = images.data_uri(png) if images.embed else f"gallery/{name}"
    return f'<figure><img class="fig" src="{src}" alt="{alt}"><figcaption>{caption}</figcaption></figure>'


def _threshold(section: Any) -> float | None:
    value = (section or {}).get("threshold")
    return float(value) if isinstance(value, (int, float)) else None


def _histograms(digest: ScoresDigest | None, summary: Mapping[str, Any], run: RunDir,
                images: _Images) -> str:
    if digest is None:
        return '<p class="note">scores.csv not found</p>'
    img = score_histogram_image(digest.poison_scores, digest.poison_removed, labels=("kept", "removed"),
                                title="Poison scores of the scored images", xlabel="poison score (flips)")
    parts = [_figure(run, images, "score_histogram.png", img, "poison score histogram",
                     f"{len(digest.poison_scores):,} scored images, split by the final removal decision.")]
    if digest.probs:
        title, xlabel = (("Removal score (classifier P, neighbour-averaged)", "removal score")
                         if digest.smoothed else ("Poison classifier probability", "probability"))
        img = score_histogram_image(digest.probs, digest.probs_removed, labels=("kept", "removed"),
                                    title=title, xlabel=xlabel, bins=40, value_range=(0.0, 1.0),
                                    threshold=_threshold(summary.get("classifier")))
        parts.append(_figure(run, images, "classifier_histogram.png", img, "classifier probability histogram",
                             f"All {len(digest.probs):,} samples."))
    if digest.matches:
        img = score_histogram_image(digest.matches, digest.matches_removed, labels=("kept", "removed"),
                                    title="Best match to the recurring picture", xlabel="similarity", bins=40,
                                    threshold=_threshold(summary.get("picture_match")))
        parts.append(_figure(run, images, "picture_match_histogram.png", img, "picture match histogram",
                             f"All {len(digest.matches):,} samples: each one's best window against the recurring "
                             "picture; the dashed line is the removal's threshold."))
    return f'<div class="figs">{"".join(parts)}</div>'


def _removal(digest: ScoresDigest | None, max_rows: int) -> str:
    if digest is None:
        return '<p class="note">scores.csv not found</p>'
    if digest.n_removed == 0:
        return '<p class="note">No image was removed.</p>'
    cols = ["index", "id", "label", "cluster", "poison_score", "classifier_prob", "top_k_rank"]
    if digest.smoothed:
        cols.insert(6, "removal_score")
    if digest.matches:
        cols.insert(-1, "picture_match")
    numeric = [c != "id" for c in cols]

    def value(row: Mapping[str, str], col: str) -> Any:
        raw = row.get(col)
        if col == "id":
            return raw or ""
        if col in ("classifier_prob", "removal_score", "picture_match"):
            return _num(raw)
        v = _num(raw)
        return int(v) if v is not None and v.is_integer() else v

    rows = ([value(r, c) for c in cols] for r in digest.removed_rows)
    note = ""
    if digest.n_removed > len(digest.removed_rows):
        note = (f'<p class="note">The first {len(digest.removed_rows):,} of {digest.n_removed:,} removed images are '
                "listed; removed.txt has all of them.</p>")
    search = ('<p><input type="search" id="removal-filter" placeholder="filter by id, cluster, score..." '
              f'aria-label="filter the removal list" hidden> <span class="note" id="removal-count">'
              f"{len(digest.removed_rows):,} rows</span></p>")
    table = _table([c.replace("_", " ") for c in cols], rows, numeric, table_id="removal-table")
    return f'{search}{note}<div class="scroll">{table}</div>'


def _errors(run: RunDir, max_rows: int) -> str:
    rows, total = _read_errors(run.file("errors.csv"), max_rows)
    if total == 0:
        return '<p class="note">Every sample was readable.</p>'
    note = f'<p class="note">{total:,} unreadable samples (left out of the scan).</p>'
    return note + f'<div class="scroll">{_table(["id", "reason"], rows)}</div>'


def _pretty_json(path: Path) -> str:
    parsed, raw = _read_json(path)
    if raw is None:
        return f'<p class="note">{esc(path.name)} not found</p>'
    text = json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=False) if parsed is not None else raw
    return f"<pre>{esc(text)}</pre>"


def _files(run: RunDir, limit: int = 400) -> str:
    entries = []
    for dirpath, dirnames, filenames in os.walk(run.path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except OSError:
                continue
            entries.append((p.relative_to(run.path).as_posix(), size))
    rows = entries[:limit]
    note = f'<p class="note">{len(entries) - limit:,} more files not listed.</p>' if len(entries) > limit else ""
    return _table(["file", "bytes"], rows, [False, True]) + note


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return ("default-src 'none'; img-src data: 'self' file:; style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")


def render_report(run: RunDir, summary: Mapping[str, Any], *, embed_images: bool = True,
                  max_rows: int = 5000) -> str:
    """The HTML text of the report of ``run`` (also writes the score histograms under ``gallery/``)."""
    images = _Images(run.path, embed_images)
    digest = read_scores(run.file("scores.csv"), max_rows)
    name = run.path.resolve().name or str(run.path)
    sections: list[tuple[str, str, str]] = [
        ("summary", "Summary", _overview(summary)),
        ("evidence", "Evidence", _evidence(summary.get("evidence") or {}) if summary.get("evidence")
         else '<p class="note">no evidence recorded</p>'),
        ("timings", "Timings per stage", _timings(summary.get("timings") or {},
                                                  (summary.get("cost") or {}).get("forwards"))),
        ("search", "Search", _search(summary)),
        ("topk", "Top-k candidate triggers", _topk(summary, images)),
        ("clusters", "Removed images by cluster",
         '<p class="note">Red frames: removed images (highest poison score first); green frames: images kept from '
         "the same cluster, for contrast.</p>" + images.img("gallery/removed_by_cluster.png",
                                                           "removed and kept images per cluster")),
        ("scores", "Score distribution", _histograms(digest, summary, run, images)),
        ("removal", "Removal list", _removal(digest, max_rows)),
        ("errors", "Unreadable samples", _errors(run, max_rows)),
        ("config", "Config", _pretty_json(run.file("config.json"))),
        ("environment", "Environment", "<details><summary>versions, device, command line</summary>"
         + _pretty_json(run.file("environment.json")) + "</details>"),
        ("files", "Files", _files(run)),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    meta = (f"{esc(summary.get('method', 'detect'))} &middot; poisonscan {esc(summary.get('version', '?'))} &middot; "
            f"report written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} &middot; "
            f'<span class="id">{esc(summary.get("run_dir", run.path))}</span>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(_csp(REPORT_SCRIPT))}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>poisonscan report: {esc(name)}</title><style>{CSS}</style></head>\n"
            f"<body><header><h1>poisonscan report: {esc(name)}</h1><div class=\"meta\">{meta}</div></header>"
            f"<nav>{nav}</nav><main>{body}</main><script>{REPORT_SCRIPT}</script></body></html>\n")


def write_report(run_dir: Path | str | RunDir, summary: Mapping[str, Any] | None = None, *,
                 embed_images: bool = True, max_rows: int = 5000) -> Path:
    """Write ``report.html`` into the run directory and return its path.

    Reads ``summary.json`` (or uses ``summary``), ``scores.csv``, ``errors.csv``, ``config.json``,
    ``environment.json`` and the ``gallery/`` PNGs; writes ``gallery/score_histogram.png`` (and
    ``gallery/classifier_histogram.png`` when the classifier ran). Images are embedded as data URIs unless
    ``embed_images`` is False (then linked relative to the run directory). The removal list shows the first
    ``max_rows`` removed images.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise UsageError(f"run directory {run.path} not found")
    if summary is None:
        parsed, raw = _read_json(run.file("summary.json"))
        if raw is None:
            raise UsageError(f"{run.path} has no summary.json (not a finished detect run)")
        if not isinstance(parsed, Mapping):
            raise UsageError(f"{run.file('summary.json')} is not a valid summary")
        summary = parsed
    return run.write_text("report.html", render_report(run, summary, embed_images=embed_images, max_rows=max_rows))
