"""``poisonscan demo``: plant poisons, find them and show it, on the bundled data (README's main job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from poisonscan.cli.common import err_console, handle_errors, overrides
from poisonscan.cli.helptext import default, described
from poisonscan.config import DemoConfig, DetectConfig
from poisonscan.settings import resolve_config
from poisonscan.demo import DEMO_RECIPE, DEMO_TARGET, DEMO_TRIGGER
from poisonscan.report.summary import print_json


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def print_demo_summary(s: dict[str, Any]) -> None:
    """What a newcomer wants to see, as one table."""
    tm, det, ev = s["threat_model"], s["detection"], s.get("evidence") or {}
    t = Table(title="poisonscan demo", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("poisons planted", f"{s['planted']} of {s['n_samples']} training images")
    flips = tm.get("oracle_flips") or {}
    t.add_row("threat model", f"{tm['origin']}")
    t.add_row("  backdoor strength", f"k-NN acc {_pct(tm['knn_accuracy'])}, k-NN ASR {_pct(tm['knn_asr'])} "
              f"(clean: {_pct(tm['knn_target_rate_clean'])}), poison-cluster purity "
              f"{_pct(tm.get('poison_cluster_purity'))}, "
              f"oracle flips {flips.get('changed', '-')}/{flips.get('flip_set', '-')}")
    found = "backdoor found" if ev.get("backdoor_found") else "NO backdoor signal"
    t.add_row("backdoor evidence", f"{found}: z = {ev.get('z', float('nan')):.1f}, p = {ev.get('p_value', 1):.3g}, "
              f"effect {_pct(ev.get('effect'))} (top-k vs random windows), "
              f"best candidate {_pct(ev.get('best_flip_share'))}")
    t.add_row("poisons found", f"{det['poisons_found']} of {s['planted']} (recall {_pct(det['recall'])})")
    t.add_row("clean images removed", f"{det['clean_removed']} (precision {_pct(det['precision'])}, "
              f"{det['removed']} removed in all)")
    t.add_row("poison-score AUROC", "-" if det["auroc_poison_score"] is None else f"{det['auroc_poison_score']:.3f}")
    t.add_row("top-20 triggers correct", _pct(det["top20_trigger_accuracy"]))
    b = s["probe_before"] or {}
    t.add_row("ACC / ASR before cleaning", f"ACC {_pct(b.get('acc_clean'))} clean, {_pct(b.get('acc_patched'))} "
              f"patched; ASR {_pct(b.get('asr'))}")
    a = s.get("probe_after")
    t.add_row("ACC / ASR after cleaning", f"ACC {_pct(a.get('acc_clean'))} clean, {_pct(a.get('acc_patched'))} "
              f"patched; ASR {_pct(a.get('asr'))}" if a else
              "not measured: retraining the SSL model does not fit the demo's time budget "
              "(add --retrain-epochs N)")
    t.add_row("report", s["files"]["report"])
    t.add_row("gallery", s["files"]["gallery"])
    t.add_row("cleaned manifest", s["files"]["manifest"])
    rt = s.get("runtime") or {}
    where = f" on {rt['device']}, {rt['precision']}" if rt.get("precision") else ""
    t.add_row("time", f"{sum(s['timings'].values()):.0f} s{where} (" +
              ", ".join(f"{k} {v:.0f}s" for k, v in s["timings"].items()) + ")")
    err_console.print(t)


@handle_errors
def demo(
    data: str | None = typer.Option(None, "--data", help="Your own labelled training set (needs --pretrain)."),
    val: str | None = typer.Option(None, "--val", help="Its labelled validation set."),
    trigger: Path | None = typer.Option(None, "--trigger", help="Trigger image "
                                                                f"{described(f'bundled HTBA {DEMO_TRIGGER.name}')}."),
    target: str | None = typer.Option(None, "--target", help="Target class name or index "
                                                             f"{described(f'{DEMO_TARGET} = airplane')}."),
    out: Path | None = typer.Option(None, "--out", "-o", help=f"Run folder {described('runs/demo/runN')}."),
    pretrain: bool | None = typer.Option(None, "--pretrain/--bundled-model",
                                         help="Train the threat model here instead of using the bundled one "
                                              f"{default(DemoConfig, 'pretrain')}."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Pretraining epochs with --pretrain "
                                                                  f"{described(str(DEMO_RECIPE['epochs']))}."),
    retrain_epochs: int | None = typer.Option(None, "--retrain-epochs", min=0,
                                              help="Retrain on the cleaned set and probe again; 0 skips "
                                                   f"{default(DemoConfig, 'retrain_epochs')}."),
    limit: int | None = typer.Option(None, "--limit", min=100, help="Reduced budget: use an evenly spaced subset "
                                                                     "of this many training images "
                                                                     f"{described('all')}."),
    masks: int | None = typer.Option(None, "--masks", min=1, help="Reduced budget: masks per image "
                                                                f"{default(DetectConfig, 'search.masks')}."),
    classifier_iters: int | None = typer.Option(None, "--classifier-iters", min=1,
                                                help="Reduced budget: poison-classifier iterations "
                                                     f"{default(DetectConfig, 'classifier.iterations')}."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N "
                                                            f"{default(DemoConfig, 'device')}."),
    seed: int | None = typer.Option(None, "--seed", help=f"Random seed {default(DemoConfig, 'seed')}."),
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON file of settings."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Plant poisons in a bundled CIFAR-10 subset, find them with PoisonCAM, clean, and report."""
    from poisonscan.demo import run_demo

    cfg = resolve_config(DemoConfig, config, overrides(
        data=data, val=val, trigger=str(trigger) if trigger else None, target=target,
        out=str(out) if out else None, pretrain=pretrain, epochs=epochs, retrain_epochs=retrain_epochs,
        limit=limit, masks=masks, classifier_iters=classifier_iters, device=device, seed=seed))
    summary = run_demo(cfg, quiet=quiet or json_out)
    if json_out:
        print_json(summary)
    else:
        print_demo_summary(summary)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``poisonscan`` app."""
    app.command("demo")(demo)
