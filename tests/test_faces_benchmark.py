"""The shipped face benchmark, scaled down, end to end: every face task, every stage it has, the FRL table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selftrain.faces import frl_tables, load_benchmark, run_benchmark
from selftrain.results import read_results

CONFIG = Path(__file__).parents[1] / "configs" / "faces" / "benchmark.yaml"


def test_benchmark_config_end_to_end_table_equals_results(tmp_path: Path) -> None:
    bench = load_benchmark(CONFIG, [
        "seeds=[0, 1]", "label_fractions=[0.5]", "shots=[2]", "inits=[random]", "protocols=[finetune, linear]",
        "self_training=[0.5]", "data.train=24", "data.test=20", "data.size=32", "base.teach.steps=4",
        "base.student.steps=4", "base.data.image_size=16",
    ])  # fmt: skip
    result = run_benchmark(bench, tmp_path)
    rows = read_results(tmp_path / "results.csv")
    assert {r.stage for r in rows} == {"faces"}
    tasks = {t.name for t in bench.tasks}
    for method in ("finetune", "linear"):
        assert {r.task for r in rows if r.method == method} == tasks  # every task, both protocols
    # Every task with pseudo labels went through teach -> label -> student -> transfer.
    assert {r.task for r in rows if r.method == "self-training"} == tasks - {"verification", "lfw-real"}
    assert (tmp_path / "cells" / "au_random_f0.5_self-training_seed0" / "label" / "round-1" / "manifest.json").exists()
    assert any(r.dataset.endswith("#2-shot") for r in rows)
    # The FRL table: each number is the mean of the results.csv values of its init, task, metric and split.
    tables = frl_tables(rows)
    assert {t["method"] for t in tables} == {"finetune", "linear", "self-training"}
    checked = 0
    for t in tables:
        for init, cells in t["rows"]:
            for (task, metric, split), cell in zip(t["columns"], cells):
                values = [r.value for r in rows if (r.method, r.init, r.task, r.metric) == (t["method"], init, task, metric)
                          and (split in r.dataset if split.endswith("shot") else "#" not in r.dataset and f"{100 * r.label_fraction:g}%" == split)]  # fmt: skip
                assert cell is not None and len(values) == 2
                assert cell[0] == pytest.approx(sum(values) / 2)
                checked += 1
    assert checked == len(tasks) * 2 * 2 + 5
    report = (tmp_path / "report.md").read_text()
    assert "## Face benchmark (FRL)" in report
    first = tables[0]
    mean = first["rows"][0][1][0][0]
    assert re.search(rf"\| {first['rows'][0][0]} \| {mean:.2f} ± ", report)
    # Resuming runs nothing again.
    assert run_benchmark(bench, tmp_path)["ran"] == [] and result["rows"] == len(rows)
