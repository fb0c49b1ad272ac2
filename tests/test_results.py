"""The tidy results table: merge semantics, atomic rewrite, reading, summaries."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import numpy as np
import pytest

from selftrain.results import (
    COLUMNS,
    ResultRow,
    ResultsTable,
    compare,
    higher_is_better,
    main_table,
    margin_rows,
    read_results,
    summarize,
)


def row(method="supervised", seed=0, rnd=0, metric="top1", value=50.0, fraction=0.01, seconds=1.0, **kw):
    base = dict(stage="transfer", method=method, init="random", augment="S1", task="classification",
                dataset="fashion-mnist:test", label_fraction=fraction, seed=seed, round=rnd, metric=metric,
                value=value, seconds=seconds)  # fmt: skip
    return ResultRow(**{**base, **kw})


def test_new_file_has_header_in_column_order(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "results.csv"
    table = ResultsTable(path)
    assert table.rows() == []  # no file yet
    table.add([row()])
    with open(path, newline="") as fh:
        records = list(csv.reader(fh))
    assert tuple(records[0]) == COLUMNS
    assert COLUMNS[-2:] == ("value", "seconds")
    assert records[1][COLUMNS.index("method")] == "supervised"


def test_same_identity_replaces_in_place_and_new_ones_append(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "results.csv")
    table.add([row(seed=0, value=1.0), row(seed=1, value=2.0), row(seed=0, metric="top5", value=3.0)])
    table.add([row(seed=1, value=20.0, seconds=9.0), row(seed=2, value=4.0)])
    table.add([row(seed=1, value=21.0)])  # a resumed stage: still no duplicate
    got = [(r.seed, r.metric, r.value, r.seconds) for r in table.rows()]
    assert got == [(0, "top1", 1.0, 1.0), (1, "top1", 21.0, 1.0), (0, "top5", 3.0, 1.0), (2, "top1", 4.0, 1.0)]


def test_duplicates_within_one_add_keep_the_last(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "results.csv")
    table.add([row(value=1.0), row(value=2.0)])
    assert [r.value for r in table.rows()] == [2.0]


def test_rewrite_leaves_no_temporary_files(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "results.csv")
    for seed in range(3):
        table.add([row(seed=seed)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_types_round_trip_exactly(tmp_path: Path) -> None:
    original = row(value=np.float32(84.71), fraction=0.1 + 0.2, seed=np.int64(3), rnd=np.int32(2), seconds=1 / 3)
    assert type(original.value) is float and type(original.seed) is int and type(original.round) is int
    ResultsTable(tmp_path / "results.csv").add([original])
    (back,) = ResultsTable(tmp_path / "results.csv").rows()
    assert back == original
    assert back.label_fraction == 0.1 + 0.2  # repr, not a rounded str, is written
    assert isinstance(back.seed, int) and isinstance(back.value, float)


def test_fields_that_must_be_integers_refuse_fractions() -> None:
    with pytest.raises(TypeError):
        row(rnd=1.5)


def test_text_with_commas_and_quotes_survives(tmp_path: Path) -> None:
    odd = row(dataset='folder:/data/a,b "c"')
    ResultsTable(tmp_path / "results.csv").add([odd])
    assert read_results(tmp_path) == [odd]


def test_read_results_over_a_folder_merges_files_later_wins(tmp_path: Path) -> None:
    ResultsTable(tmp_path / "a" / "results.csv").add([row(seed=0, value=1.0), row(seed=1, value=2.0)])
    ResultsTable(tmp_path / "b" / "x" / "results.csv").add([row(seed=1, value=9.0), row(seed=2, value=3.0)])
    (tmp_path / "b" / "other.csv").write_text("not,a,results,file\n")  # only results.csv counts
    got = [(r.seed, r.value) for r in read_results(tmp_path)]
    assert got == [(0, 1.0), (1, 9.0), (2, 3.0)]
    assert len(read_results([tmp_path / "a" / "results.csv", tmp_path / "b"])) == 3
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "missing")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("transfer,supervised,random,S1,classification,d,0.01,0,0,top1,50.0", "expected 12 fields"),
        ("transfer,supervised,random,S1,classification,d,0.01,zero,0,top1,50.0,1.0", "'seed' must be an integer"),
        ("transfer,supervised,random,S1,classification,d,0.01,0,0,top1,high,1.0", "'value' must be a number"),
    ],
)
def test_malformed_row_error_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "results.csv"
    ResultsTable(path).add([row()])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_results(tmp_path)
    assert f"{path}:3" in str(err.value)


def test_wrong_header_is_reported_at_line_1(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("stage,method\ntransfer,supervised\n")
    with pytest.raises(ValueError, match=f"{path}:1: header"):
        ResultsTable(path).rows()


def test_summarize_mean_and_sample_std() -> None:
    rows = [
        row(seed=0, value=80.0), row(seed=1, value=82.0), row(seed=2, value=87.0),
        row("self-training", seed=1, rnd=1, value=90.0), row("self-training", seed=0, rnd=1, value=88.0),
        row(seed=0, value=70.0, fraction=0.1), row(seed=0, metric="top5", value=99.0),
    ]  # fmt: skip
    groups = summarize(rows)
    assert [(g["method"], g["round"], g["label_fraction"]) for g in groups] == [
        ("supervised", 0, 0.01), ("supervised", 0, 0.1), ("self-training", 1, 0.01),
    ]  # fmt: skip
    sup, sup10, st = groups
    assert sup["mean"] == pytest.approx(83.0)
    assert sup["std"] == pytest.approx(((9 + 1 + 16) / 2) ** 0.5)  # ddof=1 by hand
    assert (sup["n"], sup["seeds"], sup["values"]) == (3, [0, 1, 2], [80.0, 82.0, 87.0])
    assert (sup10["std"], sup10["n"]) == (0.0, 1)
    assert st["seeds"] == [0, 1] and st["mean"] == pytest.approx(89.0) and st["std"] == pytest.approx(2**0.5)
    top5 = summarize(rows, by=("method",), metric="top5")
    assert top5 == [{"method": "supervised", "mean": 99.0, "std": 0.0, "n": 1, "seeds": [0], "values": [99.0]}]


def test_summarize_filters() -> None:
    rows = [row(seed=0, value=1.0), row(seed=1, value=3.0, dataset="other"), row(seed=2, value=5.0, dataset="x")]
    (g,) = summarize(rows, by=("stage",), extra_filters={"dataset": "other"})
    assert g["values"] == [3.0]
    (g,) = summarize(rows, by=("stage",), extra_filters={"dataset": ["other", "x"]})
    assert g["values"] == [3.0, 5.0]
    with pytest.raises(KeyError, match="unknown result columns"):
        summarize(rows, by=("nope",))


def test_compare_pairs_seeds_when_they_match() -> None:
    base = {"mean": 2.0, "seeds": [0, 1, 2], "values": [1.0, 2.0, 3.0]}
    other = {"mean": 5.0, "seeds": [2, 0, 1], "values": [7.0, 3.0, 5.0]}
    got = compare(base, other)
    diffs = [3.0 - 1.0, 5.0 - 2.0, 7.0 - 3.0]
    assert got == {"delta": 3.0, "std": pytest.approx(statistics.stdev(diffs)), "n": 3, "paired": True}
    unpaired = compare(base, {"mean": 4.0, "seeds": [0, 1], "values": [4.0, 4.0]})
    assert unpaired == {"delta": 2.0, "std": None, "n": 2, "paired": False}


def test_main_table_compares_against_the_supervised_line_per_setting() -> None:
    rows = [row(seed=s, value=v) for s, v in [(0, 80.0), (1, 82.0)]]
    rows += [row("self-training", seed=s, rnd=1, augment="S4", value=v) for s, v in [(0, 85.0), (1, 88.0)]]
    rows += [row("self-training", seed=0, rnd=1, value=1.0, dataset="elsewhere")]  # no baseline there
    rows += [row(seed=0, metric="loss", value=0.5, stage="teach")]  # no top1: falls back to loss
    table, deltas = main_table(rows)
    assert [(g["stage"], g["dataset"], g["method"], g["metric"]) for g in table] == [
        ("teach", "fashion-mnist:test", "supervised", "loss"),
        ("transfer", "elsewhere", "self-training", "top1"),
        ("transfer", "fashion-mnist:test", "supervised", "top1"),
        ("transfer", "fashion-mnist:test", "self-training", "top1"),
    ]  # fmt: skip
    (d,) = deltas
    assert (d["method"], d["augment"], d["delta"], d["paired"]) == ("self-training", "S4", 5.5, True)
    assert d["std"] == pytest.approx(statistics.stdev([5.0, 6.0]))
    assert d["baseline"] == {"method": "supervised", "init": "random", "augment": "S1", "round": 0}


def test_margin_rows_are_each_students_value_minus_the_teachers() -> None:
    rows = [
        row(metric="absrel", value=0.19), row(metric="rmse", value=1.4),
        row("pretrain", metric="linear.top1", value=40.0),  # round 0, not a student: no margin
        row("self-training", rnd=1, metric="absrel", value=0.17, augment="S4"),
        row("self-training", rnd=2, metric="absrel", value=0.2),
        row("self-training", rnd=1, metric="delta1", value=78.0),  # the teacher has no delta1 row
    ]  # fmt: skip
    got = margin_rows(rows)
    assert [(r.round, r.metric, r.value, r.augment) for r in got] == [
        (1, "margin.absrel", pytest.approx(-0.02), "S4"), (2, "margin.absrel", pytest.approx(0.01), "S1")
    ]  # fmt: skip
    assert all(r.method == "self-training" and r.seed == 0 for r in got)
    assert not higher_is_better("margin.absrel") and higher_is_better("margin.miou")  # a negative error margin is better
