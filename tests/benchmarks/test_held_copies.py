"""held_copies.py: are the images holding a held picture copies of its window's photograph?"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.benchmarks.toy_runs import finished_toy_run
from tests.detect.detect_toys import one_torch_thread  # noqa: F401

from benchmarks.studies import held_copies
from poisonscan.runtime import setup_runtime


def test_a_copy_of_a_photograph_is_alike_as_a_whole_image_and_another_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 200, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    copy = (photo.int() + 40).clamp(0, 255).to(torch.uint8)             # brighter: the same photograph
    other = torch.randint(0, 255, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    t = held_copies.thumbnails(torch.cat([photo, copy, other]), batch=2)
    assert t.shape == (3, 3 * 16 * 16) and torch.allclose(t.norm(dim=1), torch.ones(3))
    assert float(t[0] @ t[1]) > 0.99 and abs(float(t[0] @ t[2])) < 0.3


def test_a_pasted_trigger_s_holders_are_no_copies_of_its_window_s_image(tmp_path: Path, one_torch_thread) -> None:
    run, poisoned, truth = finished_toy_run(tmp_path, masks=64)
    r = held_copies.study(run, truth, setup_runtime("cpu", precision="fp32"))
    assert r["held"]["size"] and len(r["windows"]) == r["held"]["size"]
    for w in r["windows"]:
        assert w["poison"] and w["holders"] >= 5 and w["poisons_among_holders"] == w["holders"]
        assert w["closest_share_of_holders"] < 0.5 and w["holder_matches"] == sorted(w["holder_matches"],
                                                                                      reverse=True)
