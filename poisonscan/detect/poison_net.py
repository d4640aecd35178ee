"""The poison classifier's network and its safe persistence: a small ResNet (BasicBlock, [1, 1, 1, 1], 2 outputs)
whose stem stride follows the image size, and an ensemble saved as safetensors with its shape in the metadata
(loading reads no pickle and accepts only the shapes :func:`classifier_bytes` writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poisonscan.errors import CheckpointError

# ---------------------------------------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def stem_stride_for(image_size: int) -> int:
    """Stem downsampling: ImageNet-style /4 from 64 px up, /2 for CIFAR-sized images, none below 24 px."""
    return 4 if image_size >= 64 else 2 if image_size >= 24 else 1


class PoisonResNet(nn.Module):
    """ResNet with one BasicBlock per stage and two outputs (clean, poisonous)."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), stem_stride: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        if stem_stride not in (1, 2, 4):
            raise ValueError("stem_stride must be 1, 2 or 4")
        self.widths = tuple(int(w) for w in widths)
        self.stem_stride = stem_stride
        stem: list[nn.Module] = [nn.Conv2d(3, self.widths[0], 3, min(stem_stride, 2), 1, bias=False),
                                 nn.BatchNorm2d(self.widths[0]), nn.ReLU(inplace=True)]
        if stem_stride == 4:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        blocks, c_in = [], self.widths[0]
        for i, w in enumerate(self.widths):
            blocks.append(BasicBlock(c_in, w, stride=1 if i == 0 else 2))
            c_in = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_classifier(image_size: int, widths: Sequence[int] = (32, 64, 128, 256)) -> PoisonResNet:
    return PoisonResNet(widths, stem_stride_for(image_size))


# ---------------------------------------------------------------------------------------------------- persistence


def classifier_bytes(models: Sequence[PoisonResNet], **metadata: Any) -> bytes:
    """Safetensors bytes of an ensemble (``m<i>.<param>``), architecture in the metadata."""
    from safetensors.torch import save

    tensors = {f"m{i}.{k}": v.detach().cpu().contiguous() for i, m in enumerate(models)
               for k, v in m.state_dict().items()}
    meta = {"format": "poisonscan-poison-classifier", "ensemble": str(len(models)),
            "widths": json.dumps(list(models[0].widths)), "stem_stride": str(models[0].stem_stride)}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    return save(tensors, metadata=meta)


def load_classifier(path: Path | str) -> tuple[list[PoisonResNet], dict[str, Any]]:
    """Load an ensemble written by :func:`classifier_bytes` (safetensors only, no pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier {path} not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"classifier {path} is not a valid safetensors file: {exc}") from None
    if meta.get("format") != "poisonscan-poison-classifier":
        raise CheckpointError(f"{path} is not a poisonscan poison classifier")
    try:                    # the metadata only chooses among the shapes classifier_bytes writes, then must match
        widths, stride, n = json.loads(meta["widths"]), int(meta["stem_stride"]), int(meta["ensemble"])
        if (not isinstance(widths, list) or len(widths) != 4 or stride not in (1, 2, 4) or not 1 <= n <= 16
                or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 1024 for w in widths)):
            raise ValueError("widths, stem_stride or ensemble out of range")
        models = []
        for i in range(n):
            model = PoisonResNet(widths, stride)
            state = {k[len(f"m{i}."):]: v for k, v in tensors.items() if k.startswith(f"m{i}.")}
            model.load_state_dict(state)
            models.append(model.eval())
        extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "ensemble", "widths", "stem_stride")}
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"classifier {path}: {str(exc).splitlines()[0][:200]}") from None
    return models, extra
