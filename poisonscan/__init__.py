"""poisonscan: find and remove backdoor-poisoned images (PoisonCAM)."""

__version__ = "0.10.1"


def __getattr__(name: str):
    """``poisonscan.scan`` (poisonscan/detect/pipeline.py) and ``poisonscan.DetectRun`` (poisonscan/detect/run.py),
    imported on first use so that ``import poisonscan`` stays light."""
    if name == "scan":
        from poisonscan.detect.pipeline import scan

        return scan
    if name == "DetectRun":
        from poisonscan.detect.run import DetectRun

        return DetectRun
    raise AttributeError(f"module 'poisonscan' has no attribute {name!r}")
