"""detect's settings: sections owned by the stages, the preset files, ``configure``, and the scans they give.

The golden values below were written by the detect pipeline before its settings were split into sections (the flat
``DetectConfig`` of 0.1): the same scan under the sectioned settings must find the same top-k windows and remove the
same images.
"""

from __future__ import annotations

import csv
import json
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

from poisonscan.config import EXACT, DetectConfig, detect_config, preset_table, presets
from poisonscan.detect.pipeline import run_detect
from poisonscan.errors import ConfigError
from poisonscan.runtime import setup_runtime
from poisonscan.settings import (config_to_dict, configure, defaults_of, dotted_names, flat_defaults, parse_assignment,
                                 resolve_config, sections)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESETS = Path(__file__).resolve().parents[1] / "poisonscan" / "presets"

#: top-k (id, poison score, window) of the toy scans, as the flat-settings pipeline wrote them
GOLDEN_TOPK = {
    "poisoncam": [("c0/poison_002.png", 30, [16, 17, 9, 9]), ("c0/poison_003.png", 30, [13, 15, 9, 9]),
                  ("c0/poison_004.png", 30, [4, 12, 9, 9]), ("c0/poison_009.png", 30, [5, 17, 9, 9]),
                  ("c0/poison_010.png", 30, [8, 2, 9, 9])],
    "patchsearch": [("c0/poison_002.png", 30, [16, 16, 9, 9]), ("c0/poison_003.png", 30, [14, 14, 9, 9]),
                    ("c0/poison_004.png", 30, [2, 10, 9, 9]), ("c0/poison_018.png", 30, [2, 2, 9, 9]),
                    ("c0/img_031.png", 4, [0, 0, 9, 9])],
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    poisoned = make_poisoned_folder(root / "poisoned")
    return {"root": root, "poisoned": poisoned, "model": str(save_toy_checkpoint(root / "toy.safetensors"))}


def small(toy: dict, out: Path, preset: str | None = None, **kw: object) -> DetectConfig:
    """The toy scan's budget over ``preset``, settings by their own names."""
    base = dict(data=str(toy["root"] / "poisoned"), model=toy["model"], out=str(out), clusters=4, masks=64,
                flip_size=40, top_k=5, null_size=64, iterations=100, batch_size=128, device="cpu", precision="fp32")
    flags = dotted_names(DetectConfig, {**base, **kw})
    return detect_config(preset, None, flags)


def topk_rows(run: Path) -> list[tuple[str, int, list[int]]]:
    with open(run / "scores.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["top_k_rank"]]
    rows.sort(key=lambda r: int(r["top_k_rank"]))
    return [(r["id"], int(r["poison_score"]), [int(r[k]) for k in ("box_x", "box_y", "box_w", "box_h")])
            for r in rows]


# ------------------------------------------------------------------------------------------------ settings


def test_the_default_preset_file_is_the_dataclass_defaults() -> None:
    assert presets() == ["default", "paper", "patchsearch"]
    assert detect_config() == DetectConfig() == detect_config("default")
    table = tomllib.loads((PRESETS / "default.toml").read_text())["detect"]
    flat = {**{k: v for k, v in table.items() if not isinstance(v, dict)},
            **{f"{s}.{k}": v for s, sub in table.items() if isinstance(sub, dict) for k, v in sub.items()}}
    stage_settings = {k for k in flat_defaults(DetectConfig) if "." in k}
    assert stage_settings <= set(flat)                        # the file lists every stage setting ...
    for key, value in flat.items():                           # ... at its dataclass default
        assert flat_defaults(DetectConfig)[key] == pytest.approx(value) if isinstance(value, float) else \
            flat_defaults(DetectConfig)[key] == value, key


def test_a_saved_run_config_repeats_its_settings(tmp_path: Path) -> None:
    from poisonscan import __version__
    from poisonscan.runs import config_record

    scan = detect_config("paper", None, {"data": "d", "model": "m.safetensors", "clusters": 60, "search.masks": 12,
                                         "decision.min_effect": 0.1, "out": str(tmp_path / "scan")})
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"version": __version__, **config_record(scan)}))
    again = detect_config(None, saved, {"out": str(tmp_path / "rescan")})
    assert again.preset == "paper" and again.search == scan.search and again.decision == scan.decision
    assert again.clusters == 60 and again.model == str(Path("m.safetensors").resolve())
    assert again.out == str(tmp_path / "rescan")
    assert detect_config(None, saved).out is None                   # never the scanned run's own folder
    saved.write_text(json.dumps({"version": "0.0.1", **config_record(scan), "masks_per_image": 3}))
    with pytest.raises(ConfigError, match="unknown setting 'masks_per_image'"):
        detect_config(None, saved)


def test_only_a_flag_allows_a_pickle_to_run(tmp_path: Path) -> None:
    from poisonscan import __version__
    from poisonscan.config import EvalBackdoorConfig
    from poisonscan.runs import config_record

    path = tmp_path / "c.toml"
    path.write_text('[detect]\ntrust_checkpoint = true\n')
    with pytest.raises(ConfigError, match="only the --trust-checkpoint flag turns it on"):
        detect_config(None, path)
    with pytest.raises(ConfigError, match="only the --trust-checkpoint flag"):
        resolve_config(EvalBackdoorConfig, tables=[("e.json", {"trust_checkpoint": True})])
    path.write_text('[detect]\ntrust_checkpoint = false\n')
    assert detect_config(None, path).trust_checkpoint is False
    assert detect_config(None, None, {"trust_checkpoint": True}).trust_checkpoint is True   # the flag
    trusted = detect_config(None, None, {"data": "d", "model": "m.pth", "trust_checkpoint": True})
    assert "trust_checkpoint" not in config_record(trusted)                  # a saved run never carries it
    saved = tmp_path / "config.json"                                          # ... nor does an older one's count
    saved.write_text(json.dumps({"version": __version__, **config_record(trusted), "trust_checkpoint": True}))
    assert detect_config(None, saved).trust_checkpoint is False


@pytest.mark.parametrize(("command", "setting", "value"), [
    ("detect", "overwrite", True), ("detect", "resume", "runs/other"), ("pretrain", "overwrite", True),
    ("pretrain", "resume", "runs/other"), ("poison", "overwrite", True), ("clean", "keep_unreadable", True)])
def test_a_file_cannot_clear_reopen_or_pass_unscanned(tmp_path: Path, command: str, setting: str, value) -> None:
    from poisonscan.config import CleanConfig, PoisonConfig, PretrainConfig

    cls = {"detect": DetectConfig, "pretrain": PretrainConfig, "poison": PoisonConfig, "clean": CleanConfig}[command]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({command: {setting: value}}))
    with pytest.raises(ConfigError, match=f"only the --{setting.replace('_', '-')} flag turns it on"):
        resolve_config(cls, path)
    assert getattr(resolve_config(cls, None, {setting: value}), setting) == value          # the flag does


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path: Path) -> None:
    nested = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    nested += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]     # 10**10 strings, 1 kB
    path = tmp_path / "bomb.yaml"
    path.write_text(f"detect:\n  data: [{', '.join(nested)}]\n")
    with pytest.raises(ConfigError, match="setting 'data'") as info:
        detect_config(None, path)
    assert len(str(info.value)) < 200


def test_sections_are_owned_by_their_stages_and_names_are_unique() -> None:
    owners = {name: cls.__module__ for name, cls in sections(DetectConfig).items()}
    assert owners == {"search": "poisonscan.detect.search", "evidence": "poisonscan.detect.evidence",
                      "classifier": "poisonscan.detect.classifier", "decision": "poisonscan.detect.decision"}
    names = [f.name for cls in sections(DetectConfig).values() for f in fields(cls)]
    top = [f.name for f in fields(DetectConfig)]
    assert len(names) == len(set(names)) and not set(names) & set(top)      # a setting's own name is enough


def test_paper_and_patchsearch_presets() -> None:
    paper = detect_config("paper")
    assert paper.preset == "paper" and paper.search.score_rule == "changed" and paper.search.aggregate == "sum"
    assert (paper.classifier.ensemble, paper.classifier.rounds, paper.classifier.decoys) == (1, 1, 0.0)
    assert paper.classifier.positives == "all"
    assert (paper.decision.neighbours, paper.decision.verify_min_prob, paper.decision.match_picture) == (0, 1.0, False)
    assert paper.decision.force and paper.decision.threshold == 0.5
    ps = detect_config("patchsearch")
    assert (ps.search.method, ps.search.score_rule, ps.search.aggregate) == ("patchsearch", "to_source", "max")
    assert (ps.classifier.ensemble, ps.classifier.rounds, ps.classifier.decoys) == (5, 1, 0.0)
    for name in presets():                                     # every file holds only known settings
        where, table = preset_table(name)
        resolve_config(DetectConfig, tables=[(where, table)])
    with pytest.raises(ConfigError, match="choose one of default, paper, patchsearch"):
        preset_table("/etc/passwd")


def test_layers_flags_and_assignments(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[detect]\nclusters = 50\n[detect.search]\nmasks = 32\n[detect.decision]\nmin_effect = 0.1\n')
    cfg = detect_config("paper", path, {"search.masks": 16, "clusters": None})
    assert (cfg.clusters, cfg.search.masks, cfg.decision.min_effect) == (50, 16, 0.1)   # flags win, None is unset
    assert cfg.search.score_rule == "changed" and cfg.preset == "paper"                   # the rest from the preset
    path.write_text('[detect]\npreset = "paper"\nclusters = 50\n')                  # a file may name its preset
    named = detect_config(None, path)
    assert named.preset == "paper" and named.classifier.ensemble == 1 and named.clusters == 50
    assert detect_config("default", path).classifier.ensemble == 3                       # --preset wins
    path.write_text('[detect]\npreset = "../../etc/passwd"\n')
    with pytest.raises(ConfigError, match="choose one of default, paper, patchsearch"):
        detect_config(None, path)
    assert parse_assignment("decision.min_effect=0.1") == ("decision.min_effect", 0.1)
    assert parse_assignment("classifier.refine_by=p") == ("classifier.refine_by", "p")
    assert parse_assignment("decision.match_picture = false") == ("decision.match_picture", False)
    with pytest.raises(ConfigError, match="did you mean 'search.masks'"):
        resolve_config(DetectConfig, None, {"masks": 3})
    with pytest.raises(ConfigError, match="must be a table"):
        resolve_config(DetectConfig, tables=[("t", {"search": 3})])
    assert configure(DetectConfig, masks=8, min_effect=0.2).search.masks == 8
    saved = config_to_dict(cfg)
    assert resolve_config(DetectConfig, tables=[("config.json", saved)]) == cfg          # a run's record rebuilds it
    assert defaults_of(DetectConfig)["search"] == DetectConfig().search


# ------------------------------------------------------------------------------------------------ scans


@pytest.mark.parametrize("method", ["poisoncam", "patchsearch"])
def test_the_sectioned_settings_scan_as_the_flat_ones_did(toy: dict, tmp_path: Path, method: str) -> None:
    # the top-k and the picture match's removal do not depend on the classifier's training: one short round;
    # the exact procedure (all B masks, the whole flip set for every window), which the flat settings ran
    summary = run_detect(small(toy, tmp_path / method, method=method, ensemble=1, rounds=1, iterations=20,
                               masking="exact", flip_testing="exact", null_testing="exact"),
                         setup_runtime("cpu", "fp32"), quiet=True)
    assert topk_rows(tmp_path / method) == GOLDEN_TOPK[method]
    assert sorted((tmp_path / method / "removed.txt").read_text().split()) == sorted(toy["poisoned"])
    assert summary["counts"]["removed"] == 20


def test_the_fast_path_finds_the_same_top_k_and_removal(toy: dict, tmp_path: Path) -> None:
    # coarse-to-fine masking and the adaptive null (the defaults): the same images in the top-k, windows on
    # the same triggers (within a few pixels), the same removal
    run_detect(small(toy, tmp_path, ensemble=1, rounds=1, iterations=20, masks=256), setup_runtime("cpu", "fp32"),
               quiet=True)
    rows, golden = topk_rows(tmp_path), GOLDEN_TOPK["poisoncam"]
    assert sorted(r[0] for r in rows) == sorted(g[0] for g in golden)
    boxes = {g[0]: g[2] for g in golden}
    assert all(abs(r[2][0] - boxes[r[0]][0]) <= 3 and abs(r[2][1] - boxes[r[0]][1]) <= 3 for r in rows)
    assert sorted((tmp_path / "removed.txt").read_text().split()) == sorted(toy["poisoned"])
    search = json.loads((tmp_path / "search.json").read_text())
    assert search["masking"] == "coarse-to-fine" and search["flip_testing"] == "exact"


def test_the_paper_preset_trains_one_classifier_once_and_decides_on_p(toy: dict, tmp_path: Path) -> None:
    run = tmp_path / "paper"
    summary = run_detect(small(toy, run, "paper", iterations=40), setup_runtime("cpu", "fp32"), quiet=True)
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "paper" and config["classifier"]["decoys"] == 0.0
    info = json.loads((run / "classifier.json").read_text())
    assert info["trained"] and info["ensemble"] == 1 and len(info["iterations_per_model"]) == 1
    assert info["rounds"] == 1 and info["refine_by"] is None and info["refinement_dropped"] == []
    assert len(info["positives"]) == 5                                    # every top-k window, the recurring or not
    with open(run / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["neighbour_prob"] == "" and r["picture_match"] == "" and r["verify_flips"] == "" for r in rows)
    assert all(r["removal_score"] == r["classifier_prob"] for r in rows)
    assert all((r["removed"] == "1") == (float(r["classifier_prob"]) > 0.5) for r in rows)
    assert summary["picture_match"] is None and summary["search"]["n_scored"] > 0
    assert json.loads((run / "search.json").read_text())["rule"] == "changed"


def test_exact_is_the_papers_cost_and_the_presets_train_the_classifier_on_every_signal() -> None:
    exact = detect_config(None, None, dict(EXACT))
    assert (exact.search.masking, exact.search.flip_testing, exact.evidence.null_testing) == ("exact",) * 3
    assert exact.search.vit_masking == "zero" and exact.classifier.train == "always"
    assert detect_config().classifier.train == "unless-matched"
    assert detect_config("paper").classifier.train == detect_config("patchsearch").classifier.train == "always"
