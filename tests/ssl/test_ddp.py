"""torchrun: 2 CPU processes on gloo train in lock-step and end with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from poisonscan.config import PretrainConfig
    from poisonscan.runtime import setup_runtime
    from poisonscan.ssl.trainer import build_trainer

    data, out, method = sys.argv[1:4]
    cfg = PretrainConfig(data=data, out=out, method=method, arch="test_resnet", image_size=16, epochs=2,
                         batch_size=4, proj_hidden=32, proj_dim=16, num_workers=0, quiet=True, device="cpu",
                         precision="fp32", seed=1)
    runtime = setup_runtime("cpu", "fp32")
    trainer = build_trainer(cfg, runtime=runtime)
    summary = trainer.fit()
    torch.save({"state": trainer.method.state_dict(), "summary_steps": summary["steps"], "world": runtime.world_size},
               f"{out}/rank{runtime.rank}.pt")
""")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_torchrun_two_ranks_identical_weights(image_folder: Path, tmp_path: Path, method: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(image_folder), str(out), method]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["summary_steps"] == 2                            # 6 images, global batch 4 -> 1 step per epoch
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    ckpt = torch.load(out / "last.pt", weights_only=True)     # written by rank 0 only
    assert ckpt["epoch"] == 2 and ckpt["config"]["method"] == method
    assert (out / "encoder.safetensors").is_file()
