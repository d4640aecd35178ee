"""Features of a source cached in the eval run: reused when nothing changed, recomputed per changed variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import poisonscan.eval.encoding as encoding
from poisonscan.data.sources import open_source
from poisonscan.runs import RunDir
from poisonscan.runtime import Runtime

RUNTIME = Runtime(torch.device("cpu"), None)


class MeanColour(nn.Module):
    image_size, feature_dim, mean, std = 16, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + 1e-3


def test_cache_and_variants(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = encoding.extract_features
    monkeypatch.setattr(encoding, "extract_features", lambda enc, imgs, *a, **k: calls.append(len(imgs)) or
                        real(enc, imgs, *a, **k))
    source, run = open_source(image_folder), RunDir(tmp_path / "run")

    def encode(seed: int, **kw: object) -> encoding.EncodedSet:
        black = (lambda imgs: torch.zeros_like(imgs), {"seed": seed})
        return encoding.encode_source(MeanColour(), source, RUNTIME, name="val", encoder_key="k", run=run,
                                      variants={"black": black}, **kw)

    first = encode(0)
    assert calls == [6, 6] and first.ids == source.ids and first.labels == [0, 0, 0, 1, 1, 1]
    assert np.allclose(first.features["black"], 1 / np.sqrt(3))  # constant features, L2-normalised
    again = encode(0)
    assert calls == [6, 6] and np.array_equal(again.features["clean"], first.features["clean"])
    encode(1)  # only the changed variant is recomputed
    assert calls == [6, 6, 6]
    kept = encode(1, keep_images=True)
    assert kept.store is not None and kept.store.images.shape == (6, 3, 16, 16) and calls == [6, 6, 6]
    subset = encoding.encode_source(MeanColour(), source, RUNTIME, name="sub", encoder_key="k", run=run,
                                    indices=[4, 1])
    assert subset.ids == [source.ids[1], source.ids[4]] and calls[-1] == 2
