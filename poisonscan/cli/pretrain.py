"""``poisonscan pretrain``: self-supervised pretraining (SimCLR, MoCo v3) of a threat-model encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from poisonscan.cli.common import emit_json, err_console, handle_errors, overrides
from poisonscan.cli.helptext import default, described, required
from poisonscan.config import PretrainConfig
from poisonscan.settings import resolve_config
from poisonscan.runtime import setup_runtime


def _print(summary: dict[str, Any]) -> None:
    ips = summary.get("images_per_s")
    loss = summary.get("final_loss")
    lines = [
        f"pretrained {summary['method']} {summary['arch']} at {summary['image_size']} px on {summary['images']} images"
        + (f" ({summary['skipped']} unreadable, skipped)" if summary.get("skipped") else "")
        + (f", {summary['device']} {summary['precision']}" if summary.get("device") else ""),
        f"epochs {summary['epochs']}  steps {summary['steps']}  final loss "
        + (f"{loss:.4f}" if loss is not None else "-")
        + f"  time {summary['time_s']:.0f} s" + (f"  {ips:.0f} img/s" if ips else ""),
    ]
    if summary.get("knn_acc") is not None:
        lines.append(f"k-NN accuracy {summary['knn_acc']:.3f}")
    lines.append(f"encoder: {summary['encoder']}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    for line in lines:
        err_console.print(line, markup=False, highlight=False)


@handle_errors
def pretrain(
    data: str | None = typer.Option(None, "--data", help="Training images: folder, file list / manifest, or "
                                                         "WebDataset shards (brace pattern or folder) "
                                                         f"{required('--resume')}."),
    method: str | None = typer.Option(None, "--method",
                                      help=f"simclr or mocov3 {default(PretrainConfig, 'method')}."),
    arch: str | None = typer.Option(None, "--arch", help="Encoder: any timm name or cifar_resnet18 "
                                                         f"{default(PretrainConfig, 'arch')}."),
    image_size: int | None = typer.Option(None, "--image-size", min=8, help="Training resolution in px "
                                                                          f"{default(PretrainConfig, 'image_size')}."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help=f"Epochs {default(PretrainConfig, 'epochs')}."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Global batch size "
                                                                      f"{default(PretrainConfig, 'batch_size')}."),
    lr: float | None = typer.Option(None, "--lr", help="Base learning rate at batch 256, scaled by batch/256 "
                                                       f"{described('sgd 0.5, lars 0.3, adamw 1.5e-4')}."),
    weight_decay: float | None = typer.Option(None, "--weight-decay",
                                              help=f"Weight decay {described('sgd 5e-4, lars 1e-6, adamw 0.1')}."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="auto (adamw for ViTs, else sgd), sgd, lars or "
                                                                   f"adamw {default(PretrainConfig, 'optimizer')}."),
    temperature: float | None = typer.Option(None, "--temperature",
                                             help=f"Contrastive temperature {default(PretrainConfig, 'temperature')}."),
    proj_hidden: int | None = typer.Option(None, "--proj-hidden", min=1,
                                           help="Projector/predictor hidden width "
                                                f"{described('simclr 2048, mocov3 4096')}."),
    proj_dim: int | None = typer.Option(None, "--proj-dim", min=1, help="Projection width "
                                                                         f"{described('simclr 128, mocov3 256')}."),
    warmup_epochs: float | None = typer.Option(None, "--warmup-epochs",
                                               help="Linear warm-up epochs "
                                                    f"{default(PretrainConfig, 'warmup_epochs')}."),
    grad_clip: float | None = typer.Option(None, "--grad-clip", help="Clip the gradient norm "
                                                                      f"{described('off')}."),
    num_workers: int | None = typer.Option(None, "--num-workers", min=0,
                                           help=f"Decoding workers {default(PretrainConfig, 'num_workers')}."),
    store_cache: Path | None = typer.Option(None, "--store-cache", help="Folder caching the decoded images "
                                                                        "(reused by later runs)."),
    knn_val: str | None = typer.Option(None, "--knn-val", help="Labelled val source for a k-NN monitor."),
    knn_every: int | None = typer.Option(None, "--knn-every", min=0,
                                         help="k-NN monitor every N epochs "
                                              f"{default(PretrainConfig, 'knn_every', 'off')}."),
    backdoor_trigger: Path | None = typer.Option(None, "--backdoor-trigger", help="With --knn-val: also log the "
                                                 "k-NN ASR of this trigger every --knn-every epochs (monitor.png)."),
    backdoor_target: str | None = typer.Option(None, "--backdoor-target", help="The attack's target class."),
    backdoor_trigger_size: float | None = typer.Option(None, "--backdoor-trigger-size",
                                                       help="Trigger side: pixels or fraction "
                                                            f"{default(PretrainConfig, 'backdoor_trigger_size')}."),
    save_fp16: bool | None = typer.Option(None, "--save-fp16/--save-fp32",
                                          help="Store encoder weights in fp16 "
                                               f"{default(PretrainConfig, 'save_fp16')}."),
    keep_every: int | None = typer.Option(None, min=0, help="Also keep encoder-eNNN.safetensors every N epochs "
                                          f"{default(PretrainConfig, 'keep_every', 'only the last')}."),
    out: Path | None = typer.Option(None, "--out", help=f"Run folder {described('runs/pretrain/runN')}."),
    seed: int | None = typer.Option(None, "--seed", help=f"Random seed {default(PretrainConfig, 'seed')}."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N "
                                                            f"{default(PretrainConfig, 'device')}."),
    precision: str | None = typer.Option(None, "--precision", help="auto, bf16, fp16 or fp32 "
                                                                  f"{default(PretrainConfig, 'precision')}."),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="Write into a non-empty --out folder."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue a pretrain run folder from its last epoch."),
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON file of settings."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool | None = typer.Option(None, "--quiet", "-q", help="No progress bar or epoch lines."),
) -> None:
    """Pretrain an encoder with SimCLR or MoCo v3 (CPU, one GPU, or torchrun)."""
    from poisonscan.ssl.trainer import resume_config, run_pretrain

    flags = overrides(
        data=data, method=method, arch=arch, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, optimizer=optimizer, temperature=temperature, proj_hidden=proj_hidden,
        proj_dim=proj_dim, warmup_epochs=warmup_epochs,
        grad_clip=grad_clip, num_workers=num_workers, store_cache=str(store_cache) if store_cache else None,
        knn_val=knn_val, knn_every=knn_every, backdoor_trigger=str(backdoor_trigger) if backdoor_trigger else None,
        backdoor_target=backdoor_target, backdoor_trigger_size=backdoor_trigger_size, save_fp16=save_fp16,
        keep_every=keep_every, out=str(out) if out else None, seed=seed,
        device=device, precision=precision, quiet=quiet, overwrite=overwrite)
    if resume is not None:
        cfg = resume_config(resume, flags)
    else:
        cfg = resolve_config(PretrainConfig, config, flags)
    runtime = setup_runtime(cfg.device, cfg.precision)
    summary = run_pretrain(cfg, runtime=runtime)
    if not runtime.is_main:
        return
    if json_out:
        emit_json(summary)
    else:
        _print(summary)


def register(app: typer.Typer) -> None:
    """Add ``pretrain`` to the ``poisonscan`` app."""
    app.command("pretrain")(pretrain)
