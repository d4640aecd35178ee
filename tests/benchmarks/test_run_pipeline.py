"""The end-to-end benchmark script's settings: presets, overrides for own data, the paper-scale recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import run_pipeline


def _args(**kw: object) -> argparse.Namespace:
    base = {"data": None, "val": None, "pair": None, "rate": None, "shared_data": None}
    return argparse.Namespace(**{**base, **kw})


def _shared(tmp_path: Path) -> Path:
    root = tmp_path / "shared"
    (root / "triggers").mkdir(parents=True)
    (root / "triggers" / "trigger_10.png").write_bytes(b"")
    return root


def test_recipe_of_the_cpu_configs_and_of_paper_scale() -> None:
    assert run_pipeline._recipe(run_pipeline.CONFIGS["cifar10"]) == {"arch": "resnet18", "image_size": 32}
    paper = {**run_pipeline.CONFIGS["imagenette-96"], **run_pipeline.PAPER_SCALE["pretrain"]}
    assert run_pipeline._recipe(paper) == {"arch": "vit_base_patch16_224", "image_size": 224, "method": "mocov3",
                                           "batch_size": 1024}
    vit = run_pipeline._recipe(run_pipeline.CONFIGS["cifar10-vit"])      # every PretrainConfig value it sets
    assert vit == {"arch": "vit_tiny_p4", "image_size": 32, "method": "mocov3", "batch_size": 128, "lr": 1e-3,
                   "weight_decay": 0.05, "warmup_epochs": 3, "proj_hidden": 1024}


def test_cifar10_cpu_budget_lowers_only_the_search_size() -> None:
    detect = run_pipeline.CONFIGS["cifar10"]["detect"]
    assert set(detect) == {"clusters", "flip_size"}
    assert "detect" not in run_pipeline.CONFIGS["imagenette-96"]      # paper defaults (capped at N / 50)


def test_preset_paths_resolve_against_the_shared_root(tmp_path: Path) -> None:
    root = _shared(tmp_path)
    values = run_pipeline._attack_values("cifar10", _args(shared_data=str(root)))
    assert values["data"] == str(root / "cifar10-wds/train-{000000..000009}.tar.gz")
    assert values["targets"] == [f"0={root / 'triggers/trigger_10.png'}"]
    assert values["rate"] == 0.5


def test_own_data_replaces_the_preset_paths(tmp_path: Path) -> None:
    root = _shared(tmp_path)
    values = run_pipeline._attack_values("imagenette-96", _args(shared_data=str(root), data="/in100/train",
                                                                 val="/in100/val"))
    assert (values["data"], values["val"]) == ("/in100/train", "/in100/val")
    assert values["targets"] == [f"6={root / 'triggers/trigger_10.png'}"]


def test_own_data_with_a_trigger_file_needs_no_shared_folder(tmp_path: Path) -> None:
    args = _args(shared_data=str(tmp_path / "absent"), data="/in100/train", val="/in100/val",
                 pair=f"n02869837={tmp_path / 't.png'}")
    values = run_pipeline._attack_values("imagenette-96", args)
    assert values["data"] == "/in100/train" and values["targets"] == [f"n02869837={tmp_path / 't.png'}"]
    assert values["trigger_size"] == pytest.approx(50 / 224)


def test_without_own_data_a_missing_shared_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="shared data folder"):
        run_pipeline._attack_values("cifar10", _args(shared_data=str(tmp_path / "absent")))


def test_rate_and_a_pair_by_file_name_override_the_preset(tmp_path: Path) -> None:
    root = _shared(tmp_path)
    values = run_pipeline._attack_values("cifar10", _args(shared_data=str(root), rate=1.0, pair="3=trigger_12.png"))
    assert values["rate"] == 1.0
    assert values["targets"] == [f"3={root / 'triggers' / 'trigger_12.png'}"]


def test_printed_table_has_z_and_effect(capsys: pytest.CaptureFixture[str]) -> None:
    row = {"removed": 0, "evidence": {"z": 1.34, "effect": 0.02}}
    old = {"removed": 5, "evidence": {"z": 3.6}}                  # a result written before ``effect``
    run_pipeline._print({"config": "cifar10", "epochs": 15, "seed": 0, "clean_control": True, "threat_model": None,
                         "detection": {"poisoncam": row, "patchsearch": old}, "probe": {}, "timings": {}})
    out = capsys.readouterr().out.splitlines()
    assert out[3].split()[-2:] == ["z", "effect"]
    assert out[4].split()[-2:] == ["1.3", "0.020"] and out[5].split()[-2:] == ["3.6", "nan"]


@pytest.mark.parametrize("in_bank, banks", [(500, ["clean.tsv"]), (3, ["clean.tsv", "original/train"])])
def test_retrain_measures_knn_on_the_original_data_when_cleaning_took_the_target_class(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], in_bank: int,
        banks: list[str]) -> None:
    from poisonscan import chain

    seen: list[str] = []

    def fake_backdoor(conf: object) -> dict:
        seen.append(conf.train)
        count = in_bank if conf.train == "clean.tsv" else 5000
        return {"knn": {"k": 20, "bank_target_count": count, "accuracy": 0.6, "asr": 0.0 if count < 20 else 0.1,
                        "target_rate_clean": 0.0}, "clusters": None,
                "warnings": ["few target images"] if count < 20 else []}

    pretrained: list[dict] = []
    monkeypatch.setattr(chain, "_pretrain", lambda spec, data, out, recipe: pretrained.append(recipe))
    spec = chain.ChainSpec(work=tmp_path, train="poisoned/train", val="val", trigger="t.png", target="0",
                           trigger_size=8.0, labelled_train="original/train", probe_fractions=(0.1,),
                           retrain_epochs=3, recipe={"arch": "resnet18", "epochs": 15, "store_cache": "c"})
    probe = {"acc_clean": 0.5, "acc_patched": 0.4, "targets": [{"asr": 0.1, "fp_rate_clean": 0.02}]}
    raw = chain._retrain(spec, "poisoncam", Path("clean.tsv"), fake_backdoor, lambda conf: probe)
    assert pretrained == [{"arch": "resnet18", "epochs": 3, "store_cache": str(tmp_path / "cache-poisoncam")}]
    row = run_pipeline._retrained_row(raw)
    assert seen == banks
    assert ("knn_original_bank" in row) == (len(banks) == 2)
    assert row["probe"] == {"0.1": {"acc_clean": 0.5, "acc_patched": 0.4, "asr": 0.1, "clean_rate": 0.02}}
    run_pipeline._print({"config": "cifar10", "epochs": 15, "seed": 0, "clean_control": False, "threat_model": None,
                         "detection": {"poisoncam": {"removed": 1, "retrained": row}}, "probe": {}, "timings": {}})
    out = capsys.readouterr().out
    assert ("(bank: the original data): k-NN acc 0.6, k-NN ASR 0.1" in out) == (len(banks) == 2)
    assert ("warning (retrained after poisoncam): few target images" in out) == (len(banks) == 2)


def test_probe_records_the_clean_rate_beside_the_asr(capsys: pytest.CaptureFixture[str]) -> None:
    report = {"acc_clean": 0.62, "acc_patched": 0.57,
              "targets": [{"target": 6, "fp_rate_clean": 0.0436, "asr": 0.0585}]}
    p = run_pipeline._brief(report)
    assert p == {"acc_clean": 0.62, "acc_patched": 0.57, "asr": 0.0585, "clean_rate": 0.0436}
    run_pipeline._print({"config": "imagenette-96", "epochs": 40, "seed": 1, "clean_control": False,
                         "threat_model": None, "detection": {}, "probe": {"no_defence@0.1": p}, "timings": {}})
    assert "ASR 0.0585 (clean rate 0.0436)" in capsys.readouterr().out
