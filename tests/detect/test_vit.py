"""A ViT threat model through detect end to end (untrained weights: the mechanics, not the answer): masking and
Grad-CAM on the 8 x 8 token grid of a patch-4 ViT at 32 px, every stage's record, and the cost in forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread  # noqa: F401
from poisonscan.config import DetectConfig
from poisonscan.detect.pipeline import run_detect
from poisonscan.detect.run import DetectRun
from poisonscan.models import create_encoder
from poisonscan.models.checkpoints import save_encoder
from poisonscan.runtime import setup_runtime
from poisonscan.settings import configure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vit_toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vit")
    make_poisoned_folder(root / "poisoned")
    torch.manual_seed(0)
    model = save_encoder(create_encoder("vit_tiny_p4", depth=1), root / "vit.safetensors")
    return {"data": root / "poisoned", "model": model}


@pytest.mark.parametrize(("method", "masks", "vit_masking", "per_image", "masked_by", "window"), [
    ("poisoncam", 16, "drop-tokens", 16, "tokens", 8),      # B = 16 token windows: fewer than the grid's 64
    ("poisoncam", 256, "drop-tokens", 64, "tokens", 8),     # every 2 x 2 token window of the 8 x 8 grid
    ("poisoncam", 16, "zero", 16, "pixels", 9),             # the paper's: 9 x 9 pixels zeroed
    ("patchsearch", 16, "drop-tokens", 1, "pixels", 9)])    # Grad-CAM: one pass, no masks
def test_a_small_image_vit_runs_through_detect(vit_toy: dict[str, Path], tmp_path: Path, method: str, masks: int,
                                               vit_masking: str, per_image: int, masked_by: str, window: int) -> None:
    cfg = configure(DetectConfig, data=str(vit_toy["data"]), model=str(vit_toy["model"]), out=str(tmp_path / "run"),
                    clusters=4, masks=masks, flip_size=40, top_k=5, null_size=64, iterations=20, ensemble=1,
                    rounds=1, batch_size=128, device="cpu", precision="fp32", force=True, method=method)
    cfg.search.vit_masking = vit_masking
    summary = run_detect(cfg, setup_runtime("cpu", precision="fp32"), quiet=True)
    run = DetectRun.load(tmp_path / "run")
    assert summary["model"]["arch"] == "vit_tiny_p4" and summary["model"]["image_size"] == 32
    assert run.finished and run.classifier.trained and len(run.scores) == 200
    assert all(0 <= e.box[0] and e.box[0] + e.box[2] <= 32 for e in run.search.scored)   # windows inside the image
    assert run.search.window == window and all(e.box[2] == e.box[3] == window for e in run.search.scored)
    if masked_by == "tokens":                                     # windows on the token grid
        assert all(e.box[0] % 4 == 0 and e.box[1] % 4 == 0 for e in run.search.scored)
    fw = summary["cost"]["forwards"]
    assert (run.search.masks_per_image, run.search.masked_by) == (per_image, masked_by)
    assert fw["features"] == 200 and fw["search"] == sum(per_image + e.flips_tested for e in run.search.scored)
