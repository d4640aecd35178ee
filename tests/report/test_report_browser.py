"""Render report.html in headless Chromium: the page draws, and injected ids stay inert text.

Skipped when Chromium is not installed (CI installs it: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poisonscan.report.gallery import write_gallery
from poisonscan.report.html import write_report

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser")
                             or "") if p and Path(p).is_file()), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def report_path(fake_run) -> Path:
    write_gallery(fake_run.path, fake_run.images, fake_run.summary, fake_run.attention, fake_run.boxes,
                  fake_run.removed, fake_run.clusters, fake_run.scores)
    return write_report(fake_run.path)


def test_screenshot_is_non_trivial(report_path: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report_path.resolve().as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        arr = np.asarray(img.convert("RGB"))
    packed = (arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8) | arr[..., 2]
    assert np.unique(packed).size > 50  # text, tables and images, not a blank page
    assert arr.std() > 20


def test_dom_rendered_and_injection_inert(report_path: Path, tmp_path: Path, fake_run) -> None:
    proc = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", report_path.resolve().as_uri())
    dom = proc.stdout
    assert "<title>poisonscan report: run</title>" in dom, proc.stderr[-2000:]
    assert "Backdoor evidence found" in dom
    # the injected scripts would have retitled the page or added elements
    assert "PWNED</title>" not in dom and "<pwned-marker" not in dom
    assert "<script>document.title" not in dom and "<img src=\"x\"" not in dom
    # ... they are present as escaped text instead
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in dom
    assert "&lt;script&gt;document.title='PWNED'" in dom
    assert "\"&gt;&lt;img src=x onerror=\"document.title='PWNED2'\"&gt;.png" in dom
    # the page's own script passed the Content Security Policy, ran without errors and showed the filter box
    assert "Content Security Policy" not in proc.stderr and "Uncaught" not in proc.stderr
    box = re.search(r'<input[^>]*id="removal-filter"[^>]*>', dom).group(0)
    assert "hidden" not in box
    assert 'id="removal-count">5 rows<' in dom
