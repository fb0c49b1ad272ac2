"""The study runner: planning, cells and their configs, resume, reuse, --jobs, --dry-run, SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import check_cell_markers, tiny_overrides
from selftrain.config import ConfigError, apply_override
from selftrain.dryrun import dry_run, format_plan
from selftrain.study import METHODS, Cell, cell_config, cell_folder, finished, load_study, plan_cells, run_study

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "study" / "rethinking-fashion.yaml"


def _base(idx: dict[str, str], *extra: str) -> dict:
    base: dict = {}
    for override in [*tiny_overrides(idx), "teach.steps=6", "student.steps=6", "data.pool_limit=300", "engine.threads=1", *extra]:
        apply_override(base, override)
    return base


def _write_study(path: Path, base: dict, **grid) -> Path:
    spec = {"name": "tiny", "base": base, "probe": {"steps": 3, "pool": 128},
            "grid": {"init": ["random"], "augment": ["S1"], "label_fraction": [0.1],
                     "method": ["finetune", "self-training"], "seed": [0], **grid}}  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(path: Path, timing: bool = True) -> list[dict]:
    """The rows of a results.csv; without ``timing``, less the training seconds (a clock, not a result)."""
    with open(path, newline="") as fh:
        return [r if timing else {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def test_shipped_study_loads_and_plans_its_grid():
    study, base = load_study(SHIPPED)
    cells = plan_cells(study)
    # random and ssl:simclr init x (linear probe at 2 fractions + S1, S4 x 2 fractions x finetune, self-training) x 3 seeds,
    # and pretrain+self-training for ssl:simclr (from random weights it is self-training)
    assert len(cells) == 2 * (2 + 2 * 2 * 2) * 3 + 2 * 2 * 3 and len({c.id for c in cells}) == len(cells)
    assert set(METHODS) == {c.method for c in cells} and {c.seed for c in cells} == {0, 1, 2}
    assert {c.init for c in cells} == {"random", "ssl:simclr"} and {c.augment for c in cells} == {"none", "S1", "S4"}
    header = SHIPPED.read_text().split("\nname:")[0]
    assert "selftrain study configs/study/rethinking-fashion.yaml" in header and "min" in header
    cfg = cell_config(base, Cell("random", "S4", 0.1, "self-training", 1), Path("runs/x"))
    assert (cfg.seed, cfg.data.label_fraction, cfg.teach.augment, cfg.student.augment) == (1, 0.1, "S4", "S4")
    assert cfg.stages == ["teach", "label", "student", "transfer"]
    probe = cell_config(base, Cell("ssl:simclr", "none", 0.01, "linear-probe", 1), Path("runs/x"))
    assert probe.stages == ["transfer"] and probe.transfer.protocols == ["linear"] and probe.data.label_fraction == 0.01
    assert Path(probe.model.weights) == Path("runs/x").resolve() / "pretrain" / "ssl-simclr-seed1" / "pretrain" / "backbone.safetensors"
    assert [c.method for c in cells[:6]] == ["linear-probe"] * 6  # each init's probes first
    assert cell_config(base, cells[6], Path("runs/x")).stages == ["teach", "transfer"]


def test_overrides_split_between_study_and_base_and_errors_are_clear(tmp_path, small_idx):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    path = _write_study(tmp_path / "s.yaml", _base(small_idx), init=["random", "pretrained:w.safetensors"])
    study, base = load_study(path, ["grid.seed=[0, 1]", "student.steps=7", "base.teach.steps=5"])
    assert study.grid.seed == [0, 1] and base["student"]["steps"] == 7 and base["teach"]["steps"] == 5
    assert study.grid.init[1] == f"pretrained:{weights.resolve()}"  # relative to the study file
    methods = ["finetune", "self-training", "pretrain+self-training"]
    study, base = load_study(path, [f"grid.method={methods}"])
    cells = plan_cells(study)
    # pretrain+self-training from random weights is self-training: that grid point is left out
    assert [(c.init.split(":")[0], c.method) for c in cells] == [
        ("random", "finetune"), ("random", "self-training"),
        ("pretrained", "finetune"), ("pretrained", "self-training"), ("pretrained", "pretrain+self-training"),
    ]  # fmt: skip
    st, pst = (cell_config(base, c, tmp_path) for c in cells[3:])
    assert st.model.weights == str(weights.resolve()) and st.student.init == "random"  # student from random weights
    assert pst.model.weights == str(weights.resolve()) and pst.student.init == "scratch"  # student from the init
    with pytest.raises(ConfigError, match=r"grid\.augment"):
        load_study(path, ["grid.augment=[S9]"])
    with pytest.raises(ConfigError, match="unknown init"):
        load_study(path, ["grid.init=[imagenet]"])
    with pytest.raises(ConfigError, match=r"student\.stepz: unknown key"):
        cell_config(load_study(path, ["student.stepz=3"])[1], cells[0], tmp_path)


def test_pretraining_inits_pretrain_once_per_seed_and_label_their_rows(tmp_path, small_idx):
    extra = ("pretrain.steps=3", "pretrain.batch_size=16", "pretrain.probe=false", f"pretrain.data={small_idx['train']}")
    base = _base(small_idx, *extra)
    path = _write_study(tmp_path / "s.yaml", base, init=["random", "supervised"], method=["finetune"])
    study, base = load_study(path)
    out = tmp_path / "out"
    result = run_study(study, base, out)
    assert result["failed"] == []
    exported = list(out.glob("**/pretrain/backbone.safetensors"))
    assert len(exported) == 1  # one pretraining for (supervised, seed 0), outside the cells
    rows = [r for r in _rows(out / "results.csv") if r["metric"] == "top1"]
    assert sorted(r["init"] for r in rows) == ["random", "supervised"]
    cfg = yaml.safe_load((cell_folder(out, plan_cells(study)[1]) / "config.yaml").read_text())
    assert Path(cfg["model"]["weights"]).samefile(exported[0])


def test_linear_probe_cells_measure_each_init_and_the_report_states_the_ssl_margin(tmp_path, small_idx):
    import statistics

    extra = ("pretrain.steps=4", "pretrain.batch_size=16", "transfer.steps=60")
    path = _write_study(tmp_path / "s.yaml", _base(small_idx, *extra), init=["random", "ssl:simclr"],
                        method=["linear-probe"], seed=[0, 1])  # fmt: skip
    study, base = load_study(path)
    out = tmp_path / "out"
    result = run_study(study, base, out)
    cells = plan_cells(study)
    assert result["failed"] == [] and [c.id for c in cells] == [
        "random_none_f0.1_linear-probe_seed0", "random_none_f0.1_linear-probe_seed1",
        "ssl-simclr_none_f0.1_linear-probe_seed0", "ssl-simclr_none_f0.1_linear-probe_seed1",
    ]  # fmt: skip
    assert sorted(p.parent.parent.name for p in out.glob("pretrain/*/pretrain/backbone.safetensors")) == [
        "ssl-simclr-seed0", "ssl-simclr-seed1"]  # fmt: skip
    rows = _rows(out / "results.csv")
    assert {(r["method"], r["augment"], r["stage"], r["round"]) for r in rows} == {("linear-probe", "none", "transfer", "0")}
    top1 = {(r["init"], int(r["seed"])): float(r["value"]) for r in rows if r["metric"] == "linear.top1"}
    assert set(top1) == {(i, s) for i in ("random", "ssl:simclr") for s in (0, 1)}
    assert not list(out.glob("cells/*/teach"))  # nothing trains but the probe
    # The finding's margin is the paired gain over seeds, computed from results.csv.
    gains = [top1["ssl:simclr", s] - top1["random", s] for s in (0, 1)]
    found = {f["claim"]: f for f in _findings(out)}
    probe = found["Self-supervised pre-training raises linear-probe accuracy over random init."]
    mean, std = statistics.fmean(gains), statistics.stdev(gains)
    assert f"smallest margin {mean:+.2f} ± {std:.2f} (n=2 seeds, paired" in probe["summary"]
    assert probe["verdict"] == ("not supported" if mean <= 0 else "supported within noise" if mean <= std else "supported")
    assert "Rethinking table, linear-probe" in (out / "report.md").read_text()


def _findings(out: Path) -> list[dict]:
    from selftrain.report import build_report

    return build_report(out)["findings"]


def test_study_runs_cells_reuses_teachers_and_resumes_without_rerunning(tmp_path, small_idx):
    path = _write_study(tmp_path / "s.yaml", _base(small_idx))
    study, base = load_study(path)
    out = tmp_path / "out"
    result = run_study(study, base, out)
    cells = plan_cells(study)
    assert result["ran"] == [c.id for c in cells] and result["failed"] == []
    records = [finished(out, c) for c in cells]
    assert all(records)
    ft, st = (cell_folder(out, c) for c in cells)
    assert records[1]["reused"] == {"teach": ft.name}  # the self-training cell reused the finetune teacher
    assert os.path.samefile(ft / "teach" / "model.safetensors", st / "teach" / "model.safetensors")
    rows = _rows(out / "results.csv")
    # The shared teacher's rows are the same in both cells, and results.csv holds them once.
    teacher = [r for r in records[1]["rows"] if r["round"] == 0]
    assert teacher == records[0]["rows"] and len(rows) == len(records[1]["rows"]) == result["rows"]
    assert {(r["method"], r["round"]) for r in rows if r["metric"] == "top1"} == {("supervised", "0"), ("self-training", "1")}
    study_json = json.loads((out / "study.json").read_text())
    assert [c["id"] for c in study_json["cells"]] == [c.id for c in cells]
    html = (out / "report.html").read_text()
    assert "Rethinking table" in html and "Findings" in html
    for plot in ("accuracy", "pseudo_labels", "confidence", "curves"):  # every study plot has its inputs here
        assert (out / "plots" / f"{plot}.png").read_bytes().startswith(b"\x89PNG"), plot

    stamps = {c.id: (cell_folder(out, c) / "cell.json").stat().st_mtime_ns for c in cells}
    again = run_study(study, base, out)
    assert again["ran"] == [] and again["rows"] == len(rows) and _rows(out / "results.csv") == rows
    assert {c.id: (cell_folder(out, c) / "cell.json").stat().st_mtime_ns for c in cells} == stamps
    other, _ = load_study(path, ["grid.seed=[5]"])
    with pytest.raises(ValueError, match="different study"):
        run_study(other, base, out)


def test_pretrained_init_cells_share_the_teacher_and_its_pseudo_labels(tmp_path, small_idx):
    import torch

    from selftrain.backbones import build_backbone
    from selftrain.checkpoint import save_weights

    torch.manual_seed(0)
    save_weights(tmp_path / "backbone.safetensors", build_backbone("cnn-tiny", num_classes=10, in_chans=1).state_dict())
    methods = ["finetune", "self-training", "pretrain+self-training"]
    path = _write_study(tmp_path / "s.yaml", _base(small_idx), init=["pretrained:backbone.safetensors"], method=methods)
    study, base = load_study(path)
    out = tmp_path / "out"
    run_study(study, base, out)
    ft, st, pst = (finished(out, c) for c in plan_cells(study))
    assert st["reused"] == {"teach": ft["id"]} and pst["reused"] == {"teach": ft["id"], "label": st["id"]}
    top1 = {(r["method"], r["round"]): r for r in _rows(out / "results.csv") if r["metric"] == "top1"}
    assert set(top1) == {("supervised", "0"), ("self-training", "1"), ("pretrain+self-training", "1")}
    assert {r["init"] for r in top1.values()} == {"pretrained"}
    # pretrain+self-training's student starts from the weights file, self-training's from random weights
    assert yaml.safe_load((cell_folder(out, plan_cells(study)[2]) / "config.yaml").read_text())["student"]["init"] == "scratch"
    assert yaml.safe_load((cell_folder(out, plan_cells(study)[1]) / "config.yaml").read_text())["student"]["init"] == "random"


def test_dry_run_lists_every_cell_with_an_estimate_and_trains_nothing(tmp_path, small_idx):
    study, base = load_study(_write_study(tmp_path / "s.yaml", _base(small_idx), augment=["S1", "S4"]))
    out = tmp_path / "out"
    plan = dry_run(study, base, out)
    assert not out.exists()
    assert [r["id"] for r in plan["cells"]] == [c.id for c in plan_cells(study)]
    assert set(plan["probe"]) == {"S1", "S4"} and all(r["status"] == "to run" for r in plan["cells"])
    by_id = {r["id"]: r for r in plan["cells"]}
    for augment in ("S1", "S4"):
        finetune, selftrain = by_id[f"random_{augment}_f0.1_finetune_seed0"], by_id[f"random_{augment}_f0.1_self-training_seed0"]
        for clock, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):  # wall time as measured, and CPU time
            assert finetune[key] > 0 and selftrain[key] > 0
            probe = plan["probe"][augment][clock]  # the self-training cell reuses the teacher: student + labels only
            student_part = probe["student_step"] * 6 + probe["label_image"] * 300 + probe["transfer_model"]
            assert selftrain[key] - finetune[key] == pytest.approx(student_part - probe["teach_step"] * 6)
    assert plan["serial_seconds"] == pytest.approx(sum(r["seconds"] for r in plan["cells"]))
    text = format_plan(plan)
    assert "4 cells, 4 to run: estimated" in text and "random_S4_f0.1_self-training_seed0" in text
    assert plan["pretraining"] == [] and plan["wall_seconds"] == pytest.approx(plan["serial_seconds"])
    assert "CPU time:" in text and "CPU-seconds per wall second" in text


def test_dry_run_estimates_pretraining_and_linear_probes_too(tmp_path, small_idx):
    base = _base(small_idx, "pretrain.steps=50", "pretrain.batch_size=16")
    path = _write_study(tmp_path / "s.yaml", base, init=["random", "ssl:simclr"], method=["linear-probe", "finetune"], seed=[0, 1])
    study, base = load_study(path)
    plan = dry_run(study, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [(p["id"], p["steps"], p["status"]) for p in plan["pretraining"]] == [
        ("pretrain/ssl-simclr-seed0", 50, "to run"), ("pretrain/ssl-simclr-seed1", 50, "to run")]  # fmt: skip
    for clock, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):
        cost = plan["probe_pretrain"]["ssl:simclr"][clock]
        assert all(p[key] == pytest.approx(cost["setup"] + 50 * cost["step"]) and cost["step"] > 0 for p in plan["pretraining"])
        probe = plan["probe"]["none"][clock]
        for row in plan["cells"]:
            if row["method"] == "linear-probe":  # no training: opening the data and the probe
                assert row[key] == pytest.approx(probe["setup"] + probe["linear_probe"])
    # one job: the pretraining runs, then the cells, one after the other
    assert plan["wall_seconds"] == pytest.approx(plan["pretrain_seconds"] + plan["serial_seconds"])
    assert plan["cpu"]["total"] == pytest.approx(plan["cpu"]["pretrain"] + plan["cpu"]["cells"])
    text = format_plan(plan)
    assert "8 cells, 8 to run; 2 pretraining run(s), 2 to run: estimated" in text and "min of pretraining" in text
    assert re.search(r"\npretrain/ssl-simclr-seed1 +pretrain 50 ", text) and "linear probe" in text


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "selftrain", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)


def _assert_no_cell_process_survives(out: Path) -> None:
    """Child processes of a killed study die with it: none may keep writing into a cell."""
    deadline = time.time() + 10
    while True:
        alive = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"selftrain.study" in cmdline and str(out).encode() in cmdline:
                alive.append(proc.name)
        if not alive or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not alive, f"cell processes outlived the killed study: {alive}"


@pytest.mark.slow
def test_sigkilled_study_resumes_without_rerunning_finished_cells(tmp_path, small_idx):
    """Real subprocesses killed with SIGKILL at random points end with the uninterrupted rows."""
    path = _write_study(tmp_path / "s.yaml", _base(small_idx), seed=[0, 1])
    study, base = load_study(path)
    reference = tmp_path / "reference"
    run_study(study, base, reference)
    expected = _rows(reference / "results.csv", timing=False)

    out, rng = tmp_path / "killed", random.Random(0)
    cells = plan_cells(study)
    seen: dict[str, tuple[int, int]] = {}
    kills = 0
    for attempt in range(12):
        kill = attempt < 3  # three kills at random moments (the interpreter starts in ~3 s), then let it finish
        jobs = ["--jobs", "2"] if kill and attempt % 2 else []  # cells in this process, or in child processes
        proc = _launch(["study", str(path), "--out", str(out), *jobs], tmp_path / "study.log")
        try:
            proc.wait(timeout=rng.uniform(3.0, 8.0) if kill else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            _assert_no_cell_process_survives(out)
        check_cell_markers({c.id: cell_folder(out, c) for c in cells}, seen)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, (tmp_path / "study.log").read_text()[-3000:]
    assert len(seen) == len(cells) and kills >= 1
    assert _rows(out / "results.csv", timing=False) == expected


@pytest.mark.slow
def test_jobs_run_cells_in_child_processes_with_their_own_logs(tmp_path, small_idx):
    study, base = load_study(_write_study(tmp_path / "s.yaml", _base(small_idx), method=["finetune"], seed=[0, 1]))
    out = tmp_path / "out"
    start = time.time()
    result = run_study(study, base, out, jobs=2)
    assert result["failed"] == [] and len(result["ran"]) == 2
    for cell in plan_cells(study):
        folder = cell_folder(out, cell)
        assert finished(out, cell)["rows"] and "run " in (folder / "cell.log").read_text()
    reference = tmp_path / "reference"
    run_study(study, base, reference, jobs=1)
    assert _rows(out / "results.csv", timing=False) == _rows(reference / "results.csv", timing=False)
    assert time.time() - start < 120
