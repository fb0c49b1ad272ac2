"""The tidy results table: one row per measured value, in ``results.csv``.

Every stage that measures something appends rows here; the ``report`` stage and the CLI read
them back. A row's *identity* is every column except ``value`` and ``seconds``, so re-running
or resuming a stage replaces its old measurements instead of duplicating them.

Example:
    >>> table = ResultsTable("runs/demo/results.csv")
    >>> table.add([ResultRow("transfer", "supervised", "random", "S1", "classification",
    ...                      "fashion-mnist:test", 0.01, 0, 0, "top1", 71.3, 42.0)])
    >>> summarize(read_results("runs/demo"))[0]["mean"]
    71.3
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import operator
import os
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftrain.atomic import atomic_write_bytes

COLUMNS: tuple[str, ...] = (
    "stage", "method", "init", "augment", "task", "dataset",
    "label_fraction", "seed", "round", "metric", "value", "seconds",
)  # fmt: skip
IDENTITY: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("value", "seconds"))
BASELINE_METHOD = "supervised"
#: The method of a linear probe of an init before any training (a study's ``linear-probe`` cells).
PROBE_METHOD = "linear-probe"
#: Columns of one results table: measurements in different settings are never compared.
SETTING: tuple[str, ...] = ("stage", "task", "dataset")
#: Columns of one line of a results table; init and augment belong here, not to the setting,
#: because the supervised baseline and the student are normally trained with different ones.
LINE: tuple[str, ...] = ("method", "init", "augment", "round")

#: The metric a setting's main table shows, the first of these its rows have (else its first metric).
HEADLINE_METRICS: tuple[str, ...] = ("top1", "ap", "miou", "absrel", "nme")
#: Metrics where a smaller value is better (errors); every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"absrel", "rmse", "nme", "loss"})

_FLOATS = ("label_fraction", "value", "seconds")
_INTS = ("seed", "round")


@dataclass(frozen=True)
class ResultRow:
    """One measured value; field order is the CSV column order.

    Numeric fields are coerced on construction (numpy scalars become Python numbers), so a row
    written and read back compares equal. ``seed`` and ``round`` must be integral.
    """

    stage: str
    method: str
    init: str
    augment: str
    task: str
    dataset: str
    label_fraction: float
    seed: int
    round: int
    metric: str
    value: float
    seconds: float

    def __post_init__(self) -> None:
        for name in COLUMNS:
            raw = getattr(self, name)
            if name in _FLOATS:
                coerced: Any = float(raw)
            elif name in _INTS:
                # operator.index refuses 1.7 instead of silently truncating it to 1.
                coerced = operator.index(raw)
            else:
                coerced = str(raw)
            object.__setattr__(self, name, coerced)

    @property
    def identity(self) -> tuple:
        """What the row measures: every column except ``value`` and ``seconds``."""
        return tuple(getattr(self, c) for c in IDENTITY)

    def as_dict(self) -> dict[str, Any]:
        """The row as ``{column: value}`` in column order."""
        return dataclasses.asdict(self)


def _format_field(value: Any) -> str:
    # repr round-trips floats exactly (str of a numpy scalar would not after coercion anyway).
    return repr(value) if isinstance(value, float) else str(value)


def _parse_row(record: Sequence[str], where: str) -> ResultRow:
    if len(record) != len(COLUMNS):
        raise ValueError(f"{where}: expected {len(COLUMNS)} fields, got {len(record)}")
    fields: dict[str, Any] = {}
    for name, text in zip(COLUMNS, record):
        try:
            fields[name] = float(text) if name in _FLOATS else int(text) if name in _INTS else text
        except ValueError:
            kind = "a number" if name in _FLOATS else "an integer"
            raise ValueError(f"{where}: column {name!r} must be {kind}, got {text!r}") from None
    return ResultRow(**fields)


def _read_csv(path: Path) -> list[ResultRow]:
    """Rows of one results.csv; an empty file has none, anything malformed is a ValueError."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return []
            if tuple(header) != COLUMNS:
                raise ValueError(f"{path}:1: header must be {','.join(COLUMNS)}, got {','.join(header)}")
            rows = []
            for record in reader:
                if record:  # a blank line carries nothing; tolerate it rather than fail a report
                    rows.append(_parse_row(record, f"{path}:{reader.line_num}"))
            return rows
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None


def _merge(rows: Iterable[ResultRow], into: dict[tuple, ResultRow] | None = None) -> dict[tuple, ResultRow]:
    # Assigning an existing dict key keeps its position: replaced rows stay where they were.
    merged = {} if into is None else into
    for row in rows:
        merged[row.identity] = row
    return merged


class ResultsTable:
    """A ``results.csv`` file that merges new rows in by identity and rewrites atomically.

    The file is re-read on every call, so several stages of one process (run one after the
    other) see each other's rows. Concurrent writers from different processes are not locked
    against each other: the last ``add`` wins.

    Args:
        path: The CSV file; it and its folder may not exist yet.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[ResultRow]:
        """All rows in file order; no file yet means no rows."""
        return _read_csv(self.path) if self.path.exists() else []

    def add(self, rows: Iterable[ResultRow]) -> None:
        """Merge ``rows`` in (same identity replaces, new identities append) and rewrite the file."""
        merged = _merge(rows, _merge(self.rows()))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in merged.values():
            writer.writerow([_format_field(getattr(row, c)) for c in COLUMNS])
        atomic_write_bytes(self.path, buffer.getvalue().encode("utf-8"))


def read_results(paths_or_dir: str | Path | Iterable[str | Path]) -> list[ResultRow]:
    """Read results from CSV files and/or folders, deduplicated by identity.

    Args:
        paths_or_dir: A CSV file, a folder (every ``results.csv`` below it, recursively, in
            sorted path order), or an iterable of those.

    Returns:
        The rows; when two files hold the same identity, the later file's row wins but keeps
        the earlier position.

    Raises:
        FileNotFoundError: A named path does not exist.
        ValueError: A file is malformed; the message names the file and line.
    """
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    merged: dict[tuple, ResultRow] = {}
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(path.rglob("results.csv"))
        elif path.exists():
            files = [path]
        else:
            raise FileNotFoundError(f"no such results file or folder: {path}")
        for file in files:
            _merge(_read_csv(file), merged)
    return list(merged.values())


def _sort_key(field: str, value: Any) -> tuple:
    # The baseline sorts first so tables and plots read "supervised, then what beat it".
    if field == "method":
        return (value != BASELINE_METHOD, value)
    if isinstance(value, float) and math.isnan(value):
        return (1, 0.0)
    return (0, value)


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    rows: Iterable[ResultRow],
    by: Sequence[str] = ("method", "round", "label_fraction"),
    metric: str = "top1",
    extra_filters: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Mean and spread over seeds of one metric, per group.

    Args:
        rows: Result rows.
        by: Columns that define a group.
        metric: The metric to keep.
        extra_filters: ``{column: value}`` a row must match; a list, tuple or set value means
            "any of these".

    Returns:
        One dict per group, sorted by ``by`` (the supervised method first): the ``by`` columns
        plus ``mean``, ``std`` (sample std, 0.0 for one value), ``n``, and ``seeds`` and
        ``values`` sorted by seed.
    """
    unknown = [c for c in (*by, *(extra_filters or {})) if c not in COLUMNS]
    if unknown:
        raise KeyError(f"unknown result columns {unknown}; known: {', '.join(COLUMNS)}")
    filters = {
        k: set(v) if isinstance(v, (list, tuple, set, frozenset)) else {v}
        for k, v in (extra_filters or {}).items()
    }
    groups: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        if row.metric == metric and all(getattr(row, k) in v for k, v in filters.items()):
            groups.setdefault(tuple(getattr(row, c) for c in by), []).append(row)
    out = []
    for key in sorted(groups, key=lambda k: tuple(_sort_key(f, v) for f, v in zip(by, k))):
        members = sorted(groups[key], key=lambda r: r.seed)
        values = [r.value for r in members]
        seeds = [r.seed for r in members]
        stats = {"mean": statistics.fmean(values), "std": _spread(values), "n": len(values)}
        out.append({**dict(zip(by, key)), **stats, "seeds": seeds, "values": values})
    return out


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better; a prefix (``linear.``, ``finetune.``, ``margin.``) is ignored."""
    return metric.rsplit(".", 1)[-1] not in LOWER_IS_BETTER


#: Prefix of a student's margin over its run's teacher in results.csv (``margin.miou``).
MARGIN_PREFIX = "margin."


def margin_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """``margin.<metric>`` rows: each student's value minus the teacher's (method :data:`BASELINE_METHOD`, round 0).

    ``rows`` are one run's measurements (one seed); a metric the teacher was not measured with
    gets no margin. The margin rows keep the student's columns, so a report groups them by seed.
    """
    teacher = {r.metric: r.value for r in rows if r.method == BASELINE_METHOD and r.round == 0}
    return [
        dataclasses.replace(r, metric=MARGIN_PREFIX + r.metric, value=round(r.value - teacher[r.metric], 4))
        for r in rows
        if r.method != BASELINE_METHOD and r.round > 0 and r.metric in teacher
    ]


def compare(baseline: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """The difference of two :func:`summarize` groups, ``other - baseline``.

    Args:
        baseline: A group (needs ``mean``, ``seeds``, ``values``).
        other: Another group of the same shape.

    Returns:
        ``delta`` (difference of means), ``paired`` (both groups have the same seeds, each
        once), ``std`` (sample std of the per-seed differences when paired, else None) and
        ``n`` (pairs when paired, else the smaller group size).
    """
    base_seeds, other_seeds = list(baseline["seeds"]), list(other["seeds"])
    paired = sorted(base_seeds) == sorted(other_seeds) and len(set(base_seeds)) == len(base_seeds)
    delta = float(other["mean"]) - float(baseline["mean"])
    if not paired:
        return {"delta": delta, "std": None, "n": min(len(base_seeds), len(other_seeds)), "paired": False}
    base_by_seed = dict(zip(base_seeds, baseline["values"]))
    diffs = [v - base_by_seed[s] for s, v in zip(other_seeds, other["values"])]
    return {"delta": delta, "std": _spread(diffs), "n": len(diffs), "paired": True}


def main_table(rows: Iterable[ResultRow]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Groups and baseline deltas for the report's main table, one setting at a time.

    Per (stage, task, dataset) setting the metric is the first of :data:`HEADLINE_METRICS` that
    its rows have, else their first metric. The baseline is the first ``supervised`` line (in
    :func:`summarize` order); every other line is compared to it at the same label fraction.

    Args:
        rows: Result rows.

    Returns:
        ``(groups, deltas)``: :func:`summarize` groups over ``SETTING + LINE + label_fraction``
        with a ``metric`` key added, and one dict per compared group: its identifying columns,
        the :func:`compare` result, ``better`` (whether the line beat the baseline: a positive
        Δ, or a negative one for a :data:`LOWER_IS_BETTER` metric) and ``baseline`` (the baseline
        line's ``LINE`` columns).
    """
    settings: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        settings.setdefault(tuple(getattr(row, c) for c in SETTING), []).append(row)
    by = (*SETTING, *LINE, "label_fraction")
    table: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    for key in sorted(settings):
        metrics = [r.metric for r in settings[key]]
        metric = next((m for m in HEADLINE_METRICS if m in metrics), metrics[0])
        groups = [{**g, "metric": metric} for g in summarize(settings[key], by=by, metric=metric)]
        table.extend(groups)
        lines = [tuple(g[c] for c in LINE) for g in groups]
        baseline = next((line for line, g in zip(lines, groups) if g["method"] == BASELINE_METHOD), None)
        base = {g["label_fraction"]: g for line, g in zip(lines, groups) if line == baseline}
        for line, g in zip(lines, groups):
            if baseline is not None and line != baseline and g["label_fraction"] in base:
                ident = {c: g[c] for c in (*by, "metric")}
                comparison = compare(base[g["label_fraction"]], g)
                better = comparison["delta"] > 0 if higher_is_better(metric) else comparison["delta"] < 0
                deltas.append({**ident, **comparison, "better": better, "baseline": dict(zip(LINE, baseline))})
    return table, deltas


def format_fraction(fraction: float) -> str:
    """A label fraction as a percentage: 0.01 -> ``"1%"``, 0.005 -> ``"0.5%"``."""
    return f"{fraction * 100:g}%"


def describe(rows: Sequence[ResultRow]) -> str:
    """One sentence saying what was run: datasets, label fractions, seeds, methods, augment, init."""
    if not rows:
        return "No results.csv was found, so there is no results table."

    def values(col: str, fmt: Callable[[Any], str] = str) -> str:
        return ", ".join(fmt(v) for v in sorted({getattr(r, col) for r in rows}))

    parts = [
        f"datasets {values('dataset')}", f"label fractions {values('label_fraction', format_fraction)}",
        f"seeds {values('seed')}", f"methods {values('method')}",
        f"rounds {values('round')} (0 = the supervised teacher)", f"augment {values('augment')}",
        f"init {values('init')}", f"tasks {values('task')}", f"stages {values('stage')}",
    ]  # fmt: skip
    return f"What was run: {'; '.join(parts)}. {len(rows)} measurements of {values('metric')}."
