"""``poisonscan clean`` through Typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from poisonscan import __version__
from poisonscan.cli import app
from poisonscan.config import DetectConfig
from poisonscan.runs import config_record
from poisonscan.settings import configure
from poisonscan.data.sources import open_source

runner = CliRunner()


def _run_dir(tmp_path: Path, data: str, removed: list[str], scanned: list[str] | None = None,
             unreadable: list[str] = ()) -> Path:
    """A finished detect run's files: config, removal list, scores (every sample of ``data`` unless ``scanned``)
    and errors."""
    run = tmp_path / "runs" / "detect" / "run1"
    run.mkdir(parents=True)
    config = config_record(configure(DetectConfig, data=data, model="encoder.safetensors"))
    (run / "config.json").write_text(json.dumps({"version": __version__, **config}))
    (run / "removed.txt").write_text("".join(f"{i}\n" for i in removed))
    ids = open_source(data).ids if scanned is None else scanned
    (run / "scores.csv").write_text("index,id,removed\n" + "".join(f"{k},{i},{int(i in removed)}\n"
                                                                    for k, i in enumerate(ids)))
    (run / "errors.csv").write_text("id,reason\n" + "".join(f"{i},cannot decode\n" for i in unreadable))
    (run / "stages").mkdir()
    (run / "stages" / "outputs.done").write_text("{}")
    return run


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_clean_folder_run(image_folder: Path, tmp_path: Path) -> None:
    before = _snapshot(image_folder)
    run = _run_dir(tmp_path, str(image_folder), ["dog/dog_1.jpg", "cat/cat_0.png"])
    out = tmp_path / "clean.txt"
    res = runner.invoke(app, ["clean", "--run", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "removed 2, kept 4, unknown ids in removal list 0" in res.stdout
    kept = open_source(out)
    assert [Path(p).name for p in kept.ids] == ["cat_1.png", "cat_2.png", "dog_0.jpg", "dog_2.jpg"]
    assert kept.labels == [0, 0, 1, 1]
    assert _snapshot(image_folder) == before


def test_clean_wds_json_reshard_and_unknown_ids(wds_shards_gz: Path, tmp_path: Path) -> None:
    run = _run_dir(tmp_path, str(wds_shards_gz / "train-{000000..000001}.tar.gz"),
                   ["train-000001.tar.gz::s0005", "not-a-sample::x"])
    out, rs = tmp_path / "clean.tsv", tmp_path / "shards"
    res = runner.invoke(app, ["clean", "--run", str(run), "--out", str(out), "--reshard", str(rs),
                              "--shard-size", "3", "--compress", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["removed"], summary["kept"], summary["unknown"]) == (1, 7, 1)
    assert summary["manifest_format"] == "wds-manifest" and summary["reshard"]["written"] == 7
    assert "not in the source" in res.stderr
    kept = open_source(out)
    assert len(kept) == 7 and "train-000001.tar.gz::s0005" not in kept.ids
    assert len(open_source(rs)) == 7 and len(summary["reshard"]["shards"]) == 3
    assert all(p.endswith(".tar.gz") for p in summary["reshard"]["shards"])


def test_clean_strict_unknown_ids_exits_2_and_writes_nothing(file_list: Path, tmp_path: Path) -> None:
    removed = tmp_path / "removed.txt"
    removed.write_text("images/img_0.png\nghost.png\n")
    out = tmp_path / "clean.txt"
    res = runner.invoke(app, ["clean", "--source", str(file_list), "--removed", str(removed), "--out", str(out),
                              "--strict"])
    assert res.exit_code == 2 and not out.exists()
    res = runner.invoke(app, ["clean", "--source", str(file_list), "--removed", str(removed), "--out", str(out)])
    assert res.exit_code == 0 and "unknown ids in removal list 1" in res.stdout
    assert open_source(out).labels == [1, 2, 0, 1, 2]


def test_clean_usage_errors(file_list: Path, tmp_path: Path) -> None:
    removed = tmp_path / "removed.txt"
    removed.write_text("images/img_0.png\n")
    cases = [
        ["--run", str(tmp_path / "absent"), "--out", str(tmp_path / "o.txt")],
        ["--source", str(file_list), "--removed", str(removed), "--out", str(file_list)],  # would overwrite input
        ["--source", str(tmp_path / "nothing"), "--removed", str(removed), "--out", str(tmp_path / "o.txt")],
        ["--source", str(file_list), "--out", str(tmp_path / "o.txt")],  # no removal list
        ["--source", str(file_list), "--removed", str(removed)],  # no --out
    ]
    original = file_list.read_bytes()
    for args in cases:
        res = runner.invoke(app, ["clean", *args])
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert file_list.read_bytes() == original


def test_clean_never_writes_over_or_into_the_input(file_list: Path, image_folder: Path, tmp_path: Path) -> None:
    removed = tmp_path / "removed.txt"
    removed.write_text("images/img_0.png\n")
    image = file_list.parent / "images" / "img_1.png"                # a listed image, not the list itself
    before = image.read_bytes()
    res = runner.invoke(app, ["clean", "--source", str(file_list), "--removed", str(removed), "--out", str(image)])
    assert res.exit_code == 2 and "is an input file" in res.stderr and image.read_bytes() == before
    res = runner.invoke(app, ["clean", "--source", str(image_folder), "--removed", str(removed),
                              "--out", str(image_folder / "cat" / "clean.txt")])
    assert res.exit_code == 2 and "inside the input folder" in res.stderr
    assert not (image_folder / "cat" / "clean.txt").exists()
    res = runner.invoke(app, ["clean", "--source", str(file_list), "--removed", str(removed),
                              "--out", str(file_list.parent / "clean.txt")])   # beside a list is fine
    assert res.exit_code == 0, res.output


def test_clean_leaves_unscanned_samples_out_unless_kept(corrupt_folder: Path, tmp_path: Path) -> None:
    """A sample the run could not read (errors.csv), or never saw, is not passed on as clean."""
    ids = open_source(corrupt_folder).ids
    good = sorted(i for i in ids if "good" in i)
    bad = sorted(i for i in ids if "good" not in i)
    assert len(good) == 3 and len(bad) >= 2
    run = _run_dir(tmp_path, str(corrupt_folder), [good[0]], scanned=good, unreadable=bad[1:])  # bad[0]: never seen
    out = tmp_path / "clean.txt"
    res = runner.invoke(app, ["clean", "--run", str(run), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["kept"] == 2 and summary["removed"] == 1
    assert sorted(summary["unscanned"].pop("examples")) == bad
    assert summary["unscanned"] == {"checked": True, "unreadable": len(bad) - 1, "not_scanned": 1, "kept": False}
    assert sorted(Path(p).name for p in open_source(out).ids) == [Path(g).name for g in good[1:]]
    assert f"{len(bad)} sample(s) were not scanned" in res.stderr and "left out" in res.stderr

    res = runner.invoke(app, ["clean", "--run", str(run), "--out", str(out), "--keep-unreadable"])
    assert res.exit_code == 0, res.output
    assert len(open_source(out).ids) == len(ids) - 1 and "are kept (--keep-unreadable)" in res.stderr


def test_clean_refuses_an_unfinished_run(image_folder: Path, tmp_path: Path) -> None:
    run = _run_dir(tmp_path, str(image_folder), [])
    (run / "stages" / "outputs.done").unlink()          # e.g. a resumed run whose settings changed, still running
    res = runner.invoke(app, ["clean", "--run", str(run), "--out", str(tmp_path / "c.txt")])
    assert res.exit_code == 2 and "did not finish" in res.stderr
    assert not (tmp_path / "c.txt").exists()


def test_clean_leaves_out_a_key_that_is_both_scanned_and_an_error(wds_shards: Path, tmp_path: Path) -> None:
    """A repeated WebDataset key: one copy was scanned, but which one a loader reads is not known."""
    data = str(wds_shards / "train-{000000..000001}.tar")
    run = _run_dir(tmp_path, data, [], unreadable=["train-000000.tar::s0001"])
    res = runner.invoke(app, ["clean", "--run", str(run), "--out", str(tmp_path / "c.tsv"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept"] == 7 and "s0001" not in (tmp_path / "c.tsv").read_text()


def test_clean_without_run_says_coverage_is_unchecked(file_list: Path, tmp_path: Path) -> None:
    removed = tmp_path / "removed.txt"
    removed.write_text("images/img_0.png\n")
    res = runner.invoke(app, ["clean", "--source", str(file_list), "--removed", str(removed), "--out",
                              str(tmp_path / "c.txt")])
    assert res.exit_code == 0 and "which samples were scanned is not known" in res.stderr
