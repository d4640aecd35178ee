"""report.html: self-contained, escaped, complete."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re

import pytest

from poisonscan.errors import UsageError
from poisonscan.report.gallery import write_gallery
from poisonscan.report.html import REPORT_SCRIPT, esc, write_report


@pytest.fixture
def report(fake_run) -> str:
    write_gallery(fake_run.path, fake_run.images, fake_run.summary, fake_run.attention, fake_run.boxes,
                  fake_run.removed, fake_run.clusters, fake_run.scores)
    path = write_report(fake_run.path)
    assert path == fake_run.path / "report.html"
    return path.read_text(encoding="utf-8")


def test_injected_ids_are_escaped(report: str, fake_run) -> None:
    assert "<script>alert(1)</script>" not in report
    assert html.escape(fake_run.xss_alert, quote=True) in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in report
    assert "<script>document.title" not in report and "<img src=x" not in report
    assert html.escape(fake_run.xss_attr, quote=True) in report
    # the only <script> element is the page's own filter script
    assert report.count("<script") == 1 and report.count("</script>") == 1
    assert f"<script>{REPORT_SCRIPT}</script>" in report


def test_config_errors_and_source_are_escaped(report: str) -> None:
    assert "</pre><script>alert(2)" not in report
    assert "&lt;/pre&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in report
    assert "&quot;&lt;key&gt;&quot;" in report  # config key, pretty-printed JSON
    assert "&lt;i&gt;broken&lt;/i&gt;.jpg" in report and "<i>broken" not in report  # errors.csv
    assert "/data/&lt;b&gt;set&lt;/b&gt;" in report and "<b>set" not in report  # source spec


def test_self_contained_no_network(report: str) -> None:
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", report)
    assert "@import" not in report and "url(" not in report
    for src in re.findall(r'<img[^>]*\ssrc="([^"]*)"', report):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")


def test_csp_allows_only_the_page_script(report: str) -> None:
    digest = base64.b64encode(hashlib.sha256(REPORT_SCRIPT.encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', report).group(1)
    csp = html.unescape(csp)
    assert "default-src 'none'" in csp and f"'sha256-{digest}'" in csp and "unsafe-inline" not in csp.split(
        "script-src")[1]


def test_sections_present(report: str, fake_run) -> None:
    for anchor in ("summary", "evidence", "timings", "search", "topk", "clusters", "scores", "removal", "errors",
                   "config", "environment", "files"):
        assert f'<section id="{anchor}">' in report
    assert "Backdoor evidence found: 5 images removed" in report
    assert 'id="removal-filter"' in report and 'id="removal-table"' in report
    assert report.count("<tr><td class=\"num\">") >= 5
    assert "classifier" in report and "12.0 s" in report and "17.9 s" in report
    assert (fake_run.path / "gallery/score_histogram.png").is_file()
    assert (fake_run.path / "gallery/classifier_histogram.png").is_file()


def test_removal_list_is_capped(fake_run) -> None:
    text = write_report(fake_run.path, max_rows=2).read_text()
    rows = re.search(r'id="removal-table">.*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    assert rows.count("<tr>") == 2
    assert "The first 2 of 5 removed images are listed" in text


def test_removal_score_column_shown_and_histogrammed_when_present(fake_run) -> None:
    import csv

    path = fake_run.path / "scores.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0], "neighbour_prob", "removal_score"])
        w.writeheader()
        for row in rows:
            w.writerow({**row, "neighbour_prob": "0.25", "removal_score": "0.625"})
    from poisonscan.report.html import read_scores

    digest = read_scores(path, max_rows=100)
    assert digest.smoothed and set(digest.probs) == {0.625}          # the thresholded score is histogrammed
    text = write_report(fake_run.path).read_text()
    head = re.search(r'id="removal-table">.*?<thead>(.*?)</thead>', text, re.S).group(1)
    assert "removal score" in head and "classifier prob" in head
    assert (fake_run.path / "gallery/classifier_histogram.png").is_file()


def test_linked_images_mode(fake_run) -> None:
    write_gallery(fake_run.path, fake_run.images, fake_run.summary, fake_run.attention, fake_run.boxes,
                  fake_run.removed, fake_run.clusters, fake_run.scores)
    text = write_report(fake_run.path, embed_images=False).read_text()
    assert 'src="gallery/topk.png"' in text and "data:image/png;base64" not in text


def test_missing_optional_files_and_clean_run(tmp_path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    summary = {"method": "poisoncam", "counts": {"scanned": 10, "removed": 0, "removed_fraction": 0.0},
               "evidence": {"z": 0.4, "min_evidence": 3.0, "backdoor_found": False}}
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "No backdoor evidence" in text and "scores.csv not found" in text and "config.json not found" in text
    assert "No image was scored" in text and "gallery/removed_by_cluster.png not found" in text


def test_errors_for_non_runs(tmp_path) -> None:
    with pytest.raises(UsageError, match="no summary.json"):
        write_report(tmp_path)
    with pytest.raises(UsageError, match="not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a valid summary"):
        write_report(tmp_path)


def test_esc() -> None:
    assert esc("<a href='x'>\"&") == "&lt;a href=&#x27;x&#x27;&gt;&quot;&amp;"
    assert esc(b"\xff".decode("utf-8", "surrogateescape")) == "\\udcff"


def test_a_removal_by_the_picture_match_is_histogrammed_with_its_threshold(fake_run) -> None:
    """No classifier ran (its column empty): the picture match's similarities are shown with the threshold."""
    import csv
    import json

    path = fake_run.path / "scores.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0], "picture_match"])
        w.writeheader()
        for row in rows:
            w.writerow({**row, "classifier_prob": "", "picture_match": "0.95" if row["removed"] == "1" else "0.30"})
    summary = json.loads((fake_run.path / "summary.json").read_text())
    summary["picture_match"] = {"threshold": 0.8, "contain": 5}
    (fake_run.path / "summary.json").write_text(json.dumps(summary))
    from poisonscan.report.html import read_scores

    digest = read_scores(path, max_rows=100)
    assert not digest.probs and sorted(set(digest.matches)) == [0.3, 0.95]
    assert [m for m, r in zip(digest.matches, digest.matches_removed) if r] == [0.95] * 5
    text = write_report(fake_run.path).read_text()
    head = re.search(r'id="removal-table">.*?<thead>(.*?)</thead>', text, re.S).group(1)
    assert "picture match" in head
    assert (fake_run.path / "gallery/picture_match_histogram.png").is_file()
