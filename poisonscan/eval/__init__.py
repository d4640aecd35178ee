"""Evaluation: detection quality against ground truth, linear-probe ACC/ASR, backdoor strength of a threat model.

Modules: ``metrics`` (pure metric functions), ``detection`` (a detect run vs. ground truth), ``probe`` (linear probe),
``backdoor`` (k-NN / probe ASR, poison-cluster purity, oracle flips), ``patching`` (trigger on uint8 batches),
``encoding`` (features of a source, cached in the eval run), ``plots`` (PIL charts), ``runner`` (each command on
its config). Definitions of every metric: docs/commands/eval.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["backdoor_strength", "evaluate_detection", "linear_probe", "probe_report"]


def __getattr__(name: str) -> Any:  # lazy: importing poisonscan.eval must not pull in torch-heavy modules
    if name == "backdoor_strength":
        from poisonscan.eval.backdoor import backdoor_strength

        return backdoor_strength
    if name == "evaluate_detection":
        from poisonscan.eval.detection import evaluate_detection

        return evaluate_detection
    if name in ("linear_probe", "probe_report"):
        from poisonscan.eval import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'poisonscan.eval' has no attribute {name!r}")
