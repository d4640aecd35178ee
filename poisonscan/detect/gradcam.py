"""PatchSearch's candidate trigger detection (the baseline PoisonCAM replaces): Grad-CAM on a clustering model.

The "clustering model" is the threat model's backbone with a head of cosine similarities to the k-means centroids.
For each image the target is its argmax cluster; the gradient of that similarity flows back to
``encoder.gradcam_layer()`` (CNN: last stage; ViT: last block's ``norm1`` tokens as a patch grid via
``encoder.gradcam_reshape``), Grad-CAM weights the activation channels by their mean gradient, the map is ReLU'd,
upsampled to ``S x S`` and min-max scaled, and the ``w x w`` window with the largest attention sum is the candidate.
The result has the form of :func:`poisonscan.detect.masking.cluster_activation_masking`, so ``--method patchsearch``
swaps only this stage of the pipeline.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.features import eval_mode, norm_stats, normalise_u8, prepare_encoder
from poisonscan.detect.masking import best_window

log = logging.getLogger(__name__)


def _to_map(encoder: nn.Module, t: Tensor) -> Tensor:
    """Grad-CAM layer output (or its gradient) as ``B x C x h x w``."""
    reshape = getattr(encoder, "gradcam_reshape", None)
    if reshape is not None:
        return reshape(t)
    if t.ndim != 4:
        raise ValueError(f"Grad-CAM layer output has shape {tuple(t.shape)}; the encoder needs gradcam_reshape()")
    return t


def minmax_scale(maps: Tensor) -> Tensor:
    """Scale each map of ``n x H x W`` to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    ok = span > 0
    out = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.view_as(maps)


#: image sizes already warned about (a 1 x 1 Grad-CAM map); the search calls ``gradcam_maps`` once per round
_WARNED_NO_LOCATION: set[int] = set()


def gradcam_maps(encoder: nn.Module, clustering: Clustering, images_u8: Tensor, runtime: rt.Runtime,
                 batch_size: int = 64, quiet: bool = True) -> tuple[Tensor, Tensor]:
    """Grad-CAM attention (float32 ``n x S x S`` in [0, 1]) toward each image's most similar centroid, and that
    cluster (int64 ``n``), on the CPU.

    A batch's gradients come from one backward pass of the sum of its images' selected similarities (images do not
    interact in eval mode, so this equals per-image backward passes).
    """
    n, size = int(images_u8.shape[0]), int(images_u8.shape[-1])
    if n == 0:
        return torch.zeros(0, size, size), torch.zeros(0, dtype=torch.int64)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    prepare_encoder(encoder, runtime)
    device = runtime.device
    mean, std = norm_stats(encoder)
    centroids = F.normalize(torch.from_numpy(clustering.centroids).to(device).float(), dim=1)
    layer = encoder.gradcam_layer()
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple)
                                                                               else out))
    # fp16 gradients of a cosine under 1 fall below fp16's normal range: scale by a power of two (exact; the
    # min-max scaled maps are the same)
    grad_scale = 1024.0 if runtime.amp_dtype == torch.float16 else 1.0
    maps, etas = [], []
    try:
        with eval_mode(encoder), torch.inference_mode(False), torch.enable_grad(), \
                rt.progress("grad-cam", total=n, quiet=quiet) as bar:
            for start in range(0, n, batch_size):
                u8 = images_u8[start:start + batch_size].to(device, non_blocking=True)
                x = normalise_u8(u8, mean, std).requires_grad_(True)
                captured.clear()
                with runtime.autocast():
                    feats = encoder(x)
                sims = F.normalize(feats.float().flatten(1), dim=1) @ centroids.t()          # cosine head
                eta = sims.argmax(1)
                if not captured:
                    raise RuntimeError("the Grad-CAM layer was not run by the encoder's forward pass")
                act = captured[-1]
                target = sims.gather(1, eta[:, None]).sum() * grad_scale
                (grad,) = torch.autograd.grad(target, act)
                a, g = _to_map(encoder, act.detach()).float(), _to_map(encoder, grad).float()
                if start == 0 and a.shape[-2] * a.shape[-1] == 1 and size not in _WARNED_NO_LOCATION:
                    _WARNED_NO_LOCATION.add(size)       # once per image size, not once per search round
                    log.warning("Grad-CAM layer output is 1 x 1 at %d px: the attention map carries no location "
                                "(candidate windows are arbitrary); use a larger --image-size", size)
                cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                maps.append(minmax_scale(cam).cpu())
                etas.append(eta.cpu())
                bar.advance(len(u8))
    finally:
        handle.remove()
    return torch.cat(maps), torch.cat(etas)


def gradcam_candidates(encoder: nn.Module, clustering: Clustering, images_u8: Tensor, window: int,
                       runtime: rt.Runtime, batch_size: int = 64, quiet: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """PatchSearch candidate triggers: ``(attention float32 n x S x S, boxes int64 n x 4, eta int64 n)`` with the
    ``window x window`` box of largest Grad-CAM sum inside each image (same outputs as cluster activation masking)."""
    att, eta = gradcam_maps(encoder, clustering, images_u8, runtime, batch_size=batch_size, quiet=quiet)
    win = int(min(max(1, window), images_u8.shape[-1]))
    boxes = best_window(att, win) if len(att) else torch.zeros(0, 4, dtype=torch.int64)
    return att, boxes.long(), eta


def gradcam_batch_size(masking_batch: int) -> int:
    """Images per Grad-CAM backward pass for a forward batch size (activations are kept for the backward)."""
    return max(1, math.ceil(masking_batch / 4))
