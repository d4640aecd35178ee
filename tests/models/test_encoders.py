"""Encoder factory, registry, pooled features and Grad-CAM hooks (tiny inputs, untrained models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonscan.errors import UsageError
from poisonscan.models import Encoder, create_encoder, default_image_size, list_encoders, register_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.mark.parametrize(("arch", "size", "dim", "grid"), [
    ("resnet18", 64, 512, 2),
    ("cifar_resnet18", 32, 512, 4),
    ("vit_tiny_patch16_224", 32, 192, 2),
    ("vit_tiny_patch16_224", 64, 192, 4),
    ("vit_tiny_p4", 32, 192, 8),
    ("vit_tiny_p8", 64, 192, 8),
])
def test_factory_features_and_gradcam(arch: str, size: int, dim: int, grid: int) -> None:
    torch.manual_seed(0)
    enc = create_encoder(arch, size).eval()
    assert isinstance(enc, Encoder)
    assert (enc.arch, enc.image_size, enc.feature_dim) == (arch, size, dim)
    assert enc.mean == pytest.approx(IMAGENET_MEAN) and len(enc.std) == 3
    acts: list[torch.Tensor] = []
    hook = enc.gradcam_layer().register_forward_hook(lambda _m, _i, out: acts.append(out))
    out = enc(torch.randn(3, 3, size, size))
    hook.remove()
    assert out.shape == (3, dim) and out.dtype == torch.float32
    cam = enc.gradcam_reshape(acts[0])
    assert cam.shape == (3, acts[0].shape[-1] if enc.kind == "vit" else dim, grid, grid)


def test_gradcam_layers_are_last_stage_and_last_norm1() -> None:
    cnn = create_encoder("resnet18", 32)
    vit = create_encoder("vit_tiny_patch16_224", 32)
    assert cnn.gradcam_layer() is cnn.backbone.layer4
    assert vit.gradcam_layer() is vit.backbone.blocks[-1].norm1
    assert (cnn.kind, vit.kind, vit.patch_size, cnn.patch_size) == ("cnn", "vit", 16, None)


def test_vit_reshape_drops_class_token_and_keeps_row_major_order() -> None:
    vit = create_encoder("vit_tiny_patch16_224", 48)  # 3 x 3 patches + 1 class token
    tokens = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(2, 10, 4)
    cam = vit.gradcam_reshape(tokens)
    assert cam.shape == (2, 4, 3, 3)
    assert cam[0, 0].flatten().tolist() == [float(i) for i in range(1, 10)]


def test_cnn_reshape_is_identity() -> None:
    cnn = create_encoder("cifar_resnet18", 32)
    act = torch.randn(2, 512, 4, 4)
    assert cnn.gradcam_reshape(act) is act


def test_cifar_stem_has_3x3_stride1_conv_and_no_maxpool() -> None:
    enc = create_encoder("cifar_resnet18", 32)
    conv = enc.backbone.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert isinstance(enc.backbone.maxpool, nn.Identity)
    assert default_image_size("cifar_resnet18") == 32 and default_image_size("resnet18") == 224
    assert {"cifar_resnet18", "cifar_resnet50", "mocov3_vit_small", "vit_tiny_p4", "vit_small_p8"} <= set(list_encoders())


def test_channels_last_and_autocast_give_float_features() -> None:
    torch.manual_seed(0)
    enc = create_encoder("cifar_resnet18", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc(x)
        enc_cl = enc.to(memory_format=torch.channels_last)
        out = enc_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert low.dtype == torch.float32 and low.shape == ref.shape


def test_gradcam_gradients_flow_to_hooked_layer() -> None:
    enc = create_encoder("vit_tiny_patch16_224", 32).eval()
    acts: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        acts.append(out)

    hook = enc.gradcam_layer().register_forward_hook(keep)
    enc(torch.randn(1, 3, 32, 32)).sum().backward()
    hook.remove()
    grad_map = enc.gradcam_reshape(acts[0].grad)
    assert grad_map.shape == (1, 192, 2, 2) and grad_map.abs().sum() > 0


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(UsageError, match="resnet18"):
        create_encoder("resnt18", 32)
    with pytest.raises(UsageError, match="cifar_resnet18"):
        create_encoder("cifar_resnet19", 32)


def test_vit_image_size_must_be_multiple_of_patch() -> None:
    with pytest.raises(UsageError, match="patch size"):
        create_encoder("vit_tiny_patch16_224", 40)


def test_register_encoder_adds_a_custom_backbone() -> None:
    class Tiny(nn.Module):
        num_features = 8

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    @register_encoder("test_tiny_conv", default_image_size=16)
    def _build(image_size: int, **kw: object) -> nn.Module:
        return Tiny()

    enc = create_encoder("test_tiny_conv")
    assert enc.image_size == 16 and enc.feature_dim == 8 and "test_tiny_conv" in list_encoders()
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 8)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("test_tiny_conv")(_build)


def test_build_kwargs_and_custom_stats_are_kept() -> None:
    enc = create_encoder("mocov3_vit_small", 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), depth=1)
    assert enc.backbone.blocks[0].attn.num_heads == 12 and len(enc.backbone.blocks) == 1
    assert enc.build_kwargs == {"depth": 1} and enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25)


def test_small_image_vits_see_an_8x8_token_grid_at_their_default_size() -> None:
    for arch, size, dim in (("vit_tiny_p4", 32, 192), ("vit_small_p4", 32, 384), ("vit_tiny_p8", 64, 192),
                            ("vit_small_p8", 64, 384)):
        enc = create_encoder(arch, depth=1)
        assert (default_image_size(arch), enc.image_size, enc.patch_size * 8, enc.feature_dim) == (size, size, size,
                                                                                                   dim)
    with pytest.raises(UsageError, match="not a multiple of the patch size"):
        create_encoder("vit_tiny_p8", 36, depth=1)


def test_a_small_image_vit_round_trips_through_safetensors(tmp_path) -> None:
    from poisonscan.models.checkpoints import load_encoder, save_encoder

    torch.manual_seed(0)
    enc = create_encoder("vit_tiny_p4", depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    loaded, _ = load_encoder(save_encoder(enc, tmp_path / "vit.safetensors"))
    assert (loaded.arch, loaded.image_size, loaded.patch_size) == ("vit_tiny_p4", 32, 4)
    assert torch.equal(loaded.eval()(x), enc(x))


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg"}, {"reg_tokens": 2, "no_embed_class": True}])
def test_a_vit_drops_tokens_and_keeping_all_changes_nothing(kw: dict) -> None:
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny_p4", depth=1, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    assert enc.token_grid == 8 and enc.drops_tokens
    with torch.no_grad():
        full = enc(x)
        torch.testing.assert_close(enc(x, torch.arange(64).expand(2, -1)), full)
        keep = torch.tensor([t for t in range(64) if t not in (9, 10, 17, 18)]).expand(2, -1)
        dropped = enc(x, keep)
        x2 = x.clone()
        x2[:, :, 4:12, 4:12] = 5.0                                   # what the dropped tokens showed is gone
        torch.testing.assert_close(enc(x2, keep), dropped)
    assert dropped.shape == full.shape and not torch.allclose(dropped, full)


def test_cnns_and_dynamic_size_vits_do_not_drop_tokens() -> None:
    cnn = create_encoder("resnet18", 32)
    assert cnn.token_grid is None and not cnn.drops_tokens
    with pytest.raises(ValueError, match="cannot drop tokens"):
        cnn(torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, dtype=torch.int64))
    assert not create_encoder("vit_tiny_p4", depth=1, dynamic_img_size=True).drops_tokens
