"""Encoder features of uint8 image batches: normalised input, optional zero masks, L2-normalised output.

Every detection stage (k-means, masking, flip tests) sees the threat model through :func:`encode`, so clustering
features and re-assignment queries are computed the same way (PatchSearch forgot to L2-normalise its queries).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_input


def prepare_encoder(encoder: nn.Module, runtime: rt.Runtime) -> nn.Module:
    """Move ``encoder`` to the runtime's device in channels_last layout (idempotent, cheap when already there)."""
    return encoder.to(device=runtime.device, memory_format=torch.channels_last)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def norm_stats(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The encoder's input ``(mean, std)`` (ImageNet statistics when it has none)."""
    mean = tuple(float(v) for v in getattr(encoder, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(encoder, "std", IMAGENET_STD))
    return mean, std


def normalise_u8(u8: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x / 255 - mean) / std`` in channels_last: ``data.transforms.to_input``, the one implementation."""
    return to_input(u8, mean, std)


def encode(encoder: nn.Module, images_u8: Tensor, runtime: rt.Runtime, zero_mask: Tensor | None = None,
           to_cpu: bool = True, size: int | None = None, keep_tokens: Tensor | None = None) -> Tensor:
    """L2-normalised float32 features of a uint8 batch ``N x 3 x S x S``: the one encode path of detect, eval and
    the pretraining monitor (``ssl.trainer.embed``).

    The batch is normalised like ``data.transforms.to_input`` with ``encoder.mean``/``encoder.std`` (ImageNet
    statistics when absent); where
    ``zero_mask`` (bool ``N x S x S`` or ``1 x S x S`` / ``S x S``, True = masked) is set the *normalised* input is
    zero, as the reference implementations zero the model input. With ``size`` the normalised batch is resized
    (bilinear, antialiased) to ``size x size`` when its side differs. With ``keep_tokens`` (int64 ``N x K``) a
    ViT encoder sees only those patch tokens (``Encoder.forward(x, keep)``): how the search can mask a ViT. Runs under
    ``runtime.autocast()`` and ``torch.inference_mode()`` in channels_last layout. The caller keeps the encoder in eval mode
    (:func:`eval_mode`). With ``to_cpu=False`` the features stay on the device (hot loops).
    """
    if images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"expected uint8 N x 3 x S x S images, got shape {tuple(images_u8.shape)}")
    mean, std = norm_stats(encoder)
    with torch.inference_mode():
        u8 = images_u8.to(runtime.device, non_blocking=True)
        x = normalise_u8(u8, mean, std)
        if zero_mask is not None:
            m = zero_mask.to(device=x.device, dtype=torch.bool)
            if m.ndim == 2:
                m = m.unsqueeze(0)
            x.masked_fill_(m.unsqueeze(1), 0.0)
        if size is not None and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with runtime.autocast():
            feats = encoder(x) if keep_tokens is None else encoder(x, keep_tokens.to(x.device))
        feats = F.normalize(feats.float().flatten(1), dim=1)
    return feats.cpu() if to_cpu else feats


#: storage types of the feature matrix (``--feature-dtype``): float16 halves host memory and ``features.npy``
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}


def extract_features(encoder: nn.Module, images_u8: Tensor, runtime: rt.Runtime, batch_size: int = 256,
                     quiet: bool = False, dtype: str | type = "float32") -> np.ndarray:
    """Features of every image (``N x D``, L2-normalised), computed in batches with a progress bar.

    Each batch is written into one preallocated array of ``dtype`` (``float32`` or ``float16``), so host memory holds
    a single copy of the matrix. Under torch.distributed each rank encodes its contiguous shard
    (:func:`runtime.shard_indices`) and the shards are gathered, in rank order, to every rank: the result is the same
    array as in one process.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    np_dtype = np.dtype(FEATURE_DTYPES[dtype] if isinstance(dtype, str) else dtype)
    n = int(images_u8.shape[0])
    shard = rt.shard_indices(n, runtime.rank, runtime.world_size)
    prepare_encoder(encoder, runtime)
    local: np.ndarray | None = None
    with eval_mode(encoder), rt.progress("features", total=n, quiet=quiet) as bar:
        for start in range(shard.start, shard.stop, batch_size):
            stop = min(start + batch_size, shard.stop)
            feats = encode(encoder, images_u8[start:stop], runtime).numpy()
            if local is None:
                local = np.empty((len(shard), feats.shape[1]), np_dtype)
            local[start - shard.start:stop - shard.start] = feats
            bar.advance((stop - start) * runtime.world_size)
    if local is None:  # an empty shard still needs the feature width for the gather
        local = np.zeros((0, _feature_dim(encoder, images_u8, runtime)), np_dtype)
    if runtime.world_size > 1:
        return np.ascontiguousarray(rt.all_gather_tensor(torch.from_numpy(local)).numpy())
    return local


def _feature_dim(encoder: nn.Module, images_u8: Tensor, runtime: rt.Runtime) -> int:
    dim = getattr(encoder, "feature_dim", None)
    if dim is not None:
        return int(dim)
    if images_u8.shape[0] == 0:
        size = images_u8.shape[-1]
        images_u8 = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    with eval_mode(encoder):
        return int(encode(encoder, images_u8[:1], runtime).shape[1])


class ForwardCounter:
    """Counts the images the threat model encodes (a forward pre-hook on ``encoder``): the cost of a stage in
    backbone forwards, a number that does not depend on the machine. :meth:`take` returns the count since the last
    call."""

    def __init__(self, encoder: nn.Module) -> None:
        self._n = 0
        self._handle = encoder.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            self._n += int(args[0].shape[0])

    def take(self) -> int:
        n, self._n = self._n, 0
        return n

    def close(self) -> None:
        self._handle.remove()
