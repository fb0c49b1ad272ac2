"""``faces CONFIG``: the face benchmark of Bulat et al. (2021), *Pre-training strategies and datasets
for facial representation learning* (FRL), few-shot, on every face task.

A backbone initialization (``random``, ``supervised`` = identity classification on a labeled
source, ``ssl:<method>`` = self-supervised on an unlabeled face pool) is evaluated on each task
at several label fractions and k-shot subsets (seeded, nested: :func:`~selftrain.data.labeled_subset`,
:func:`~selftrain.data.kshot_subset`), with full fine-tuning (``finetune``) or a frozen backbone
(``linear``: the head alone, a linear probe on pooled features; for landmarks the heatmap decoder),
over several seeds; ``self-training`` cells add the teach -> label -> student stages at the given
fractions (the pool is the task's labeled source outside its split; a verification task has them
only with an embedding teacher, ``label.teacher: dlib:embedding`` in its ``set``). Each
combination is a *cell*, a normal run folder whose ``cell.json`` is written last (the study's
resume contract), run by :func:`selftrain.pipeline.run_pipeline`::

    OUT/
      benchmark.json                       the config and its cells (written first)
      data/                                the generated fixtures (``data.generate``)
      pools/<name>/                        each pre-training pool, curated and subset once (selftrain.face_pools)
      pretrain/<init>-seed<s>/             one pre-training per (init, seed), shared by its cells
      cells/<task>_<init>_<split>_<protocol>_seed<s>/   a run folder + cell.json
      results.csv                          stage ``faces``: every finished cell's rows, in order
      report.md, report.html               the FRL table (rows init, columns task x split); with pools,
                                           the pools table and the pool-size curve (plots/pool_size.png)

Rows of ``results.csv``: ``stage`` faces, ``method`` the protocol (finetune, linear,
self-training), ``task`` the benchmark task's name, ``dataset`` its test set (with ``#K-shot`` for a
k-shot split), ``label_fraction`` the fraction (for k-shot, the share of the source it keeps),
``init`` the init as listed: ``random``, ``supervised``, ``ssl:<method>`` (on ``pretrain_data``),
``ssl:<method>@<pool>`` (on a pre-training pool, curated when the pool says so) and
``ssl:<method>@<pool>#N`` (on its nested subset of N images), so every pool and size is its own row.
In folder names ``:`` becomes ``-`` and ``#`` ``-n`` (``ssl-simclr@uncurated-n60``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from selftrain.atomic import atomic_write_text
from selftrain.config import FACE_TASKS, ConfigError, _Strict, apply_override, build_config, embedding_teacher, read_mapping
from selftrain.face_pools import PretrainPoolConfig, check_pool_inits, expand_inits, parse_pool_init, pool_uri, prepare_pools
from selftrain.results import ResultRow, ResultsTable, read_results

log = logging.getLogger("selftrain.faces")

DATA_MARK = "{data}"  # in a URI: the benchmark's data folder
SSL = ("simclr", "moco", "byol", "swav")  # self-supervised methods of the pretrain stage


class FaceDataConfig(_Strict):
    """Where the face data sets are: generated fixtures (``generate``) or your own URIs."""

    generate: bool = Field(True, description="write the fixtures of selftrain.data.face_fixtures into OUT/data first")
    dir: str | None = Field(None, description="the data folder {data} stands for; None: OUT/data")
    train: int = Field(240, ge=8, description="generated images per task, training split")
    test: int = Field(80, ge=8, description="generated images per task, test split")
    size: int = Field(48, ge=16, description="generated image side (px)")
    real: bool = Field(True, description="also write the real LFW crops of skimage.data.lfw_subset()")
    uncurated: int = Field(0, ge=0, description="distinct faces of a generated uncurated pool {data}/pool_uncurated (0: none)")


class FaceTaskConfig(_Strict):
    """One column group of the table: a face task on its labeled and test sources."""

    name: str
    task: Literal["landmarks", "au", "emotion", "alignment3d", "verification"]
    labeled: str = Field(description="labeled source URI ({data} = the data folder)")
    test: str = Field(description="held-out source URI (verification: lfw-pairs:PAIRS.txt)")
    set: list[str] = Field([], description="run-config overrides for this task's cells, e.g. teach.steps=200")


class FaceBenchmarkConfig(_Strict):
    """A face benchmark file."""

    name: str = "faces"
    base: dict[str, Any] = Field(default_factory=dict, description="the run config shared by every cell")
    data: FaceDataConfig = FaceDataConfig()
    pretrain_data: dict[str, str] = Field(
        default_factory=dict, description="init -> pretrain.data URI (supervised: a labeled source; ssl:*: any images)"
    )
    pretrain_pools: list[PretrainPoolConfig] = Field([], description="pools that ssl:<method>@<name>[#N] inits pre-train on")
    tasks: list[FaceTaskConfig] = Field(min_length=1)
    inits: list[str] = Field(["random"], min_length=1,
                             description="random | supervised | ssl:<simclr|moco|byol|swav> | ssl:<method>@<pool>[#N]")
    label_fractions: list[float] = Field([1.0], description="seeded, nested label fractions")
    shots: list[int] = Field([], description="k-shot subsets (k per class; k images for regression sources)")
    protocols: list[Literal["finetune", "linear"]] = ["finetune"]
    self_training: list[float] = Field([], description="label fractions with a self-training cell (verification: only "
                                       "with label.teacher: dlib:embedding in its set)")
    seeds: list[int] = Field([0], min_length=1)
    linear_set: list[str] = Field([], description="overrides of linear-probe cells, e.g. teach.optim.lr=0.05")
    jobs: int = Field(1, ge=1)

    @field_validator("inits")
    @classmethod
    def _inits(cls, inits: list[str]) -> list[str]:
        for init in inits:
            if init not in ("random", "supervised") and init.split("@")[0] not in {f"ssl:{m}" for m in SSL}:
                raise ValueError(f"unknown init {init!r}; allowed: random, supervised, ssl:<simclr|moco|byol|swav>[@<pool>[#N]]")
        return list(dict.fromkeys(inits))

    @field_validator("label_fractions", "self_training")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in values):
            raise ValueError(f"label fractions must be in (0, 1], got {values}")
        return list(dict.fromkeys(values))

    @model_validator(mode="after")
    def _check(self) -> FaceBenchmarkConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        if not self.label_fractions and not self.shots:
            raise ValueError("label_fractions / shots: give at least one split")
        if 1.0 in self.self_training:
            raise ValueError("self_training: at label fraction 1 the pool (the labeled source outside its split) is empty")
        check_pool_inits(self.inits, self.pretrain_pools, SSL)
        missing = [i for i in self.inits if i != "random" and "@" not in i and i not in self.pretrain_data]
        if missing:
            raise ValueError(f"pretrain_data: no source for init {', '.join(missing)} (init -> URI)")
        return self

    @property
    def all_inits(self) -> list[str]:
        """The inits with the pool-size inits ``ssl:<m>@<pool>#N`` of each pool init's sizes."""
        return expand_inits(self.inits, self.pretrain_pools)


@dataclass(frozen=True)
class FaceCell:
    """One (task, init, split, protocol, seed) of the benchmark."""

    task: str
    init: str
    split: str  # "f0.1" or "5shot"
    protocol: str  # finetune | linear | self-training
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task}_{_slug(self.init)}_{self.split}_{self.protocol}_seed{self.seed}"

    @property
    def shots(self) -> int | None:
        return int(self.split[:-4]) if self.split.endswith("shot") else None

    @property
    def fraction(self) -> float:
        return 1.0 if self.shots else float(self.split[1:])


def load_benchmark(path: str | Path, overrides: list[str] | tuple = ()) -> FaceBenchmarkConfig:
    """Loads and validates a face benchmark file (``--set`` keys are the file's own: ``seeds=[0]``, ``base.teach.steps=5``)."""
    raw = read_mapping(path, "face benchmark file", "(base, data, tasks, inits, ...)")
    for override in overrides:
        apply_override(raw, override)
    try:
        return FaceBenchmarkConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()]
        raise ConfigError(f"invalid face benchmark {path}:\n" + "\n".join(lines)) from None


def plan(bench: FaceBenchmarkConfig) -> list[FaceCell]:
    """Every cell, in table order: task, init, split, protocol, seed."""
    splits = [f"f{f:g}" for f in bench.label_fractions] + [f"{k}shot" for k in bench.shots]
    cells = []
    for task in bench.tasks:
        for init in bench.all_inits:
            for split in splits:
                protocols = list(bench.protocols)
                if split.startswith("f") and float(split[1:]) in bench.self_training and self_trains(bench, task):
                    protocols.append("self-training")
                cells += [FaceCell(task.name, init, split, p, s) for p in protocols for s in bench.seeds]
    return cells


def self_trains(bench: FaceBenchmarkConfig, task: FaceTaskConfig) -> bool:
    """Whether ``task`` has self-training cells: every task but verification, which has them only with
    an embedding teacher (``label.teacher: dlib:embedding`` in its ``set`` or in ``base``)."""
    if task.task != "verification":
        return True
    raw = copy.deepcopy(bench.base)
    for override in task.set:
        apply_override(raw, override)
    return embedding_teacher(str((raw.get("label") or {}).get("teacher", "teach")))


def _uri(uri: str, data: Path) -> str:
    return uri.replace(DATA_MARK, str(data))


def cell_config(bench: FaceBenchmarkConfig, cell: FaceCell, out: Path, data: Path):
    """The run config of one cell."""
    task = next(t for t in bench.tasks if t.name == cell.task)
    stages = ["teach", "label", "student", "transfer"] if cell.protocol == "self-training" else ["teach", "transfer"]
    sets = [f"task={task.task}", f"seed={cell.seed}", f"data.labeled={_uri(task.labeled, data)}",
            f"data.test={_uri(task.test, data)}", f"stages=[{', '.join(stages)}]",
            f"data.unlabeled={_uri(task.labeled, data) if cell.protocol == 'self-training' else ''}"]  # fmt: skip
    sets.append(f"data.shots={cell.shots}" if cell.shots else f"data.label_fraction={cell.fraction!r}")
    if cell.init != "random":
        sets.append(f"model.weights={out.resolve() / 'pretrain' / _pretrain_folder(cell.init, cell.seed) / 'pretrain' / 'backbone.safetensors'}")
    if cell.protocol == "linear":
        sets += ["teach.freeze_backbone=true", *bench.linear_set]
    return build_config(bench.base, [*sets, *task.set], source=f"face cell {cell.id}")


def _slug(init: str) -> str:
    """An init in a folder name: ``ssl:simclr@pool#100`` -> ``ssl-simclr@pool-n100``."""
    return init.replace(":", "-").replace("#", "-n")


def _pretrain_folder(init: str, seed: int) -> str:
    return f"{_slug(init)}-seed{seed}"


def pretrain_config(bench: FaceBenchmarkConfig, init: str, seed: int, data: Path, pools: dict | None = None):
    """The shared pre-training of ``init`` (its data from ``pretrain_data``, or its prepared pool
    from ``pools``: :func:`selftrain.face_pools.prepare_pools`), only the pretrain stage."""
    method = "supervised" if init == "supervised" else init.split(":", 1)[1].split("@")[0]
    source = pool_uri(init, pools or {}) if "@" in init else _uri(bench.pretrain_data[init], data)
    # The run around the stage needs a labeled source with classes (its images give the normalization
    # statistics): the pre-training source when supervised, else the first identity source of the tasks.
    labeled = source if method == "supervised" else next(
        (_uri(t.labeled, data) for t in bench.tasks if t.task in ("verification", "emotion")), None)
    if labeled is None:
        raise ConfigError(f"init {init}: a self-supervised pre-training needs a verification or emotion task among the tasks "
                          "(its labeled source sizes the run around the pretrain stage)")  # fmt: skip
    sets = ["task=classification", f"seed={seed}", "stages=[pretrain]", f"pretrain.method={method}", f"pretrain.data={source}",
            f"data.labeled={labeled}", "data.label_fraction=1.0", "data.unlabeled=", "data.test=", "data.shots="]  # fmt: skip
    base = {k: v for k, v in bench.base.items() if k not in ("task",)}
    return build_config(base, sets, source=f"face pretrain {init}")


def _rows(folder: Path, cell: FaceCell, task_name: str, n_labeled: int, n_source: int) -> list[ResultRow]:
    """The cell's transfer rows in benchmark terms (self-training cells: the student only)."""
    rows = []
    for row in read_results(folder / "results.csv"):
        if cell.protocol == "self-training" and row.round == 0:
            continue  # the teacher is the finetune cell's measurement
        fields = row.as_dict()
        fields.update(stage="faces", method=cell.protocol, init=cell.init, task=task_name, round=0)
        if cell.shots:
            fields.update(dataset=f"{row.dataset}#{cell.shots}-shot", label_fraction=round(n_labeled / max(n_source, 1), 6))
        rows.append(ResultRow(**fields))
    return rows


def run_cell(bench: FaceBenchmarkConfig, cell: FaceCell, out: Path, data: Path) -> dict:
    """Runs (or resumes) one cell; its ``cell.json`` is written last."""
    from selftrain.pipeline import run_pipeline

    folder = out / "cells" / cell.id
    done = folder / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.time()
    run_pipeline(cell_config(bench, cell, out, data), folder)
    split = json.loads(next((folder / "splits").glob("*.json")).read_text())
    n_source = json.loads((folder / "data.json").read_text())["labeled"].get("n", 0)
    rows = _rows(folder, cell, cell.task, len(split.get("keys", [])), int(n_source or 0))
    record = {"id": cell.id, "seconds": round(time.time() - start, 2), "rows": [r.as_dict() for r in rows]}
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def merge(out: Path, cells: list[FaceCell]) -> int:
    """Rebuilds ``OUT/results.csv`` from the finished cells, in plan order."""
    rows = []
    for cell in cells:
        path = out / "cells" / cell.id / "cell.json"
        if path.exists():
            rows += [ResultRow(**r) for r in json.loads(path.read_text())["rows"]]
    (out / "results.csv").unlink(missing_ok=True)
    table = ResultsTable(out / "results.csv")
    table.add(rows)
    return len(table.rows())


def run_benchmark(bench: FaceBenchmarkConfig, out: str | Path, *, jobs: int | None = None) -> dict:
    """Writes (or reuses) the data, pre-trains each (init, seed) once, runs every cell, merges and reports."""
    from selftrain.pipeline import run_pipeline
    from selftrain.report import build_report
    from selftrain.study import run_parallel, spawn_child

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(bench.data.dir).expanduser() if bench.data.dir else out / "data"
    if bench.data.generate:
        from selftrain.data.face_fixtures import write_face_benchmark_data

        d = bench.data
        write_face_benchmark_data(data, train=d.train, test=d.test, size=d.size, real=d.real)
        if d.uncurated:
            from selftrain.data.face_fixtures import write_uncurated_pool

            write_uncurated_pool(data / "pool_uncurated", unique=d.uncurated, size=d.size)
    cells = plan(bench)
    for cell in cells:  # every cell's config is valid before anything trains
        cell_config(bench, cell, out, data)
    record = {"config": bench.model_dump(mode="json"), "data": str(data), "cells": [c.id for c in cells]}
    saved = out / "benchmark.json"
    if saved.exists() and json.loads(saved.read_text())["config"] != record["config"]:
        raise ValueError(f"{out} holds a different face benchmark (see {saved}); use another --out")
    atomic_write_text(saved, json.dumps(record, indent=1))
    used = {parsed[1] for init in bench.all_inits if (parsed := parse_pool_init(init))}
    pools = prepare_pools(bench.pretrain_pools, used, out, data)
    for init in [i for i in bench.all_inits if i != "random"]:
        for seed in bench.seeds:
            folder = out / "pretrain" / _pretrain_folder(init, seed)
            if not (folder / "pretrain" / "backbone.safetensors").exists():
                log.info("faces: pre-training %s, seed %d", init, seed)
                run_pipeline(pretrain_config(bench, init, seed, data, pools), folder)
    todo = [c for c in cells if not (out / "cells" / c.id / "cell.json").exists()]
    failed: list[str] = []
    if (jobs or bench.jobs) == 1:
        for i, cell in enumerate(todo, 1):
            log.info("faces: cell %d/%d %s", i, len(todo), cell.id)
            run_cell(bench, cell, out, data)
    else:
        failed = run_parallel(todo, jobs or bench.jobs,
                              lambda c, t: spawn_child(out / "cells" / c.id, ["selftrain.faces", str(out), c.id, str(t)], t),
                              lambda c: out / "cells" / c.id, what="faces")  # fmt: skip
    n_rows = merge(out, cells)
    build_report(out, title=f"selftrain face benchmark: {bench.name}")
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; run the benchmark again to resume")
    return {"cells": [c.id for c in cells], "ran": [c.id for c in todo], "rows": n_rows}


# ----------------------------------------------------------------------------- the FRL table


def _split_label(row: ResultRow) -> str:
    if "#" in row.dataset and row.dataset.endswith("-shot"):
        return row.dataset.rsplit("#", 1)[1]
    return f"{100 * row.label_fraction:g}%"


def frl_tables(rows: list[ResultRow]) -> list[dict[str, Any]]:
    """One table per method (protocol): rows init, columns task x split, cells mean +- std over seeds of
    the task's headline metric. Each table: ``method``, ``columns`` [(task, metric, split)],
    ``rows`` [(init, [(mean, std, n) | None])]."""
    from selftrain.tasks import TASKS

    rows = [r for r in rows if r.stage == "faces"]
    tables = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        headline = {}
        for r in mine:
            kind = TASKS.get(_task_kind(r, mine))
            headline.setdefault(r.task, kind.metric)
        columns = list(dict.fromkeys((r.task, headline[r.task], _split_label(r)) for r in mine if r.metric == headline[r.task]))
        body = []
        for init in dict.fromkeys(r.init for r in mine):
            cells = []
            for task, metric, split in columns:
                values = [r.value for r in mine if (r.init, r.task, r.metric, _split_label(r)) == (init, task, metric, split)]
                cells.append(_mean_std(values) if values else None)
            body.append((init, cells))
        tables.append({"method": method, "columns": columns, "rows": body})
    return tables


def _task_kind(row: ResultRow, rows: list[ResultRow]) -> str:
    """The registered task behind a benchmark task name, from its metrics."""
    metrics = {r.metric for r in rows if r.task == row.task}
    if "icc" in metrics:
        return "au"
    if "ccc_valence" in metrics:
        return "emotion"
    if "nme_3d" in metrics:
        return "alignment3d"
    if "failure_rate" in metrics:
        return "landmarks"
    return "verification"


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def frl_section(rows: list[ResultRow], markdown: bool, table, grid_type, cell_type) -> list[str]:
    """The report's "Face benchmark (FRL)" section: one grid per method (empty without face rows)."""
    out = []
    lower = {"nme"}
    for t in frl_tables(rows):
        header = ["init", *[f"{task} {metric}{' ↓' if metric in lower else ''} @ {split}" for task, metric, split in t["columns"]]]
        body = [[cell_type(init), *[cell_type("—") if c is None else cell_type(f"{c[0]:.2f} ± {c[1]:.2f}", f"n={c[2]}")
                                    for c in cells]] for init, cells in t["rows"]]  # fmt: skip
        out.append(table(grid_type(f"Face benchmark, {t['method']}: mean ± std over seeds (↓ lower is better)", header, body)))
    if not out:
        return []
    head = "## Face benchmark (FRL)" if markdown else "<h2>Face benchmark (FRL)</h2>"
    return [head, *out]


def _child(argv: list[str]) -> None:
    """``python -m selftrain.faces OUT CELL_ID THREADS``: one cell, in a child process."""
    import torch

    out, cell_id, threads = Path(argv[0]), argv[1], int(argv[2])
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    record = json.loads((out / "benchmark.json").read_text())
    bench = FaceBenchmarkConfig.model_validate(record["config"])
    (cell,) = [c for c in plan(bench) if c.id == cell_id]
    run_cell(bench, cell, out, Path(record["data"]))


if __name__ == "__main__":
    import sys

    _child(sys.argv[1:])


__all__ = ["FaceBenchmarkConfig", "FaceCell", "load_benchmark", "plan", "run_benchmark", "frl_tables", "FACE_TASKS"]
