"""poisonscan: find and remove backdoor-poisoned images (PoisonCAM)."""

__version__ = "0.2.0"


def __getattr__(name: str):
    """``poisonscan.scan`` and ``poisonscan.DetectRun`` (poisonscan/detect/run.py), imported on first use so that
    ``import poisonscan`` stays light."""
    if name in ("scan", "DetectRun"):
        from poisonscan.detect import run

        return getattr(run, name)
    raise AttributeError(f"module 'poisonscan' has no attribute {name!r}")
