"""Precision choice of ``setup_runtime``: bf16 on CPU only where the hardware has it."""

from __future__ import annotations

import pytest
import torch

from poisonscan import runtime as rt
from poisonscan.errors import UsageError


def _cpu_caps(monkeypatch: pytest.MonkeyPatch, *, bf16: bool, amx: bool = False, amx_fp16: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16, raising=False)


@pytest.mark.parametrize(("bf16", "amx", "expected"), [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                       (False, False, None)])
def test_auto_on_cpu_uses_bf16_only_when_native(monkeypatch, bf16, amx, expected):
    _cpu_caps(monkeypatch, bf16=bf16, amx=amx)
    assert rt.cpu_has_native_bf16() is (expected is not None)
    r = rt.setup_runtime("cpu", "auto")
    assert r.amp_dtype is expected
    assert r.describe()["amp_dtype"] == ("bfloat16" if expected else None)
    assert r.describe()["precision"] == ("bfloat16" if expected else "float32")
    assert r.describe()["cpu_native_bf16"] is (expected is not None)      # recorded in every run's environment


def test_explicit_bf16_on_emulating_cpu_is_kept_with_a_warning(monkeypatch, capsys):
    _cpu_caps(monkeypatch, bf16=False)
    assert rt.setup_runtime("cpu", "bf16").amp_dtype is torch.bfloat16
    err = capsys.readouterr().err
    assert "emulated" in err and "fp32" in err


def test_explicit_choices_on_native_cpu_are_silent(monkeypatch, capsys):
    _cpu_caps(monkeypatch, bf16=True, amx_fp16=True)
    assert rt.setup_runtime("cpu", "bf16").amp_dtype is torch.bfloat16
    assert rt.setup_runtime("cpu", "fp16").amp_dtype is torch.float16
    assert rt.setup_runtime("cpu", "fp32").amp_dtype is None
    assert capsys.readouterr().err == ""


def test_fp16_warns_without_amx(monkeypatch, capsys):
    _cpu_caps(monkeypatch, bf16=True, amx=False, amx_fp16=False)      # AVX-512 BF16 but no fp16 units
    assert rt.setup_runtime("cpu", "fp16").amp_dtype is torch.float16
    assert "emulated" in capsys.readouterr().err
    _cpu_caps(monkeypatch, bf16=True, amx=True, amx_fp16=False)       # AMX CPUs have AVX512-FP16
    assert rt.setup_runtime("cpu", "fp16").amp_dtype is torch.float16
    assert capsys.readouterr().err == ""


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="choose auto"):
        rt.setup_runtime("cpu", "fp8")


def test_autocast_is_a_no_op_in_fp32(monkeypatch):
    _cpu_caps(monkeypatch, bf16=False)
    r = rt.setup_runtime("cpu", "auto")
    with r.autocast():
        y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    assert y.dtype is torch.float32


def test_synchronize_is_a_no_op_on_cpu():
    rt.synchronize(torch.device("cpu"))


def test_cuda_device_choice_per_rank(monkeypatch):
    """``cuda`` is each rank's own GPU; ``cuda:N`` names one GPU, refused for several processes (NCCL would stop
    on duplicate GPUs); ``auto`` on CUDA picks bf16 only where the GPU computes it natively."""
    from poisonscan.runtime import _pick_device, _pick_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _pick_device("cuda", 3, world=4) == torch.device("cuda:3")
    assert _pick_device("auto", 2, world=4) == torch.device("cuda:2")
    assert _pick_device("cuda:1", 0, world=1) == torch.device("cuda:1")
    with pytest.raises(UsageError, match="under torchrun use --device cuda"):
        _pick_device("cuda:1", 0, world=2)
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert _pick_precision("auto", cuda) == torch.float16            # only emulated: fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert _pick_precision("auto", cuda) == torch.bfloat16
