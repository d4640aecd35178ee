"""A finished toy detect run for the benchmark scripts' tests (the toy data and threat model of detect_toys)."""

from __future__ import annotations

from pathlib import Path

from tests.detect.detect_toys import make_poisoned_folder, save_toy_checkpoint

from poisonscan.config import DetectConfig
from poisonscan.detect.pipeline import run_detect
from poisonscan.runtime import setup_runtime
from poisonscan.settings import configure


def finished_toy_run(tmp_path: Path, masks: int) -> tuple[Path, dict[str, tuple[int, int]], Path]:
    """A toy poisoned folder scanned at small settings: ``(run folder, poisoned id -> trigger corner, its
    ground_truth.csv)``."""
    data = tmp_path / "data"
    poisoned = make_poisoned_folder(data)
    ids = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    truth = tmp_path / "ground_truth.csv"
    truth.write_text("sample_id,poisoned\n" + "".join(f"{i},{int(i in poisoned)}\n" for i in ids))
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    run = tmp_path / "run"
    cfg = configure(DetectConfig, data=str(data), model=str(model), out=str(run), clusters=4, masks=masks,
                    flip_size=40, top_k=5, null_size=64, iterations=20, ensemble=1, rounds=1, batch_size=128,
                    device="cpu", precision="fp32")
    run_detect(cfg, setup_runtime("cpu", precision="fp32"), quiet=True)
    return run, poisoned, truth
