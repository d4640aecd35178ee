"""Saving encoders to safetensors and loading encoders from our files or from other code bases' checkpoints.

Our files are safetensors holding the backbone's timm state dict plus string metadata (``format:
poisonscan-encoder``, ``arch``, ``image_size``, ``feature_dim``, ``method``, extras JSON-encoded). Foreign
checkpoints (timm, torchvision, MoCo v3, SSL-Backdoor, solo-learn, PatchSearch) are ``.pth``/``.pt``/``.bin``/
``.ckpt`` files read with ``torch.load(weights_only=True)`` or ``.safetensors`` state dicts; their keys are matched
to the architecture by finding the key prefix (``module.base_encoder.``, ``encoder_q.``, ``backbone.``, ...) under
which most keys fit the model, preferring online over momentum encoders and dropping projection/prediction heads.
A checkpoint that does not fit is refused with the first offending keys: never a silent random init.

A file's content only selects among untrained encoders poisonscan can build: :func:`encoder_spec` checks the
metadata (a plain ``arch`` name, ``image_size``, ``mean``/``std`` and the :data:`BUILD_KWARGS` allow-list) before
anything is built, so no metadata makes timm fetch weights, read another file or contact a hub.

Its length is what loading trusts, kept in one file on purpose: every foreign layout it reads and every check
made before anything is built, so a security review reads one module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from poisonscan.errors import CheckpointError, UsageError
from poisonscan.models.encoders import Encoder, check_arch_name, create_encoder, default_image_size, is_known_arch
from poisonscan.runs import file_mode, temp_file

log = logging.getLogger(__name__)

FORMAT = "poisonscan-encoder"
MAX_MISSING = 2
MAX_UNEXPECTED = 8
_RESERVED = frozenset({"format", "arch", "image_size", "feature_dim", "mean", "std", "build_kwargs", "dtype",
                       "poisonscan_version"})
_REPORT_KEYS = frozenset({"path", "prefix", "missing_keys", "unexpected_keys", "dropped_keys", "ignored_keys",
                          "resized_keys", "checkpoint_fields"})
_PLAIN = frozenset({"format", "arch", "method", "dtype", "poisonscan_version"})
_CONTAINERS = ("state_dict", "model", "encoder", "backbone", "net", "network", "teacher", "student")
_HEADS = frozenset({"fc", "head", "heads", "projector", "predictor", "classifier", "prototypes"})
_WRAPPERS = ("module.", "_orig_mod.")
_MOMENTUM = re.compile(r"(^|\.)(momentum\w*|\w*_momentum|encoder_k|key_encoder|target\w*|teacher\w*|ema|\w*_ema|"
                       r"ema_\w*)\.")
_ONLINE = re.compile(r"(^|\.)(base_encoder|encoder_q|online\w*|student\w*)\.")
_ARCH_ALIASES = {"vit_small": "mocov3_vit_small", "vit_base": "vit_base_patch16_224"}
#: builder arguments a checkpoint may carry: name -> (type, lowest, highest); any other name is refused
BUILD_KWARGS: dict[str, tuple[type, float, float]] = {
    "depth": (int, 1, 64),              # transformer blocks
    "num_heads": (int, 1, 64),          # attention heads per block
    "drop_rate": (float, 0.0, 1.0),     # dropout (inactive in eval mode)
    "drop_path_rate": (float, 0.0, 1.0),
}
IMAGE_SIZES = (8, 4096)                 # the image_size a checkpoint's metadata may ask for
STAT_LIMIT = 1000.0                     # largest |mean| or std a checkpoint's metadata may ask for
MAX_KEY_CHARS = 1024                    # longest weight name matched (prefix search is quadratic in a name's length)
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


# --------------------------------------------------------------------------------------------------- saving

def _unwrap_module(model: nn.Module) -> nn.Module:
    """The Encoder inside DDP / torch.compile wrappers."""
    while not isinstance(model, Encoder):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a poisonscan Encoder, got {type(model).__name__}")
        model = inner
    return model


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose {', '.join(sorted(_DTYPES))})")
    return _DTYPES[dtype]


def _tensors_for_saving(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in state.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors sharing a storage
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_encoder(encoder: nn.Module, path: Path | str, *, dtype: torch.dtype | str | None = None,
                 **metadata: Any) -> Path:
    """Write ``encoder`` (its backbone's state dict) to a safetensors file, atomically.

    ``method`` (e.g. ``"mocov3"``) and any other keyword become metadata (JSON-encoded). ``dtype=torch.float16``
    stores floating tensors in half precision (loaded back as float32).
    """
    from poisonscan import __version__

    enc = _unwrap_module(encoder)
    clash = _RESERVED & metadata.keys()
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are set by save_encoder itself")
    try:
        check_build_kwargs(enc.build_kwargs, "save_encoder")
    except CheckpointError as exc:
        raise ValueError(f"{exc}: load_encoder would refuse the file") from None
    dt = _as_dtype(dtype)
    meta: dict[str, str] = {
        "format": FORMAT,
        "arch": enc.arch,
        "image_size": str(enc.image_size),
        "feature_dim": str(enc.feature_dim),
        "method": str(metadata.pop("method", None) or "unknown"),
        "mean": json.dumps(list(enc.mean)),
        "std": json.dumps(list(enc.std)),
        "build_kwargs": json.dumps(enc.build_kwargs, sort_keys=True),
        "dtype": str(dt or torch.float32).removeprefix("torch."),
        "poisonscan_version": __version__,
    }
    for key, value in metadata.items():
        meta[str(key)] = json.dumps(value, default=str)
    tensors = _tensors_for_saving(enc.backbone.state_dict(), dt)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path)
        os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, file_mode())      # safetensors writes a new 0600 file: the umask's mode, like every output
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------- reading

def _decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    """Our metadata strings back to values (ints for sizes, JSON for the rest; raw strings stay strings)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("image_size", "feature_dim"):
            try:
                out[key] = int(value)
            except ValueError:
                raise CheckpointError(f"checkpoint metadata {key}={value!r} is not an integer") from None
        elif key in _PLAIN:
            out[key] = value
        else:
            try:
                out[key] = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                out[key] = value
    return out


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` or ``"unknown"`` from the first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return "unknown"


def _check_path(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    return path


def read_encoder_metadata(path: Path | str) -> dict[str, Any] | None:
    """The decoded metadata of one of our encoder files (no weights read), or None for any other file."""
    path = _check_path(path)
    if _sniff(path) != "safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return _decode_metadata(raw) if raw.get("format") == FORMAT else None


def _pickle_refusal(path: Path, exc: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" (it holds a {found.group(1)} object)" if found else ""
    return CheckpointError(
        f"{path} needs pickle to load{what}. Unpickling can run arbitrary code named by the file, so a checkpoint "
        "from an untrusted source could take over this machine; poisonscan loads only plain tensors by default. "
        "If you trust where it came from, pass --trust-checkpoint (trust_pickle=True); otherwise re-save its weights "
        "as plain tensors in an isolated environment, e.g. torch.save(ckpt['state_dict'], 'weights.pth') or "
        "safetensors.torch.save_file(...), and load that file instead.")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as fh:
        zipped = fh.read(4) == b"PK\x03\x04"
    try:  # memory-map zip checkpoints: optimizer states of large models need not be read into memory
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=zipped)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise _pickle_refusal(path, exc) from None
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None


def read_checkpoint(path: Path | str, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flat ``{key: tensor}`` of a checkpoint file plus what it says about itself.

    The info dict holds ``kind`` (``"poisonscan"``, ``"safetensors"`` or ``"torch"``), the decoded metadata of our
    files, and JSON-safe top-level fields of torch checkpoints (``epoch``, ``arch``...).
    """
    path = _check_path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = fh.metadata() or {}
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from None
        if raw.get("format") == FORMAT:
            return tensors, {"kind": "poisonscan", "metadata": _decode_metadata(raw)}
        return tensors, {"kind": "safetensors", "metadata": dict(raw)}
    if trust_pickle:
        log.warning("loading %s with pickle (weights_only=False): only do this for checkpoints you trust", path)
    obj = _torch_load(path, trust_pickle)
    fields = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))} \
        if isinstance(obj, Mapping) else {}
    return extract_state_dict(obj, path), {"kind": "torch", "fields": fields}


def extract_state_dict(obj: Any, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a checkpoint object (``state_dict``/``model``/``encoder`` entries, modules)."""
    for _ in range(6):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{path} holds no tensors where weights were expected (top-level keys: {keys})")
    return tensors


# --------------------------------------------------------------------------------------------------- matching

def _strip_wrappers(key: str) -> str:
    """Drop leading DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) wrappers."""
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if key.startswith(w):
                key, changed = key[len(w):], True
    return key


def _prefix_rank(prefix: str, count: int) -> tuple[int, int, int, int]:
    """Sort key: more matching keys, then not a momentum encoder, then a known online encoder, then shorter."""
    return (count, 0 if _MOMENTUM.search(prefix) else 1, 1 if _ONLINE.search(prefix) else 0, -len(prefix))


def _choose_prefix(keys: list[str], model_keys: set[str]) -> tuple[str, int]:
    """The key prefix under which most checkpoint keys are model keys (online encoder preferred on ties)."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                prefix = ".".join(parts[:i]) + "." if i else ""
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    if not counts:
        return "", 0
    best = max(counts, key=lambda p: _prefix_rank(p, counts[p]))
    return best, counts[best]


def _resample_pos_embed(encoder: Encoder, posemb: torch.Tensor, target: torch.Size) -> torch.Tensor | None:
    """A ViT position embedding resampled to the encoder's patch grid (None when it cannot be)."""
    from timm.layers import resample_abs_pos_embed

    if encoder.kind != "vit" or posemb.ndim != 3 or posemb.shape[-1] != target[-1]:
        return None
    prefix = 0 if getattr(encoder.backbone, "no_embed_class", False) else encoder.num_prefix_tokens
    old = posemb.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if side * side != old:
        return None
    grid = list(encoder.backbone.patch_embed.grid_size)
    out = resample_abs_pos_embed(posemb.float(), new_size=grid, old_size=[side, side], num_prefix_tokens=prefix)
    return out.to(posemb.dtype) if tuple(out.shape) == tuple(target) else None


def _fmt_shape(t: torch.Tensor | torch.Size) -> str:
    return "x".join(map(str, tuple(t.shape if isinstance(t, torch.Tensor) else t))) or "scalar"


def match_state_dict(state: Mapping[str, torch.Tensor], encoder: Encoder, *, max_missing: int = MAX_MISSING,
                     max_unexpected: int = MAX_UNEXPECTED, source: str = "checkpoint") -> tuple[
                         dict[str, torch.Tensor], dict[str, Any]]:
    """Map checkpoint keys onto ``encoder.backbone``'s keys; raise CheckpointError when they do not fit.

    Returns the tensors to load and a report: ``prefix`` (stripped), ``missing_keys``, ``unexpected_keys``
    (backbone-like keys the model lacks), ``dropped_keys`` (heads), ``ignored_keys`` (outside the chosen prefix:
    momentum encoders, queues...), ``resized_keys``.
    """
    model_sd = encoder.backbone.state_dict()
    model_keys = set(model_sd)
    top_level = {k.split(".")[0] for k in model_keys}
    long = next((k for k in state if len(k) > MAX_KEY_CHARS), None)
    if long is not None:
        raise CheckpointError(f"{source} names a weight with {len(long)} characters (over {MAX_KEY_CHARS}): not a "
                              "model's state dict")
    keys = {_strip_wrappers(k): k for k in state}
    prefix, count = _choose_prefix(list(keys), model_keys)
    if count == 0:
        raise CheckpointError(
            f"no weights in {source} match {encoder.arch}: the checkpoint has keys like "
            f"{', '.join(list(keys)[:4])}; {encoder.arch} expects keys like {', '.join(list(model_sd)[:4])} "
            "(wrong --arch?)")
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dropped: list[str] = []
    ignored: list[str] = []
    resized: list[str] = []
    mismatched: list[str] = []
    for key, original in keys.items():
        if not key.startswith(prefix):
            ignored.append(original)
            continue
        rem = key[len(prefix):]
        head = rem.split(".")[0]
        tensor = state[original]
        if rem in model_keys:
            target = model_sd[rem].shape
            if tensor.shape != target and rem.endswith("pos_embed"):
                resampled = _resample_pos_embed(encoder, tensor, target)
                if resampled is not None:
                    tensor = resampled
                    resized.append(rem)
            if tensor.shape != target:
                mismatched.append(f"{rem} (checkpoint {_fmt_shape(tensor)} vs model {_fmt_shape(target)})")
            else:
                matched[rem] = tensor
        elif head in _HEADS:
            dropped.append(original)
        elif rem.endswith("num_batches_tracked"):
            continue
        elif head in top_level:
            unexpected.append(rem)
        else:
            ignored.append(original)
    if mismatched:
        raise CheckpointError(f"{source} does not match {encoder.arch} (shape mismatch): "
                              + "; ".join(mismatched[:5]) + (f"; and {len(mismatched) - 5} more"
                                                             if len(mismatched) > 5 else ""))
    missing = [k for k in model_sd if k not in matched and not k.endswith("num_batches_tracked")]
    if len(missing) > max_missing:
        raise CheckpointError(f"{source} does not match {encoder.arch}: {len(missing)} of its weights are missing, "
                              f"e.g. {', '.join(missing[:5])} (checkpoint prefix {prefix or '(none)'!r})")
    if len(unexpected) > max_unexpected:
        raise CheckpointError(f"{source} does not match {encoder.arch}: {len(unexpected)} weights the architecture "
                              f"lacks, e.g. {', '.join(unexpected[:5])} (a larger model?)")
    report = {"prefix": prefix, "missing_keys": missing, "unexpected_keys": unexpected, "dropped_keys": dropped,
              "ignored_keys": ignored, "resized_keys": resized}
    return matched, report


# --------------------------------------------------------------------------------------------------- loading

def _infer_vit_image_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """Input side implied by a ViT checkpoint's position embedding and patch projection."""
    pos = next((v for k, v in state.items() if k.endswith("pos_embed") and v.ndim == 3), None)
    proj = next((v for k, v in state.items() if k.endswith("patch_embed.proj.weight") and v.ndim == 4), None)
    if pos is None or proj is None:
        return None
    prefix = 1 if any(k.endswith("cls_token") for k in state) else 0
    reg = next((v for k, v in state.items() if k.endswith("reg_token")), None)
    prefix += int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0
    for n in (pos.shape[1] - prefix, pos.shape[1]):
        side = math.isqrt(max(int(n), 0))
        if side and side * side == n:
            return side * int(proj.shape[-1])
    return None


def _short(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_build_kwargs(kwargs: Any, source: str = "checkpoint") -> dict[str, int | float]:
    """``kwargs`` when every name is in :data:`BUILD_KWARGS` with a value of its type and range; else CheckpointError.

    Names timm loads weights or configs with (``pretrained``, ``pretrained_cfg_overlay``, ``checkpoint_path``,
    ``cache_dir``...) are never in the allow-list, and no allowed value is a string.
    """
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{source}: build_kwargs must be a JSON object, got {_short(kwargs)}")
    refused = sorted(str(k) for k in kwargs if k not in BUILD_KWARGS)
    if refused:
        names = ", ".join(_short(k) for k in refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6
                                                             else "")
        raise CheckpointError(f"{source}: build_kwargs {names} not allowed (a checkpoint may set only "
                              f"{', '.join(BUILD_KWARGS)}; its weights come from the file itself)")
    for key, value in kwargs.items():
        kind, lo, hi = BUILD_KWARGS[key]
        typed = type(value) is int if kind is int else (type(value) in (int, float) and math.isfinite(value))
        if not typed or not lo <= value <= hi:
            what = "an integer" if kind is int else "a number"
            raise CheckpointError(f"{source}: build_kwargs {key}={_short(value)} must be {what} in [{lo:g}, {hi:g}]")
    return dict(kwargs)


def _check_stats(value: Any, key: str, source: str) -> tuple[float, ...] | None:
    """Normalisation ``mean``/``std`` from metadata: None when absent, else 1 or 3 finite numbers (std > 0)."""
    if value is None:
        return None
    ok = (isinstance(value, list) and len(value) in (1, 3)
          and all(type(v) in (int, float) and math.isfinite(v) and abs(v) <= STAT_LIMIT for v in value)
          and (key == "mean" or all(v > 0 for v in value)))
    if not ok:
        need = "positive numbers" if key == "std" else "numbers"
        raise CheckpointError(f"{source}: metadata {key}={_short(value)} must be a list of 1 or 3 {need} "
                              f"up to {STAT_LIMIT:g}")
    return tuple(float(v) for v in value)


def encoder_spec(meta: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """``create_encoder`` arguments from our files' decoded metadata, each one checked; CheckpointError otherwise.

    Returns ``arch`` (a plain registry or timm name, never a hub repo or path), ``image_size`` (in
    :data:`IMAGE_SIZES`), ``mean``/``std`` (None for ImageNet's) and ``build_kwargs`` (:func:`check_build_kwargs`).
    """
    if "arch" not in meta or "image_size" not in meta:
        raise CheckpointError(f"{source}: poisonscan metadata lacks arch/image_size")
    try:
        arch = check_arch_name(meta["arch"])
    except UsageError as exc:
        raise CheckpointError(f"{source}: metadata {exc}") from None
    size = meta["image_size"]
    if type(size) is not int or not IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]:
        raise CheckpointError(f"{source}: metadata image_size={_short(size)} must be an integer in "
                              f"[{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}]")
    return {"arch": arch, "image_size": size, "mean": _check_stats(meta.get("mean"), "mean", source),
            "std": _check_stats(meta.get("std"), "std", source),
            "build_kwargs": check_build_kwargs(meta.get("build_kwargs", {}), source)}


def _arch_from_fields(fields: Mapping[str, Any]) -> str | None:
    name = fields.get("arch")
    if not isinstance(name, str):
        return None
    name = _ARCH_ALIASES.get(name, name)
    return name if is_known_arch(name) else None


def load_encoder(path: Path | str, arch: str | None = None, image_size: int | None = None,
                 trust_pickle: bool = False, device: str | torch.device = "cpu", *,
                 strict: bool = False) -> tuple[Encoder, dict[str, Any]]:
    """Load an encoder (in eval mode) from our safetensors file or a foreign checkpoint.

    Our files carry ``arch``/``image_size``: ``arch`` must then match, ``image_size`` may change the resolution
    (a ViT's position embedding is resampled). Foreign checkpoints need ``arch`` unless they name a known one
    themselves; ``image_size`` defaults to the one a ViT's position embedding implies, else the arch's usual size.
    ``strict`` refuses any missing or unexpected key. Returns the encoder and metadata including ``missing_keys``
    and ``unexpected_keys``.
    """
    path = _check_path(path)
    state, info = read_checkpoint(path, trust_pickle=trust_pickle)
    if info["kind"] == "poisonscan":
        meta = dict(info["metadata"])
        spec = encoder_spec(meta, str(path))   # the only way from file metadata to create_encoder
        if arch is not None and arch != spec["arch"]:
            raise CheckpointError(f"{path} holds a {spec['arch']} encoder, not {arch} (drop --arch or fix it)")
        size = int(image_size or spec["image_size"])
        try:
            encoder = create_encoder(spec["arch"], size, mean=spec["mean"], std=spec["std"], init_weights=False,
                                     **spec["build_kwargs"])
        except UsageError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        matched, report = match_state_dict(state, encoder, max_missing=0, max_unexpected=0, source=str(path))
        if report["ignored_keys"] or report["dropped_keys"]:
            raise CheckpointError(f"{path}: unexpected keys {(report['ignored_keys'] + report['dropped_keys'])[:5]}")
        if "feature_dim" in meta and meta["feature_dim"] != encoder.feature_dim:
            raise CheckpointError(f"{path}: metadata feature_dim {meta['feature_dim']} but {meta['arch']} "
                                  f"gives {encoder.feature_dim}")
        meta["image_size"] = encoder.image_size
    else:
        fields = info.get("fields", {})
        arch = arch or _arch_from_fields(fields)
        if arch is None:
            raise CheckpointError(f"{path} is a plain state dict: say which architecture it is (--arch, e.g. "
                                  "resnet18, cifar_resnet18, vit_small_patch16_224)")
        inferred = None if image_size else _infer_vit_image_size(state)
        if inferred is not None and not IMAGE_SIZES[0] <= inferred <= IMAGE_SIZES[1]:
            raise CheckpointError(f"{path}: its position embedding implies {inferred} px images, outside "
                                  f"[{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}]; give --image-size if it is right")
        size = int(image_size or inferred or default_image_size(arch))
        encoder = create_encoder(arch, size, init_weights=False)
        matched, report = match_state_dict(state, encoder, source=str(path),
                                           max_missing=0 if strict else MAX_MISSING,
                                           max_unexpected=0 if strict else MAX_UNEXPECTED)
        meta = {"format": info["kind"], "arch": arch, "image_size": encoder.image_size,
                "feature_dim": encoder.feature_dim, "method": str(fields.get("method", "unknown")),
                "checkpoint_fields": fields}
    if report["missing_keys"]:
        log.warning("%s: %d weights missing from the checkpoint keep their random init: %s", path,
                    len(report["missing_keys"]), ", ".join(report["missing_keys"][:5]))
    if report["unexpected_keys"]:
        log.warning("%s: %d checkpoint weights not used by %s: %s", path, len(report["unexpected_keys"]),
                    encoder.arch, ", ".join(report["unexpected_keys"][:5]))
    if report["missing_keys"]:  # the fast build left weights uninitialised: rebuild with a proper random init
        encoder = create_encoder(encoder.arch, encoder.image_size, mean=encoder.mean, std=encoder.std,
                                 **encoder.build_kwargs)
    encoder.backbone.load_state_dict(matched, strict=False)  # missing keys were checked and reported above
    meta.update(path=str(path), prefix=report["prefix"], missing_keys=report["missing_keys"],
                unexpected_keys=report["unexpected_keys"], dropped_keys=len(report["dropped_keys"]),
                ignored_keys=len(report["ignored_keys"]), resized_keys=report["resized_keys"])
    return encoder.to(device).eval(), meta


def convert_checkpoint(src: Path | str, dst: Path | str, arch: str | None = None, image_size: int | None = None,
                       trust_pickle: bool = False, dtype: torch.dtype | str | None = None,
                       **metadata: Any) -> dict[str, Any]:
    """Load any supported checkpoint and write it as our safetensors file; returns the load metadata."""
    encoder, meta = load_encoder(src, arch=arch, image_size=image_size, trust_pickle=trust_pickle)
    extras = {k: v for k, v in meta.items() if k not in _RESERVED | _REPORT_KEYS}
    extras.update(source_checkpoint=Path(src).name, source_format=meta.get("format"), **metadata)
    save_encoder(encoder, dst, dtype=dtype, **extras)
    return meta
