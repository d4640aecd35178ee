"""Encoders: a timm backbone behind one interface (image batch in, pooled feature batch out).

Any timm model name works (built with ``pretrained=False, num_classes=0``, ViTs at ``img_size=image_size``); the
registry adds architectures timm lacks (CIFAR ResNets, MoCo v3's ViT-S). Encoders are always built untrained: names
with a source prefix or a path (``hf-hub:...``, ``local-dir:...``, ``timm/...``) and the timm arguments that load
weights (``pretrained``, ``checkpoint_path``...) are refused before timm sees them. Grad-CAM needs one hooked module and
a way to turn its activations into a ``B x C x h x w`` map: ``Encoder.gradcam_layer()`` and
``Encoder.gradcam_reshape()``.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from poisonscan.errors import UsageError

BackboneBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, BackboneBuilder] = {}
_DEFAULT_SIZES: dict[str, int] = {}

#: a registry or timm model name, optionally with a timm pretrained tag (``resnet18.a1_in1k``): no source prefix
#: (``hf-hub:``, ``local-dir:``), no path or hub-repo separator, nothing timm would resolve outside its registry
_ARCH_NAME = re.compile(r"(?=.{1,128}$)[A-Za-z0-9_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)?")
#: ``timm.create_model`` arguments that load weights or configs from files, caches or the network
WEIGHT_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                           "pretrained_model_args", "checkpoint_path", "cache_dir", "file", "url", "hf_hub_id",
                           "hf_hub_filename"})


def register_encoder(name: str, default_image_size: int = 224) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator registering ``fn(image_size, **kw) -> nn.Module`` (a pooled-feature backbone) under ``name``.

    The backbone must return ``N x D`` features from ``forward`` and should expose ``num_features``.
    """

    def wrap(fn: BackboneBuilder) -> BackboneBuilder:
        if not _ARCH_NAME.fullmatch(name) or "." in name:
            raise ValueError(f"encoder name {name!r} must be letters, digits, '_' or '-'")
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        _DEFAULT_SIZES[name] = default_image_size
        return fn

    return wrap


def list_encoders(include_timm: bool = False) -> list[str]:
    """Registered encoder names (plus every timm model name when ``include_timm``)."""
    names = sorted(_REGISTRY)
    if include_timm:
        names += [n for n in timm.list_models() if n not in _REGISTRY]
    return names


def check_arch_name(arch: object) -> str:
    """``arch`` when it is a plain model name; UsageError for hub repos, paths and other names timm would resolve
    outside its registry (``hf-hub:org/repo``, ``local-dir:/path``, ``timm/resnet18``)."""
    if not isinstance(arch, str):
        raise UsageError(f"architecture must be a model name, got {type(arch).__name__}")
    if any(c in arch for c in ":/\\"):
        raise UsageError(f"architecture {arch[:80]!r} names a hub repo or a path: poisonscan builds only timm model "
                         "names and its registered encoders, never downloaded or local model configs")
    if not _ARCH_NAME.fullmatch(arch):
        raise UsageError(f"architecture {arch[:80]!r} is not a valid model name (letters, digits, '_', '-' and "
                         "an optional '.tag')")
    return arch


def is_known_arch(arch: str) -> bool:
    """True when ``arch`` is a registered encoder or a timm model name (never a hub repo or a path)."""
    return isinstance(arch, str) and bool(_ARCH_NAME.fullmatch(arch)) and (arch in _REGISTRY or timm.is_model(arch))


def default_image_size(arch: str) -> int:
    """The input resolution an architecture is usually used at (CIFAR: 32, timm: its default config, else 224)."""
    if arch in _DEFAULT_SIZES:
        return _DEFAULT_SIZES[arch]
    if is_known_arch(arch):
        cfg = timm.models.get_pretrained_cfg(arch)
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        if size:
            return int(size[-1])
    return 224


def _unknown_arch(arch: str) -> UsageError:
    close = difflib.get_close_matches(arch, list_encoders(include_timm=True), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (any timm model name or " + \
        ", ".join(list_encoders()) + ")"
    return UsageError(f"unknown architecture {arch!r}{hint}")


def _is_vit(backbone: nn.Module) -> bool:
    blocks = getattr(backbone, "blocks", None)
    return (hasattr(backbone, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0
            and hasattr(blocks[-1], "norm1"))


def _last_feature_module(backbone: nn.Module) -> str | None:
    info = getattr(backbone, "feature_info", None)
    if not info:
        return None
    last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
    return last.get("module")


class Encoder(nn.Module):
    """A backbone returning pooled, unnormalised float features ``N x feature_dim`` for ``N x 3 x S x S`` inputs."""

    def __init__(self, backbone: nn.Module, arch: str, image_size: int,
                 mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
                 build_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.build_kwargs = dict(build_kwargs or {})
        self.kind = "vit" if _is_vit(backbone) else "cnn"
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0)) if self.kind == "vit" else 0
        self._nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        self.feature_dim = self._feature_dim()

    def _feature_dim(self) -> int:
        for attr in ("head_hidden_size", "num_features"):
            dim = getattr(self.backbone, attr, None)
            if isinstance(dim, int) and dim > 0:
                return dim
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            dim = self.backbone(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1]
            self.backbone.train(was_training)
        return int(dim)

    @property
    def patch_size(self) -> int | None:
        """The ViT patch side (None for CNNs)."""
        if self.kind != "vit":
            return None
        ps = self.backbone.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, tuple | list) else ps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of a normalised float batch, returned as float32 even under autocast; with ``keep`` a
        ViT sees only those patch tokens (:meth:`forward_kept`)."""
        return self.backbone(x).float() if keep is None else self.forward_kept(x, keep)

    @property
    def token_grid(self) -> int | None:
        """Side of the ViT's square patch-token grid at ``image_size`` (None for CNNs and non-square grids)."""
        if self.kind != "vit":
            return None
        grid = tuple(getattr(self.backbone.patch_embed, "grid_size", ()) or ())
        if len(grid) != 2 or grid[0] != grid[1] or int(grid[0]) * (self.patch_size or 0) != self.image_size:
            return None
        return int(grid[0])

    @property
    def drops_tokens(self) -> bool:
        """Can :meth:`forward` with ``keep`` run this backbone on a subset of its patch tokens? True for timm's
        VisionTransformer layout (patch embedding, position embedding, blocks, norm, pooled head) at a fixed size."""
        bb = self.backbone
        return (self.token_grid is not None and not getattr(bb, "dynamic_img_size", False)
                and getattr(bb.patch_embed, "flatten", False) is True
                and all(callable(getattr(bb, name, None)) for name in ("_pos_embed", "norm_pre", "norm", "forward_head")))

    def forward_kept(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Pooled float32 features of a normalised batch seen through the patch tokens ``keep`` only (int64
        ``N x K`` row-major indices into the token grid, the same ``K`` for every image): the covered tokens are
        dropped after the patch and position embeddings, as a ViT sees a masked region (MAE-style), and the
        class/register tokens stay. Keeping every token gives :meth:`forward`'s features."""
        if not self.drops_tokens:
            raise ValueError(f"{self.arch}: this backbone cannot drop tokens")
        bb = self.backbone
        tokens = bb._pos_embed(bb.patch_embed(x))
        prefix = self.num_prefix_tokens
        kept = tokens[:, prefix:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        tokens = bb.norm_pre(torch.cat([tokens[:, :prefix], kept], dim=1))
        return bb.forward_head(bb.norm(bb.blocks(tokens)), pre_logits=True).float()

    def gradcam_layer(self) -> nn.Module:
        """The module whose output Grad-CAM uses: last block's ``norm1`` for ViTs, the last conv stage for CNNs."""
        if self.kind == "vit":
            return self.backbone.blocks[-1].norm1
        name = _last_feature_module(self.backbone)
        if name:
            return self.backbone.get_submodule(name)
        if isinstance(getattr(self.backbone, "layer4", None), nn.Module):
            return self.backbone.layer4
        for name in ("stages", "features"):
            mod = getattr(self.backbone, name, None)
            if isinstance(mod, nn.Sequential) and len(mod) > 0:
                return mod[-1]
        raise UsageError(f"{self.arch}: no Grad-CAM layer known for this backbone")

    def gradcam_reshape(self, act: torch.Tensor) -> torch.Tensor:
        """Turn ``gradcam_layer()`` activations (or their gradients) into a ``B x C x h x w`` map.

        ViT tokens ``B x N x C`` lose their class/register tokens and become the patch grid; CNN maps pass through
        (NHWC outputs are permuted to NCHW).
        """
        if self.kind == "vit":
            if act.ndim == 4:  # dynamic-size ViTs may keep the grid as B x h x w x C
                return act.permute(0, 3, 1, 2)
            tokens = act[:, self.num_prefix_tokens:]
            n = tokens.shape[1]
            grid = tuple(getattr(self.backbone.patch_embed, "grid_size", ()) or ())
            if len(grid) == 2 and grid[0] * grid[1] == n:
                h, w = int(grid[0]), int(grid[1])
            else:
                h = w = math.isqrt(n)
                if h * w != n:
                    raise ValueError(f"cannot reshape {n} ViT tokens into a square grid")
            return tokens.transpose(1, 2).reshape(act.shape[0], act.shape[2], h, w)
        if act.ndim != 4:
            raise ValueError(f"expected a 4-d CNN activation, got shape {tuple(act.shape)}")
        return act.permute(0, 3, 1, 2) if self._nhwc else act

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, image_size={self.image_size}, feature_dim={self.feature_dim}, kind={self.kind}"


def _untrained(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` for ``timm.create_model`` with ``pretrained=False, num_classes=0`` set last, so nothing overrides them."""
    return {**kw, "pretrained": False, "num_classes": 0}


def _timm_backbone(arch: str, image_size: int, **kw: Any) -> nn.Module:
    """``timm.create_model`` without weights or classifier; ``img_size`` is passed to models that take it."""
    kw = _untrained(kw)
    try:
        return timm.create_model(arch, img_size=image_size, **kw)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(arch, **kw)


def _build_backbone(arch: str, image_size: int, init_weights: bool, kw: dict[str, Any]) -> nn.Module:
    builder = _REGISTRY.get(arch) or (lambda size, **k: _timm_backbone(arch, size, **k))
    if not init_weights:  # timm ViTs: skip their (slow) custom init, weights are about to be overwritten
        try:
            return builder(image_size, **kw, weight_init="skip")
        except TypeError as exc:
            if "weight_init" not in str(exc):
                raise
    return builder(image_size, **kw)


def create_encoder(arch: str, image_size: int | None = None, *, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None, init_weights: bool = True, **kw: Any) -> Encoder:
    """Build an untrained :class:`Encoder` for ``arch`` at input resolution ``image_size``.

    ``arch`` is a registered name (:func:`list_encoders`) or any timm model name (hub repos and paths are refused);
    ``kw`` goes to the builder (JSON-safe values only, they are saved with the weights; the arguments that load
    weights, :data:`WEIGHT_KWARGS`, are refused). ``mean``/``std`` default to ImageNet's statistics.
    ``init_weights=False`` skips timm's (slow) ViT initialisation, leaving some parameters uninitialised: only for
    a model whose every weight is loaded next.
    """
    check_arch_name(arch)
    if not is_known_arch(arch):
        raise _unknown_arch(arch)
    loading = sorted(WEIGHT_KWARGS & kw.keys())
    if loading:
        raise UsageError(f"create_encoder builds untrained encoders: {', '.join(loading)} not accepted "
                         "(load weights with load_encoder)")
    size = default_image_size(arch) if image_size is None else int(image_size)
    if size < 8:
        raise UsageError(f"image size {size} is too small for {arch}")
    try:
        backbone = _build_backbone(arch, size, init_weights, kw)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"cannot build {arch} at image size {size}: {exc}") from None
    if _is_vit(backbone):
        ps = backbone.patch_embed.patch_size
        ps = ps[0] if isinstance(ps, tuple | list) else ps
        if size % int(ps):
            raise UsageError(f"{arch}: image size {size} is not a multiple of the patch size {ps}")
    return Encoder(backbone, arch, size, mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD, build_kwargs=kw)


def _cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet's 7x7/2 stem and max-pool with a 3x3/1 conv (the usual CIFAR ResNet)."""
    out_ch = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        for entry in info:
            entry["reduction"] = max(1, int(entry["reduction"]) // 4)
    return model


@register_encoder("cifar_resnet18", default_image_size=32)
def _cifar_resnet18(image_size: int, **kw: Any) -> nn.Module:
    return _cifar_stem(timm.create_model("resnet18", **_untrained(kw)))


@register_encoder("cifar_resnet50", default_image_size=32)
def _cifar_resnet50(image_size: int, **kw: Any) -> nn.Module:
    return _cifar_stem(timm.create_model("resnet50", **_untrained(kw)))


@register_encoder("mocov3_vit_small", default_image_size=224)
def _mocov3_vit_small(image_size: int, **kw: Any) -> nn.Module:
    """MoCo v3's ViT-S/16: timm's ViT-S with 12 heads instead of 6 (same weight shapes, different attention)."""
    kw = {"num_heads": 12, **kw}
    return timm.create_model("vit_small_patch16_224", img_size=image_size, **_untrained(kw))


def _small_image_vit(timm_name: str, patch: int) -> BackboneBuilder:
    def build(image_size: int, **kw: Any) -> nn.Module:
        return timm.create_model(timm_name, img_size=image_size, **_untrained({"patch_size": patch, **kw}))
    return build


# ViTs for small images: an 8 x 8 token grid at their default size (patch 4 at 32 px, patch 8 at 64 px), so masking
# and Grad-CAM see 64 tokens where a /16 ViT sees 4 or 16; timm's ViT-Tiny (192-d, 3 heads) and ViT-S (384-d, 6 heads)
for _name, _timm, _patch, _size in (("vit_tiny_p4", "vit_tiny_patch16_224", 4, 32),
                                    ("vit_small_p4", "vit_small_patch16_224", 4, 32),
                                    ("vit_tiny_p8", "vit_tiny_patch16_224", 8, 64),
                                    ("vit_small_p8", "vit_small_patch16_224", 8, 64)):
    register_encoder(_name, default_image_size=_size)(_small_image_vit(_timm, _patch))
