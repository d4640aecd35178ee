"""The poison classifier's network and its safe loading."""

from __future__ import annotations

import pytest
import torch

from poisonscan.detect import poison_net as N
from poisonscan.errors import CheckpointError

TINY = (8, 16, 32, 64)


def test_model_shapes_for_small_and_large_images():
    for size, stride in ((16, 1), (32, 2), (64, 4)):
        model = N.build_classifier(size, TINY).eval()
        assert model.stem_stride == stride == N.stem_stride_for(size)
        assert model(torch.randn(2, 3, size, size)).shape == (2, 2)


def test_load_classifier_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        N.load_classifier(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        N.load_classifier(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a poisonscan poison classifier"):
        N.load_classifier(other)


def test_load_classifier_refuses_metadata_out_of_range(tmp_path):
    """A shared run's classifier file chooses only among the shapes detect writes; anything else is one line."""
    from safetensors.torch import save_file

    for meta in ({"widths": "[100000, 1, 1, 1]", "stem_stride": "4", "ensemble": "1"},
                 {"widths": "[32, 64, 128, 256]", "stem_stride": "4", "ensemble": "100000"},
                 {"widths": "\"abc\"", "stem_stride": "4", "ensemble": "1"},
                 {"widths": "[32, 64, 128, 256]", "stem_stride": "4", "ensemble": "1"}):   # no weights: mismatch
        path = tmp_path / "c.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "poisonscan-poison-classifier", **meta})
        with pytest.raises(CheckpointError):
            N.load_classifier(path)
