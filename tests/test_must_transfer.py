"""The MuST transfer benchmark (selftrain.must.benchmark) and its report table (selftrain.must.benchmark_report).

Tiny scenes and a few steps: plumbing and bookkeeping, not accuracy."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import ConfigError, build_config, dump_config, load_config
from selftrain.must import benchmark
from selftrain.must.benchmark import expand_inits, plan_cells
from selftrain.must.benchmark_report import STAGE
from selftrain.must.pipeline import run_must
from selftrain.report import build_report, format_table
from selftrain.results import ResultRow, ResultsTable, read_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "must" / "demo.yaml"
runner = CliRunner()

TINY = [
    "data.unlabeled=scenes:train?n=12&seed=3", "model.backbone=cnn-tiny", "teach.steps=2", "teach.batch_size=4",
    "label.shard_size=6", "label.batch_size=6", "engine.progress=false", "engine.threads=1", "engine.checkpoint_every=2",
    "engine.eval_batch_size=500", "must.student.steps=4", "must.student.batch_size=4",
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.hidden_dim=16", "pretrain.projection_dim=8",
    "must.teachers.0.task=classification", "must.teachers.0.data=scenes:train?n=12&seed=4", "must.teachers.0.test=scenes:test?n=8",
    "must.teachers.1.task=segmentation", "must.teachers.1.data=scenes:train?n=12&seed=1",
    "must.transfer.seeds=[0]", "must.transfer.inits=[random, supervised, self-training, must, 'ssl:simclr']",
    "must.transfer.downstream.0.name=mnist-linear", "must.transfer.downstream.0.task=classification",
    "must.transfer.downstream.0.protocol=linear", "must.transfer.downstream.0.data=mnist:train",
    "must.transfer.downstream.0.test=mnist:test", "must.transfer.downstream.0.label_fraction=0.01",
    "must.transfer.downstream.0.steps=5",
    "must.transfer.downstream.1.task=depth", "must.transfer.downstream.1.data=scenes:train?n=12&seed=9",
    "must.transfer.downstream.1.test=scenes:test?n=8", "must.transfer.downstream.1.label_fraction=0.5",
    "must.transfer.downstream.1.steps=2", "must.transfer.downstream.1.batch_size=4",
]  # fmt: skip
INITS = {"random", "supervised", "self-training:classification", "self-training:segmentation", "must", "ssl:simclr"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A whole MuST run with the benchmark: 2 teachers, 6 inits x 2 downstream tasks x 1 seed."""
    cfg = build_config({}, TINY)
    out = tmp_path_factory.mktemp("bench") / "run"
    run_must(cfg, out)
    return cfg, out


def bench_rows(out: Path) -> list[ResultRow]:
    return [r for r in read_results(out / "results.csv") if r.stage == STAGE]


def copy_run(out: Path, to: Path) -> Path:
    shutil.copytree(out, to)
    return to


# --------------------------------------------------------------------------- rows and backbones


def test_every_init_row_is_labeled_in_results_csv_as_its_cell_says(bench):
    cfg, out = bench
    rows = bench_rows(out)
    assert {r.init for r in rows} == INITS
    assert {(r.method, r.task, r.dataset) for r in rows} == {("linear", "classification", "mnist:test"),
                                                            ("finetune", "depth", "scenes:test?n=8")}  # fmt: skip
    cells = plan_cells(cfg)
    assert len(cells) == 12 and len({c.id for c in cells}) == 12
    from_cells = []
    for cell in cells:
        record = json.loads((benchmark.cell_folder(benchmark.RunFolder(out), cell) / "cell.json").read_text())
        assert all(r["init"] == cell.init and r["seed"] == cell.seed for r in record["rows"])
        from_cells += [ResultRow(**r) for r in record["rows"]]
    assert sorted(r.identity for r in rows) == sorted(r.identity for r in from_cells)
    assert {r.metric for r in rows if r.task == "depth"} >= {"absrel", "rmse"}
    # the MuST stage's own rows (teachers and heads on the teachers' test sets) are still there
    assert any(r.stage == "must" and r.init == "must" for r in read_results(out / "results.csv"))


def test_each_row_starts_from_its_own_backbone(bench):
    cfg, out = bench
    run = benchmark.RunFolder(out)
    weights = {c.init: json.loads((benchmark.cell_folder(run, c) / "cell.json").read_text())["weights"] for c in plan_cells(cfg)}
    root = out / "must"
    assert weights["random"] is None
    assert Path(weights["must"]) == root / "student" / "backbone.safetensors"
    assert Path(weights["supervised"]) == root / "benchmark" / "backbones" / "supervised" / "backbone.safetensors"
    assert Path(weights["ssl:simclr"]) == root / "benchmark" / "backbones" / "ssl-simclr" / "pretrain" / "backbone.safetensors"
    for key in ("classification", "segmentation"):
        folder = root / "benchmark" / "backbones" / f"self-training-{key}"
        assert Path(weights[f"self-training:{key}"]) == folder / "backbone.safetensors"
        done = json.loads((folder / "done.json").read_text())
        assert set(done["records"]) == {key} and done["steps"] == cfg.must.student.steps  # one head, same steps
    must = load_file(root / "student" / "backbone.safetensors")
    single = load_file(root / "benchmark" / "backbones" / "self-training-segmentation" / "backbone.safetensors")
    assert must.keys() == single.keys() and any((must[k].float() - single[k].float()).abs().max() > 0 for k in must)
    # the supervised init is the classification teacher's backbone without its classifier
    supervised = load_file(root / "benchmark" / "backbones" / "supervised" / "backbone.safetensors")
    teacher = load_file(root / "teach" / "classification" / "teach" / "model.safetensors")
    assert supervised and not any(k.startswith(("fc.", "classifier.")) for k in supervised)
    assert all((supervised[k] == teacher[f"backbone.{k}"]).all() for k in supervised)


# --------------------------------------------------------------------------- resume


def test_a_killed_benchmark_resumes_without_rerunning_a_finished_cell(bench, tmp_path, monkeypatch):
    cfg, out = bench
    out = copy_run(out, tmp_path / "run")
    run = benchmark.RunFolder(out)
    cells = plan_cells(cfg)
    lost = cells[-3:]  # as if the benchmark was killed before these three started (the copy's paths differ)
    for cell in lost:
        shutil.rmtree(benchmark.cell_folder(run, cell))
    kept = {c.id: (benchmark.cell_folder(run, c) / "cell.json").read_bytes() for c in cells[:-3]}
    before = sorted(r.identity for r in bench_rows(out))

    ran, real = [], benchmark.run_cell

    def dies_on_second(cfg_, run_, runtime, cell, weights):
        if ran:
            raise KeyboardInterrupt  # killed while the second cell runs
        ran.append(cell.id)
        return real(cfg_, run_, runtime, cell, weights)

    monkeypatch.setattr(benchmark, "run_cell", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_must(cfg, out, stages=["transfer"])
    assert ran == [lost[0].id]

    built = []

    def records(cfg_, run_, runtime, cell, weights):
        built.append(cell.id)
        return real(cfg_, run_, runtime, cell, weights)

    monkeypatch.setattr(benchmark, "run_cell", records)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    result = runner.invoke(app, ["must-transfer", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert built == [c.id for c in lost[1:]]  # only the two unfinished cells ran
    assert {c.id: (benchmark.cell_folder(run, c) / "cell.json").read_bytes() for c in cells[:-3]} == kept
    assert sorted(r.identity for r in bench_rows(out)) == before
    built.clear()
    run_must(cfg, out, stages=["transfer"])
    assert built == []  # everything finished: nothing runs again


# --------------------------------------------------------------------------- the report


def test_the_tables_numbers_are_the_results_csv_ones(bench, tmp_path):
    _, out = bench
    out = copy_run(out, tmp_path / "run")
    summary = build_report(out)
    (grid,) = summary["must_transfer"]
    rows = bench_rows(out)
    headline = {"classification": "top1", "depth": "absrel"}
    checked = 0
    for row in grid.rows:
        init = row[0].text
        for header, cell in zip(grid.header[1:], row[1:]):
            task = header.split()[0]
            values = [r.value for r in rows if r.init == init and r.task == task and r.metric == headline[task]]
            assert float(cell.attrs["data-mean"]) == pytest.approx(statistics.fmean(values))
            assert int(cell.attrs["data-n"]) == len(values)
            checked += 1
    assert checked == len(INITS) * 2 and [r[0].text for r in grid.rows][0] == "random"
    depth = [r for r in rows if r.task == "depth" and r.metric == "absrel"]
    best = min(depth, key=lambda r: r.value)
    column = grid.header.index(next(h for h in grid.header if h.startswith("depth")))
    assert next(row for row in grid.rows if row[0].text == best.init)[column].bold  # lower is better for absrel
    md = (out / "report.md").read_text()
    assert "## MuST transfer" in md and "absrel ↓" in md
    k, n = summary["must_verdict"]["matched"], summary["must_verdict"]["compared"]
    assert n == 2 and f"MuST matches or beats every single-task student on {k} of 2 downstream tasks." in md
    assert "<h2>MuST transfer</h2>" in (out / "report.html").read_text()
    assert format_table(summary).startswith(grid.caption)  # `selftrain report` prints it first


def _row(init, task, dataset, metric, value, seed, method="finetune"):
    return ResultRow(STAGE, method, init, "S1", task, dataset, 0.1, seed, 0, metric, value, 1.0)


def test_verdict_on_a_hand_made_results_csv_counts_the_tasks_must_wins(tmp_path):
    # per column: {init: (seed-0 value, seed-1 value)}
    table = {
        ("classification", "mnist:test", "top1"): {"random": (50, 52), "self-training:a": (60, 62), "self-training:b": (58, 60), "must": (64, 66)},
        ("detection", "scenes:test", "ap"): {"random": (5, 6), "self-training:a": (10, 12), "self-training:b": (11, 13), "must": (11, 12)},
        ("depth", "scenes:test", "absrel"): {"random": (0.5, 0.6), "self-training:a": (0.30, 0.32), "self-training:b": (0.35, 0.36), "must": (0.28, 0.29)},
        ("keypoints", "scenes:test", "nme"): {"random": (20, 21), "self-training:a": (10, 10.5), "self-training:b": (14, 15), "must": (13, 13.5)},
    }  # fmt: skip
    rows = [_row(init, task, ds, metric, v, seed) for (task, ds, metric), inits in table.items()
            for init, values in inits.items() for seed, v in enumerate(values)]  # fmt: skip
    rows.append(_row("must", "keypoints", "scenes:test", "pck", 99.0, 0))  # not the headline metric: ignored
    ResultsTable(tmp_path / "results.csv").add(rows)
    summary = build_report(tmp_path)
    verdict = summary["must_verdict"]
    assert (verdict["matched"], verdict["compared"]) == (3, 4)
    md = (tmp_path / "report.md").read_text()
    assert "MuST matches or beats every single-task student on 3 of 4 downstream tasks." in md
    assert "short of" not in md and "meets the bar" in md
    assert "keypoints 10% finetune: nme ↓" in md and "finetune on" not in md  # headers name a test set only when needed
    # detection: 11.5 vs 12.0 with seed stds 0.71 and 1.41 -> matched within the spread; keypoints: 13.25 vs 10.25 -> trails
    assert re.search(r"detection.*matches every|detection.*matches or beats", md)
    assert "matches self-training:b 12.00 ± 1.41 (within the seed spread)" in md
    assert "trails self-training:a 10.25 ± 0.35 by 3" in md
    (grid,) = summary["must_transfer"]
    bold = {grid.header[j]: row[0].text for row in grid.rows for j, c in enumerate(row) if c.bold}
    assert bold == {"classification 10% finetune: top1 ↑": "must", "detection 10% finetune: ap ↑": "self-training:b",
                    "depth 10% finetune: absrel ↓": "must", "keypoints 10% finetune: nme ↓": "self-training:a"}  # fmt: skip
    assert [r[0].text for r in grid.rows] == ["random", "self-training:a", "self-training:b", "must"]
    assert "| **65.00 ± 1.41** (n=2) |" in md.replace("  ", " ")


def test_verdict_says_so_when_must_falls_short_or_is_not_compared(tmp_path):
    rows = [_row(i, "depth", "scenes:test", "absrel", v, s) for i, vs in
            {"self-training:a": (0.3, 0.3), "must": (0.5, 0.5)}.items() for s, v in enumerate(vs)]  # fmt: skip
    rows += [_row("random", "classification", "mnist:test", "top1", 50, 0)]
    ResultsTable(tmp_path / "results.csv").add(rows)
    summary = build_report(tmp_path)
    assert (summary["must_verdict"]["matched"], summary["must_verdict"]["compared"]) == (0, 1)
    md = (tmp_path / "report.md").read_text()
    assert "on 0 of 1 downstream tasks" in md and "short of the paper's claim" in md
    assert "not compared (no must row)" in md


# --------------------------------------------------------------------------- config


def test_the_shipped_demo_config_loads_and_plans_the_paper_table():
    cfg = load_config(DEMO)
    teachers = cfg.must.teachers
    assert [t.task for t in teachers] == ["classification", "detection", "segmentation", "depth"]
    assert teachers[0].data.startswith("fashion-mnist:") and cfg.data.unlabeled.startswith("scenes:")
    t = cfg.must.transfer
    assert len(t.downstream) == 4 and len(t.seeds) == 2
    teacher_data = {x.data for x in teachers} | {x.test for x in teachers} | {cfg.data.unlabeled}
    assert not {d.data for d in t.downstream} & teacher_data  # held out from every teacher and the pool
    inits = expand_inits(cfg)
    assert inits[:2] == ["random", "supervised"] and "must" in inits and any(i.startswith("ssl:") for i in inits)
    assert [i for i in inits if i.startswith("self-training:")] == [f"self-training:{x.key}" for x in teachers]
    assert len(plan_cells(cfg)) == len(inits) * 4 * 2
    assert benchmark.supervised_teacher(cfg).key == "classification"


def test_the_demo_headers_smoke_recipe_is_a_valid_set_of_overrides():
    header = DEMO.read_text().split("\nname:")[0]
    line = next(x for x in header.splitlines() if "selftrain must" in x and "--set" in x)
    words = shlex.split(line.lstrip("# ").replace("\\", ""))
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_config(DEMO, sets)
    assert len(sets) >= 5 and cfg.must.student.steps < load_config(DEMO).must.student.steps
    assert len(plan_cells(cfg)) < len(plan_cells(load_config(DEMO)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("must.transfer.inits=[random, 'self-training:nope']", "must.transfer: no teacher named nope"),
        ("must.transfer.inits=[imagenet]", "unknown init 'imagenet'"),
        ("must.transfer.downstream.0.protocol=linear", "linear probing is for classification"),
        ("must.transfer.supervised=nope", "no teacher named nope"),
    ],
)
def test_benchmark_config_errors_name_the_key(override, message):
    base = ["must.teachers.0.task=segmentation", "must.teachers.0.data=scenes:train?n=12",
            "must.transfer.downstream.0.task=depth", "must.transfer.downstream.0.data=scenes:train?n=12&seed=2",
            "must.transfer.downstream.0.test=scenes:test?n=8"]  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({}, [*base, override])


def test_must_transfer_without_downstream_tasks_is_a_clear_error(tmp_path):
    cfg = build_config({}, ["must.teachers.0.task=segmentation", "must.teachers.0.data=scenes:train?n=12"])
    with pytest.raises(ConfigError, match="must.transfer.downstream: no downstream task"):
        run_must(cfg, tmp_path / "run", stages=["transfer"])


def test_columns_with_the_same_task_fraction_and_protocol_name_their_test_sets(tmp_path):
    rows = [_row(i, "classification", ds, "top1", v, 0) for ds in ("mnist:test", "fashion-mnist:test")
            for i, v in (("self-training:a", 50.0), ("must", 60.0))]  # fmt: skip
    ResultsTable(tmp_path / "results.csv").add(rows)
    (grid,) = build_report(tmp_path)["must_transfer"]
    assert grid.header[1:] == ["classification 10% finetune on mnist:test: top1 ↑", "classification 10% finetune on fashion-mnist:test: top1 ↑"]
    assert [c.bold for c in grid.rows[1][1:]] == [True, True]


def test_a_dense_teachers_backbone_exported_for_the_supervised_row_loads_into_any_task(bench, tmp_path):
    from selftrain.backbones import build_backbone, build_feature_backbone
    from selftrain.network import load_network

    _, out = bench
    teacher = out / "must" / "teach" / "segmentation" / "teach" / "model.safetensors"
    path = benchmark.export_backbone(teacher, tmp_path / "backbone.safetensors")
    state = load_file(path)
    dense = build_feature_backbone("cnn-tiny", in_chans=1, weights=str(path))
    assert all((dense.state_dict()[k] == v).all() for k, v in state.items())
    assert all((load_network(teacher).backbone.state_dict()[k] == v).all() for k, v in state.items())
    classifier = build_backbone("cnn-tiny", num_classes=10, in_chans=1, weights=str(path))
    assert all((classifier.state_dict()[k] == v).all() for k, v in state.items())


def test_a_benchmark_that_cannot_run_fails_before_anything_trains(tmp_path):
    teacher = ["must.teachers.0.task=segmentation", "must.teachers.0.name=bright", "must.teachers.0.spec=callable:_must_teachers:bright_mask",
               "must.teachers.0.classes=[a, b, c, d, e, f, g, h, i, j, k]", "data.unlabeled=scenes:train?n=12&seed=3"]  # fmt: skip
    downstream = ["must.transfer.downstream.0.task=depth", "must.transfer.downstream.0.data=scenes:train?n=12&seed=2",
                  "must.transfer.downstream.0.test=scenes:test?n=8", "must.transfer.inits=[random, supervised]"]  # fmt: skip
    cfg = build_config({}, [*teacher, *downstream])
    with pytest.raises(ConfigError, match="supervised needs a teacher with selftrain weights"):
        run_must(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cells_run_in_parallel_processes_give_the_rows_of_a_serial_run(bench, tmp_path):
    cfg, out = bench
    out = copy_run(out, tmp_path / "run")
    run = benchmark.RunFolder(out)
    cells = plan_cells(cfg)
    lost = [c for c in cells if c.init == "must"]
    for cell in lost:
        shutil.rmtree(benchmark.cell_folder(run, cell))
    before = {r.identity: r.value for r in bench_rows(out)}
    parallel = build_config(cfg.model_dump(mode="json"), ["must.transfer.jobs=2"])
    (out / "config.yaml").write_text(dump_config(parallel))
    run_must(parallel, out, stages=["transfer"])
    assert all((benchmark.cell_folder(run, c) / "cell.log").exists() for c in lost)  # each ran in a child
    assert {r.identity: r.value for r in bench_rows(out)} == before  # one thread each: the same numbers
