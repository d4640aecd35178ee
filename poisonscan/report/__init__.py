"""Reports people look at: terminal summary and JSON (``summary``), PNG gallery (``gallery``), PIL plots
(``plots``) and the self-contained ``report.html`` (``html``)."""

from poisonscan.report.gallery import write_gallery
from poisonscan.report.html import write_report
from poisonscan.report.plots import score_histogram_png
from poisonscan.report.summary import print_detect_summary, print_json, print_table

__all__ = ["print_detect_summary", "print_json", "print_table", "write_gallery", "score_histogram_png",
           "write_report"]
