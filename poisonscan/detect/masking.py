"""Cluster Activation Masking (PoisonCAM IV-B, eq. 2-3): where does masking move an image out of its cluster?

For each image, B masked copies go through the threat model; the cluster each copy lands in and its distance to
that cluster's centre weight the masks into an attention map A, and the w x w window with the largest attention sum
is the image's candidate trigger.

Its length is the one masking step in its three forms, which share eq. 2-3, the best window and the encode path:
the paper's B random masks, the coarse-to-fine grid, and both on a ViT's token grid with the covered tokens dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.settings import PAPER
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.features import encode, eval_mode, prepare_encoder

STRATEGIES = ("full", "interval", "random")
SCALES = ("all", "majority")


@dataclass
class MaskingConfig:
    """B masks of a w x w window; ``block`` is w' of the interval/random strategies (0 -> ``max(1, window // 8)``)."""

    n_masks: int = PAPER.n_masks
    window: int = 17
    strategy: str = PAPER.mask_strategy
    block: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"mask strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.n_masks < 1 or self.window < 1 or self.batch_size < 1 or self.block < 0:
            raise ValueError("n_masks, window and batch_size must be >= 1 and block >= 0")

    @property
    def block_size(self) -> int:
        return self.block if self.block > 0 else max(1, self.window // 8)


def window_pixels(window: float | None, image_size: int, reference: int = PAPER.reference_size) -> int:
    """Window side in pixels at ``image_size``.

    ``window >= 1`` is a pixel count, ``0 < window < 1`` a fraction of the side; ``None`` is the paper's 60 px of a
    ``reference`` (224) px image scaled to ``image_size`` (17 px at 64, 26 at 96). Clamped to ``[1, image_size]``.
    """
    if window is None:
        window = PAPER.window / reference
    if window <= 0:
        raise ValueError(f"window must be > 0, got {window}")
    px = round(window) if window >= 1 else round(window * image_size)
    return int(min(max(px, 1), image_size))


def _window_patterns(cfg: MaskingConfig, window: int, generator: torch.Generator) -> Tensor:
    """The w x w pattern of each of the B masks (bool B x w x w, True = masked)."""
    b = cfg.n_masks
    if cfg.strategy == "full":
        return torch.ones(b, window, window, dtype=torch.bool)
    block = min(cfg.block_size, window)
    n_blocks = math.ceil(window / block)
    cell = torch.arange(window) // block  # block index of each row/column of the window
    if cfg.strategy == "interval":
        grid = (torch.arange(n_blocks)[:, None] + torch.arange(n_blocks)[None, :]) % 2 == 0
        grid = grid.expand(b, n_blocks, n_blocks)
    else:  # random: exactly half of the blocks (rounded up) masked, drawn per mask
        keys = torch.rand(b, n_blocks * n_blocks, generator=generator)
        ranks = keys.argsort(dim=1).argsort(dim=1)
        grid = (ranks < math.ceil(n_blocks * n_blocks / 2)).view(b, n_blocks, n_blocks)
    return grid[:, cell][:, :, cell]


def make_masks(cfg: MaskingConfig, size: int, generator: torch.Generator) -> Tensor:
    """B cyclic masks (bool ``B x S x S``, True = pixel set to zero).

    Window corners follow a jittered grid: the image is cut into ``g x g`` cells (``g = ceil(sqrt(B))``), B distinct
    cells are drawn and each corner is uniform inside its cell, so the corners cover ``[0, S)^2`` evenly. Positions
    are cyclic (paper VI): pixel ``(x + u, y + v)`` of a window lands at ``((x + u) mod S, (y + v) mod S)``, so
    windows wrap around the edges and every pixel is masked about ``B w^2 / S^2`` times, borders included.
    """
    window = min(int(cfg.window), size)
    b = cfg.n_masks
    g = math.ceil(math.sqrt(b))
    cells = torch.randperm(g * g, generator=generator)[:b]
    jitter = torch.rand(b, 2, generator=generator)
    cx = ((cells % g).double() + jitter[:, 0].double()) * size / g
    cy = ((cells // g).double() + jitter[:, 1].double()) * size / g
    x0 = cx.floor().long() % size
    y0 = cy.floor().long() % size
    offs = torch.arange(window)
    rows = (y0[:, None] + offs[None, :]) % size  # B x w
    cols = (x0[:, None] + offs[None, :]) % size
    masks = torch.zeros(b, size, size, dtype=torch.bool)
    patterns = _window_patterns(cfg, window, generator)
    masks[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]] = patterns
    return masks


def majority_labels(labels: Tensor) -> Tensor:
    """eta*: the most frequent cluster of each row of ``labels`` (n x B; ties -> the smaller cluster id)."""
    labels = labels.long()
    n_cls = int(labels.max().item()) + 1 if labels.numel() else 1
    counts = torch.zeros(labels.shape[0], n_cls, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return counts.argmax(dim=1)


def outlier_scores(labels: Tensor, distances: Tensor, eta_star: Tensor, scale_over: str = "all") -> Tensor:
    """Eq. 2 for a batch of images: ``a_j = d_j^n`` if ``eta_j == eta*`` else 1 (n x B float32).

    ``d^n`` is the min-max scaling of the distances over the B masks of the image (``scale_over="all"``, the paper's
    ``min_k``/``max_k`` over all masks) or over the masks that stayed in ``eta*`` only (``"majority"``: distances to
    other clusters do not stretch the scale). When the distances are all equal ``d^n`` is 0 (no division by zero).
    """
    if scale_over not in SCALES:
        raise ValueError(f"scale_over {scale_over!r}: choose one of {', '.join(SCALES)}")
    d = distances.float()
    stay = labels == eta_star[:, None]
    if scale_over == "all":
        lo = d.min(dim=1, keepdim=True).values
        hi = d.max(dim=1, keepdim=True).values
    else:
        inf = torch.full_like(d, float("inf"))
        lo = torch.where(stay, d, inf).min(dim=1, keepdim=True).values
        hi = torch.where(stay, d, -inf).max(dim=1, keepdim=True).values
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    dn = torch.where(ok, (d - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(d))
    return torch.where(stay, dn.clamp(0.0, 1.0), torch.ones_like(dn))


def attention_maps(masks: Tensor, labels: Tensor, distances: Tensor, eta_star: Tensor | None = None,
                   scale_over: str = "all") -> Tensor:
    """Eq. 2-3 for n images sharing the same B masks: ``A = sum_j m_j a_j / sum_j m_j`` (n x S x S float32).

    ``masks`` bool B x S x S; ``labels``/``distances`` n x B (cluster and distance of each masked copy);
    ``eta_star`` n (default: the majority label); ``scale_over`` see :func:`outlier_scores`. Pixels no mask
    covers get 0.
    """
    if labels.ndim == 1:
        labels, distances = labels[None], distances[None]
        if eta_star is not None:
            eta_star = torch.as_tensor(eta_star).reshape(1)
    eta = majority_labels(labels) if eta_star is None else torch.as_tensor(eta_star, device=labels.device).long()
    a = outlier_scores(labels, distances, eta, scale_over)
    b, h, w = masks.shape
    m = masks.reshape(b, h * w).to(device=a.device, dtype=torch.float32)
    num = a @ m
    den = m.sum(0)
    att = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num))
    return att.view(-1, h, w)


def attention_map(masks: Tensor, labels: Tensor, distances: Tensor, eta_star: int | None = None,
                  scale_over: str = "all") -> Tensor:
    """Eq. 2-3 for one image: labels/distances of its B masked copies -> attention map S x S (float32)."""
    return attention_maps(masks, labels.reshape(1, -1), distances.reshape(1, -1),
                          None if eta_star is None else torch.tensor([int(eta_star)]), scale_over)[0]


def best_window(attention: Tensor, window: int) -> Tensor:
    """``(x, y, w, h)`` of the w x w window inside the image with the largest attention sum.

    ``attention`` S x S -> 4, or n x S x S -> n x 4 (int64). A box filter (avg_pool2d, stride 1) scores every
    position fully inside the image; ties go to the first position in row-major order.
    """
    single = attention.ndim == 2
    att = attention[None] if single else attention
    n, h, w = att.shape
    win_h, win_w = min(int(window), h), min(int(window), w)
    sums = F.avg_pool2d(att[:, None].float(), (win_h, win_w), stride=1)[:, 0]  # n x (h-wh+1) x (w-ww+1)
    flat = sums.flatten(1).argmax(dim=1)
    out_w = sums.shape[2]
    ys, xs = flat // out_w, flat % out_w
    boxes = torch.stack([xs, ys, torch.full_like(xs, win_w), torch.full_like(xs, win_h)], dim=1).long()
    return boxes[0] if single else boxes


def cut_windows(images_u8: Tensor, boxes: Tensor) -> Tensor:
    """The candidate triggers: the ``boxes`` (n x 4, same w x h) cut from ``images_u8`` (n x 3 x S x S)."""
    if images_u8.shape[0] == 0:
        return images_u8[:, :, :0, :0]
    w, h = int(boxes[0, 2]), int(boxes[0, 3])
    if not (bool((boxes[:, 2] == w).all()) and bool((boxes[:, 3] == h).all())):
        raise ValueError("cut_windows needs boxes of one size")
    boxes = boxes.to(images_u8.device)
    rows = boxes[:, 1, None] + torch.arange(h, device=boxes.device)  # n x h
    cols = boxes[:, 0, None] + torch.arange(w, device=boxes.device)
    n = torch.arange(images_u8.shape[0], device=boxes.device)
    c = torch.arange(images_u8.shape[1], device=boxes.device)
    return images_u8[n[:, None, None, None], c[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def token_window(window: int, patch: int, grid: int) -> int:
    """The masking window in tokens: ``window`` pixels rounded to whole ``patch``-pixel tokens, in ``[1, grid]``."""
    return int(min(max(round(window / patch), 1), grid))


def kept_tokens(masks: Tensor) -> Tensor:
    """Row-major indices (int64 ``N x K``) of the tokens each mask (bool ``N x G x G``, the same count masked in
    every row) leaves visible."""
    visible = ~masks.flatten(1)
    counts = visible.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("token masks must each cover the same number of tokens")
    return visible.nonzero()[:, 1].view(masks.shape[0], -1)


def cluster_activation_masking(encoder: nn.Module, clustering: Clustering, images_u8: Tensor, masks: Tensor,
                               runtime: rt.Runtime, batch_size: int = 256, window: int | None = None,
                               scale_over: str = "all", quiet: bool = True,
                               patch: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate trigger detection for n images with the B ``masks`` (bool B x S x S, shared by all images).

    The n*B (image, mask) pairs are encoded in batches of ``batch_size`` built on the fly (never n*B images at
    once) and assigned to clusters with a matmul on the device; then eq. 2-3 give the attention maps and the
    best w x w window (``window``: pass it; by default the window side is inferred from the first mask, exact
    for full-coverage masks). ``scale_over``: see :func:`outlier_scores`. ``patch > 0``: the masks (and
    ``window``) are on the token grid of a ViT with that patch side and drop the tokens they cover; the attention
    maps and boxes come back in pixels.
    Returns ``(attention float32 n x S x S, boxes int64 n x 4, eta_star int64 n)`` on the CPU.
    """
    n, b = int(images_u8.shape[0]), int(masks.shape[0])
    pixels = int(images_u8.shape[-1])
    size = pixels // patch if patch else pixels
    if tuple(masks.shape[-2:]) != (size, size) or images_u8.shape[-1] != images_u8.shape[-2]:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])}, images {tuple(images_u8.shape[-2:])}"
                         + (f" with patch {patch}" if patch else ""))
    win = int(window) if window is not None else _mask_window(masks)
    if n == 0:
        return (torch.zeros(0, pixels, pixels), torch.zeros(0, 4, dtype=torch.int64),
                torch.zeros(0, dtype=torch.int64))
    device = runtime.device
    prepare_encoder(encoder, runtime)
    total = n * b
    per_load = max(1, math.ceil(batch_size / b)) * 8  # images moved to the device at once
    with eval_mode(encoder), torch.inference_mode(), rt.progress("masking", total=total, quiet=quiet) as bar:
        masks_dev = masks.to(device=device, dtype=torch.bool)
        kept = kept_tokens(masks_dev) if patch else None
        labels = torch.empty(total, dtype=torch.int64, device=device)
        dists = torch.empty(total, dtype=torch.float32, device=device)
        loaded, lo = images_u8[:0].to(device), 0
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            first, last = start // b, (stop - 1) // b + 1
            if first < lo or last > lo + loaded.shape[0]:
                lo = first
                loaded = images_u8[first:max(last, first + per_load)].to(device, non_blocking=True)
            pair = torch.arange(start, stop, device=device)
            if patch:
                feats = encode(encoder, loaded[pair // b - lo], runtime, keep_tokens=kept[pair % b], to_cpu=False)
            else:
                feats = encode(encoder, loaded[pair // b - lo], runtime, zero_mask=masks_dev[pair % b], to_cpu=False)
            labels[start:stop], dists[start:stop] = clustering.assign_torch(feats)
            bar.advance(stop - start)
        labels, dists = labels.view(n, b), dists.view(n, b)
        eta = majority_labels(labels)
        att = attention_maps(masks_dev, labels, dists, eta, scale_over)
        boxes = best_window(att, win)
    return _in_pixels(att, boxes, patch) + (eta.cpu(),)


def _in_pixels(att: Tensor, boxes: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """Attention maps and boxes on the CPU, from token units to pixels when ``patch > 0``."""
    if patch:
        att = att.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)
        boxes = boxes * patch
    return att.cpu(), boxes.cpu()


def detect_candidates(encoder: nn.Module, clustering: Clustering, images_u8: Tensor, cfg: MaskingConfig,
                      runtime: rt.Runtime, generator: torch.Generator, scale_over: str = "all",
                      quiet: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`make_masks` from ``cfg`` then :func:`cluster_activation_masking` with ``cfg.window`` and
    ``cfg.batch_size``: the whole candidate-trigger stage for a batch of images."""
    masks = make_masks(cfg, int(images_u8.shape[-1]), generator)
    return cluster_activation_masking(encoder, clustering, images_u8, masks, runtime, batch_size=cfg.batch_size,
                                      window=min(cfg.window, int(images_u8.shape[-1])), scale_over=scale_over,
                                      quiet=quiet)


def _mask_window(masks: Tensor) -> int:
    """Side of the (possibly wrapped) window of the first mask: its row span modulo the image size."""
    m = masks[0]
    rows = m.any(dim=1).nonzero().flatten()
    cols = m.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError("the first mask is empty: pass window= explicitly")
    return int(max(_cyclic_span(rows, m.shape[0]), _cyclic_span(cols, m.shape[1])))


def _cyclic_span(idx: Tensor, size: int) -> int:
    """Length of the shortest cyclic interval of ``range(size)`` holding all of ``idx`` (sorted, unique)."""
    if idx.numel() == size:
        return size
    gaps = torch.diff(torch.cat([idx, idx[:1] + size]))
    return int(size - (gaps.max().item() - 1))


# -- coarse-to-fine masking -----------------------------------------------------------------------------------------

def grid_corners(size: int, stride: float, offset: Tensor | None = None) -> Tensor:
    """Top-left corners (int64 ``g*g x 2``, x then y) of a cyclic grid with ``g = ceil(size / stride)`` cells per
    side, shifted by ``offset`` (2 floats in [0, 1) of a cell; 0 when ``None``)."""
    g = max(1, math.ceil(size / float(stride)))
    step = size / g
    off = torch.zeros(2, dtype=torch.float64) if offset is None else offset.double().reshape(2)
    ticks_x = ((torch.arange(g, dtype=torch.float64) + off[0]) * step).floor().long() % size
    ticks_y = ((torch.arange(g, dtype=torch.float64) + off[1]) * step).floor().long() % size
    ys, xs = torch.meshgrid(ticks_y, ticks_x, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def window_masks(corners: Tensor, window: int, size: int) -> Tensor:
    """Full-coverage cyclic masks (bool ``... x S x S``) of ``window x window`` windows with top-left ``corners``
    (``... x 2``, x then y): pixel ``(x + u, y + v)`` lands at ``((x + u) mod S, (y + v) mod S)`` as in
    :func:`make_masks`."""
    dev = corners.device
    offs = torch.arange(int(window), device=dev)
    rows = (corners[..., 1, None] + offs) % size                     # ... x w
    cols = (corners[..., 0, None] + offs) % size
    in_rows = torch.zeros(*corners.shape[:-1], size, dtype=torch.bool, device=dev)
    in_cols = torch.zeros_like(in_rows)
    in_rows.scatter_(-1, rows, True)
    in_cols.scatter_(-1, cols, True)
    return in_rows[..., :, None] & in_cols[..., None, :]


def _masked_outcomes(encoder: nn.Module, clustering: Clustering, images_u8: Tensor, corners: Tensor, window: int,
                     runtime: rt.Runtime, batch_size: int, bar: Any, patch: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster and distance of every image's masked copies, one per corner (``corners`` n x B x 2): n x B each.
    ``patch = 0``: the masks zero ``window x window`` pixels; ``patch > 0``: corners and window are in tokens of
    a ViT with that patch side and the masked tokens are dropped (:func:`kept_tokens`)."""
    n, b = int(corners.shape[0]), int(corners.shape[1])
    size = int(images_u8.shape[-1]) // patch if patch else int(images_u8.shape[-1])
    device = runtime.device
    total = n * b
    labels = torch.empty(total, dtype=torch.int64, device=device)
    dists = torch.empty(total, dtype=torch.float32, device=device)
    flat = corners.reshape(total, 2).to(device)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        pair = torch.arange(start, stop, device=device)
        masks = window_masks(flat[start:stop], window, size)
        imgs = images_u8[(pair // b).cpu()].to(device)
        feats = (encode(encoder, imgs, runtime, keep_tokens=kept_tokens(masks), to_cpu=False) if patch else
                 encode(encoder, imgs, runtime, zero_mask=masks, to_cpu=False))
        labels[start:stop], dists[start:stop] = clustering.assign_torch(feats)
        if bar is not None:
            bar.advance(stop - start)
    return labels.view(n, b), dists.view(n, b)


def corner_attention(corners: Tensor, scores: Tensor, window: int, size: int, chunk_elems: int = 1 << 24) -> Tensor:
    """Eq. 3 for masks given by their corners: ``A = sum_j m_j a_j / sum_j m_j`` per image (n x S x S float32) from
    corners (n x B x 2) and outlier scores ``a`` (n x B); pixels no mask covers get 0. Masks are built in chunks of
    images so memory stays under about ``chunk_elems`` floats."""
    n, b = int(corners.shape[0]), int(corners.shape[1])
    out = torch.zeros(n, size, size, dtype=torch.float32, device=scores.device)
    per = max(1, chunk_elems // max(1, b * size * size))
    for s in range(0, n, per):
        m = window_masks(corners[s:s + per].to(scores.device), window, size).float()   # c x B x S x S
        num = torch.einsum("cb,cbhw->chw", scores[s:s + per].float(), m)
        den = m.sum(1)
        out[s:s + per] = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num))
    return out


@dataclass
class CoarseToFine:
    """Coarse-to-fine masking: ``coarse`` masks on a cyclic grid of stride ``coarse_stride * w`` find the region,
    then ``levels`` rounds of ``fine x fine`` masks refine it, their corners on a grid spanning ``w / 2`` (halved at
    each level) either side of the best window so far."""

    coarse_stride: float = 0.5
    fine: int = 3
    levels: int = 1

    def grid(self, window: int, size: int) -> int:
        """Coarse corners per side; ``size`` (every position) when the stride is one pixel or token."""
        return max(1, math.ceil(size / max(1.0, self.coarse_stride * window)))

    def masks_per_image(self, window: int, size: int) -> int:
        """Masks per image: the coarse grid, then the refinements unless the coarse grid holds every position."""
        g = self.grid(window, size)
        return g * g if g >= size else g * g + self.levels * self.fine * self.fine


#: every position of the grid: masking by tokens without the coarse-to-fine plan
EVERY_POSITION = CoarseToFine(coarse_stride=0.0, levels=0)


def coarse_to_fine_masking(encoder: nn.Module, clustering: Clustering, images_u8: Tensor, window: int,
                           runtime: rt.Runtime, generator: torch.Generator, batch_size: int = 256,
                           plan: CoarseToFine | None = None, scale_over: str = "all",
                           quiet: bool = True, patch: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate windows like :func:`cluster_activation_masking` (full-coverage masks) from far fewer masks.

    Stage 1 masks every image with the same cyclic grid of w x w windows (stride ``plan.coarse_stride * w``, one
    random offset drawn from ``generator``) and finds the best window of its attention map. Each further level adds
    ``plan.fine ** 2`` masks per image whose corners form a grid spanning ``w / 2`` (then ``w / 4``, ...) either
    side of the best window so far. Eq. 2-3 run over all of the image's masks so far (the min-max scaling, the
    majority cluster and the weighted sum see every stage alike), and the best window of the last map is the
    candidate. At the paper's w = 60/224 of the side: 64 + 9 = 73 masks per image instead of 256.

    ``patch > 0`` masks a ViT by dropping tokens: the plan runs on its ``S / patch`` token grid with the window in
    tokens (:func:`token_window`), and the attention map and boxes come back in pixels (each token's value on its
    ``patch x patch`` pixels). A stride of one token visits every position and needs no refinement.
    Returns ``(attention float32 n x S x S, boxes int64 n x 4, eta_star int64 n)`` on the CPU.
    """
    plan = plan or CoarseToFine()
    n, pixels = int(images_u8.shape[0]), int(images_u8.shape[-1])
    size = pixels // patch if patch else pixels
    win = token_window(window, patch, size) if patch else min(int(window), size)
    if n == 0:
        return (torch.zeros(0, pixels, pixels), torch.zeros(0, 4, dtype=torch.int64),
                torch.zeros(0, dtype=torch.int64))
    device = runtime.device
    coarse = grid_corners(size, max(1.0, plan.coarse_stride * win), torch.rand(2, generator=generator))
    prepare_encoder(encoder, runtime)
    total = n * plan.masks_per_image(win, size)
    with eval_mode(encoder), torch.inference_mode(), rt.progress("masking", total=total, quiet=quiet) as bar:
        corners = coarse.to(device).expand(n, -1, -1)
        labels, dists = _masked_outcomes(encoder, clustering, images_u8, corners, win, runtime, batch_size, bar,
                                         patch)
        span = win / 2
        for _ in range(plan.levels + 1):
            eta = majority_labels(labels)
            att = corner_attention(corners, outlier_scores(labels, dists, eta, scale_over), win, size)
            boxes = best_window(att, win)
            if corners.shape[1] == total // n:
                break
            ticks = torch.linspace(-span, span, plan.fine, dtype=torch.float64).round().long()
            offsets = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), dim=-1).reshape(-1, 2).to(device)
            fine = (boxes[:, None, :2].to(device) + offsets[None]) % size          # n x fine^2 x 2, cyclic
            f_lab, f_dist = _masked_outcomes(encoder, clustering, images_u8, fine, win, runtime, batch_size, bar,
                                             patch)
            corners = torch.cat([corners, fine], dim=1)
            labels, dists = torch.cat([labels, f_lab], dim=1), torch.cat([dists, f_dist], dim=1)
            span /= 2
    return _in_pixels(att, boxes, patch) + (eta.cpu(),)
