"""``study CONFIG``: the grid of Zoph et al. (2020), *Rethinking Pre-training and Self-training*.

A study is a grid over init (random, supervised or self-supervised pre-training, a weights
file) × augmentation strength (S1–S4) × label fraction × method × seed. Each grid point is a
*cell*: a normal run folder, resumable like any run, whose ``cell.json`` is written last and
atomically; it is the marker that the cell is finished. A study killed at any moment resumes
without re-running a finished cell, and ``results.csv`` is rebuilt from the ``cell.json`` files
in grid order, so it ends with exactly the rows of an uninterrupted study.

::

    OUT/
      study.json                 the study config, the grid and its cells (written first)
      results.csv                every finished cell's rows, in grid order
      pretrain/<init>-seed<s>/   one pretraining run per (init, seed), shared by its cells
      cells/<cell-id>/           a run folder (config.yaml, teach/, label/, student/, ...)
      cells/<cell-id>/cell.json  the cell's axes and result rows: the "finished" marker
      report.md, report.html     the Rethinking table, plots and findings

Methods (what a cell runs):
    linear-probe            no training: the init's backbone, frozen, under a linear probe on the
                            cell's labeled split (one cell per init, label fraction and seed, augment
                            ``none``: how good the init's features are before any training)
    finetune                teach from the init: the supervised baseline (``method`` column
                            ``supervised``, round 0)
    self-training           teach from the init, label the pool, student from random weights
    pretrain+self-training  teach and student both from the init (with ``random`` init it is
                            ``self-training``, so that grid point is left out)

Example:
    >>> study, base = load_study("configs/study/rethinking-fashion.yaml")
    >>> run_study(study, base, "runs/study", jobs=2)

The cost estimate of ``--dry-run`` is in :mod:`selftrain.dryrun`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from selftrain.atomic import atomic_write_text
from selftrain.config import (
    Augment, Config, ConfigError, _Strict, apply_override, build_config, read_mapping,
)  # fmt: skip
from selftrain.pretrain import BACKBONE_FILE
from selftrain.results import ResultRow, ResultsTable, read_results

log = logging.getLogger("selftrain.study")

METHODS = ("linear-probe", "finetune", "self-training", "pretrain+self-training")
Method = Literal["linear-probe", "finetune", "self-training", "pretrain+self-training"]
#: The augment axis of a ``linear-probe`` cell: the probe trains on clean images.
PROBE_AUGMENT = "none"
#: Pretraining methods of the pretrain stage (``ssl:<method>``; ``supervised`` is its own init).
SSL_METHODS = ("simclr", "moco", "byol", "swav")
#: Where a pretrain run folder keeps the backbone its pretrain stage exported.
PRETRAIN_EXPORT = Path("pretrain") / BACKBONE_FILE
_STAGES = {"linear-probe": ["transfer"], "finetune": ["teach", "transfer"],
           "self-training": ["teach", "label", "student", "transfer"]}  # fmt: skip
_STAGES["pretrain+self-training"] = _STAGES["self-training"]


class GridConfig(_Strict):
    """The axes of a study; every combination is a cell."""

    init: list[str] = Field(["random"], min_length=1, description="random | supervised | ssl:<method> | pretrained:PATH")
    augment: list[Augment] = Field(["S1"], min_length=1, description="teacher and student augmentation strength")
    label_fraction: list[float] = Field([0.01], min_length=1)
    method: list[Method] = Field(["finetune", "self-training"], min_length=1)
    seed: list[int] = Field([0], min_length=1)

    @field_validator("init")
    @classmethod
    def _known_inits(cls, inits: list[str]) -> list[str]:
        for init in inits:
            name = init.split(":", 1)[0]
            if name not in ("random", "supervised", "ssl", "pretrained") or (name in ("random", "supervised") and ":" in init):
                raise ValueError(f"unknown init {init!r}; allowed: random, supervised, ssl:<method>, pretrained:PATH")
            if name == "ssl" and init[4:] not in SSL_METHODS:
                raise ValueError(f"unknown self-supervised method in {init!r}; allowed: {', '.join(SSL_METHODS)}")
            if name == "pretrained" and not init[11:]:
                raise ValueError("pretrained:PATH needs the path of a weights file")
        if sum(i.startswith("pretrained:") for i in inits) > 1:
            raise ValueError("at most one pretrained:PATH per study (its rows are labeled init=pretrained)")
        return list(dict.fromkeys(inits))

    @field_validator("augment", "label_fraction", "method", "seed")
    @classmethod
    def _unique(cls, values: list) -> list:
        return list(dict.fromkeys(values))

    @field_validator("label_fraction")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in values):
            raise ValueError(f"label fractions must be in (0, 1], got {values}")
        return values


class ProbeConfig(_Strict):
    """The timing probe of ``--dry-run``: a few real steps of each stage on the real data."""

    steps: int = Field(20, ge=2, description="teach and student steps timed per augmentation strength")
    pool: int = Field(2048, ge=1, description="pool images labeled to time the label stage")


class StudyConfig(_Strict):
    """A study file: a base run config, the grid, parallel jobs and the dry-run probe."""

    name: str = "study"
    base: dict[str, Any] | str = Field(default_factory=dict, description="a run config mapping, or a path to one")
    grid: GridConfig = GridConfig()
    jobs: int = Field(1, ge=1, description="cells run in parallel processes")
    probe: ProbeConfig = ProbeConfig()


@dataclass(frozen=True)
class Cell:
    """One grid point: a run with its own folder."""

    init: str
    augment: str
    label_fraction: float
    method: str
    seed: int

    @property
    def id(self) -> str:
        init = self.init_label.replace(":", "-")
        return f"{init}_{self.augment}_f{self.label_fraction:g}_{self.method}_seed{self.seed}"

    @property
    def init_label(self) -> str:
        """The ``init`` column of the cell's rows."""
        return "pretrained" if self.init.startswith("pretrained:") else self.init

    @property
    def pretrain_run(self) -> str | None:
        """The shared pretraining run folder (relative to the study) this cell's weights come from."""
        if self.init == "random" or self.init.startswith("pretrained:"):
            return None
        return f"pretrain/{self.init.replace(':', '-')}-seed{self.seed}"

    def axes(self) -> dict[str, Any]:
        return {"init": self.init, "augment": self.augment, "label_fraction": self.label_fraction,
                "method": self.method, "seed": self.seed}  # fmt: skip


# ----------------------------------------------------------------------------- loading and planning


def _base_mapping(study: StudyConfig, root: Path) -> dict[str, Any]:
    if isinstance(study.base, dict):
        return dict(study.base)
    path = Path(study.base) if Path(study.base).is_absolute() else root / study.base
    return read_mapping(path, "base: config file")


def load_study(path: str | Path, overrides: list[str] | tuple = ()) -> tuple[StudyConfig, dict[str, Any]]:
    """Loads a study file; returns the validated study and its base run config as a mapping.

    Overrides whose key starts with ``grid.``, ``jobs``, ``probe.`` or ``name`` set the study;
    every other one sets the base run config (``student.steps=5``, ``base.student.steps=5``).
    A relative ``base:`` path or ``pretrained:PATH`` is taken relative to the study file.
    """
    path = Path(path)
    raw = read_mapping(path, "study file", "(base, grid, jobs, probe)")
    study_sets, base_sets = [], []
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        own = key.split(".")[0] in ("grid", "jobs", "probe", "name")
        (study_sets if own else base_sets).append(override.removeprefix("base."))
    for override in study_sets:
        apply_override(raw, override)
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()]
        raise ConfigError(f"invalid study {path}:\n" + "\n".join(lines)) from None
    inits = [_absolute_init(i, path.parent) for i in study.grid.init]
    study.grid = study.grid.model_copy(update={"init": inits})
    base = _base_mapping(study, path.parent)
    for override in base_sets:
        apply_override(base, override)
    return study, base


def _absolute_init(init: str, root: Path) -> str:
    if not init.startswith("pretrained:"):
        return init
    weights = Path(init[11:]).expanduser()
    return f"pretrained:{weights if weights.is_absolute() else (root / weights).resolve()}"


def plan_cells(study: StudyConfig) -> list[Cell]:
    """Every cell of the grid, in grid order (init, augment, label fraction, method, seed).

    ``linear-probe`` cells do not depend on the augmentation strength: they come first for each
    init, once per label fraction and seed, with augment ``none``.
    """
    g = study.grid
    cells = []
    for init in g.init:
        if "linear-probe" in g.method:
            cells.extend(Cell(init, PROBE_AUGMENT, f, "linear-probe", seed) for f in g.label_fraction for seed in g.seed)
        for augment in g.augment:
            for fraction in g.label_fraction:
                for method in g.method:
                    if method == "linear-probe":
                        continue  # above: once, whatever the augmentation strength
                    if method == "pretrain+self-training" and init == "random":
                        continue  # the same runs as self-training from random weights
                    cells.extend(Cell(init, augment, fraction, method, seed) for seed in g.seed)
    return cells


def cell_overrides(cell: Cell, out: Path) -> list[str]:
    """The config overrides that turn the base config into ``cell``'s run."""
    sets = [f"seed={cell.seed}", f"data.label_fraction={cell.label_fraction!r}", f"teach.augment={cell.augment}",
            f"student.augment={cell.augment}", f"stages=[{', '.join(_STAGES[cell.method])}]"]  # fmt: skip
    if cell.init.startswith("pretrained:"):
        sets.append(f"model.weights={cell.init[11:]}")
    elif cell.init != "random":
        sets.append(f"model.weights={out.resolve() / cell.pretrain_run / PRETRAIN_EXPORT}")
    if cell.method == "linear-probe":
        sets.append("transfer.protocols=[linear]")
    elif cell.method == "self-training" and cell.init != "random":
        sets.append("student.init=random")  # only the teacher starts from the init
    elif cell.method == "pretrain+self-training":
        sets.append("student.init=scratch")  # i.e. model.weights: the init, as for the teacher
    return sets


def pretrain_config(base: dict[str, Any], init: str, seed: int, extra: list[str] | tuple = ()) -> Config:
    """The shared pretraining run of ``init`` and ``seed``: only the pretrain stage (``extra``: more overrides)."""
    method = "supervised" if init == "supervised" else init.split(":", 1)[1]
    sets = [f"seed={seed}", "stages=[pretrain]", f"pretrain.method={method}", *extra]
    return build_config(base, sets, source=f"pretrain {init}")


def cell_config(base: dict[str, Any], cell: Cell, out: Path) -> Config:
    return build_config(base, cell_overrides(cell, out), source=f"cell {cell.id}")


def validate(study: StudyConfig, base: dict[str, Any], out: Path) -> list[Cell]:
    """Builds every cell's config before anything runs, so a bad grid fails at once."""
    cells = plan_cells(study)
    if not cells:
        raise ConfigError("grid: no cells; pretrain+self-training from random init is self-training, so list another init or method")
    for cell in cells:
        if cell.init.startswith("pretrained:") and not Path(cell.init[11:]).is_file():
            raise ConfigError(f"grid.init: weights file not found: {cell.init[11:]}")
        cell_config(base, cell, out)
    return cells


# ----------------------------------------------------------------------------- running


def cell_folder(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.id


def finished(out: Path, cell: Cell) -> dict | None:
    """The cell's ``cell.json`` when the cell is finished, else None."""
    path = cell_folder(out, cell) / "cell.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _relabel(rows: list[ResultRow], cell: Cell) -> list[ResultRow]:
    """The cell's rows in study terms: its init label; students named by the cell's method."""
    out = []
    for row in rows:
        fields = row.as_dict()
        fields["init"] = cell.init_label
        if row.round > 0:
            fields["method"] = cell.method
        out.append(ResultRow(**fields))
    return out


#: The files that say a stage finished (``done.json``, a store's ``manifest.json``): linked last.
_MARKERS = ("done.json", "manifest.json")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-links (or copies) the files of a finished stage folder; checkpoints are not needed.

    The stage's marker goes last and a copy is renamed into place, so a study killed midway
    leaves a folder that is not taken for finished and holds no torn file.
    """
    for path in sorted(src.rglob("*"), key=lambda p: (p.name in _MARKERS, p)):
        rel = path.relative_to(src)
        if path.is_dir() or "checkpoints" in rel.parts or ".tmp-" in path.name:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:
                tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
                shutil.copy2(path, tmp)
                os.replace(tmp, target)


def _reuse(out: Path, cell: Cell) -> dict[str, str]:
    """Stages another cell already ran with the same config, linked into ``cell``'s folder.

    The teacher depends only on (init, augment, label fraction, seed), so every method's cell
    of one grid point trains the same one; the pseudo labels of the teacher are shared too.
    Files are reused only from stages that finished (``done.json``, a complete store).
    """
    folder, reused = cell_folder(out, cell), {}
    if "teach" in _STAGES[cell.method] and not (folder / "teach" / "done.json").exists():
        for method in METHODS:
            other = cell_folder(out, Cell(cell.init, cell.augment, cell.label_fraction, method, cell.seed))
            if other != folder and (other / "teach" / "done.json").exists():
                _link_tree(other / "teach", folder / "teach")
                reused["teach"] = other.name
                break
    if cell.method == "pretrain+self-training" and not (folder / "label" / "round-1" / "manifest.json").exists():
        other = cell_folder(out, Cell(cell.init, cell.augment, cell.label_fraction, "self-training", cell.seed))
        same_teacher = [f / "teach" / "model.safetensors" for f in (folder, other)]
        if (other / "label" / "round-1" / "manifest.json").exists() and all(p.exists() for p in same_teacher) \
                and os.path.samefile(*same_teacher):
            _link_tree(other / "label" / "round-1", folder / "label" / "round-1")
            reused["label"] = other.name
    return reused


def _probe_init(cfg: Config, folder: Path) -> None:
    """A ``linear-probe`` cell's run: the linear probe of its init (:func:`selftrain.transfer.probe_init`).

    Nothing trains but the probe, which takes seconds, so a killed cell simply measures again.
    """
    from selftrain.engine import build_runtime
    from selftrain.outputs import RunFolder
    from selftrain.pipeline import prepare_data
    from selftrain.transfer import probe_init

    run = RunFolder(folder)
    run.write_provenance(cfg)
    runtime = build_runtime(cfg.engine)
    rows = probe_init(cfg, run, prepare_data(cfg, run), runtime)
    ResultsTable(run.results).add(rows)


def run_cell(out: Path, base: dict[str, Any], cell: Cell) -> dict:
    """Runs (or resumes) one cell and writes its ``cell.json`` last; returns that record."""
    from selftrain.pipeline import run_pipeline

    done = finished(out, cell)
    if done is not None:
        return done
    folder = cell_folder(out, cell)
    start = time.time()
    cfg = cell_config(base, cell, out)
    reused = _reuse(out, cell) if cfg.student.rounds == 1 else {}
    if cell.method == "linear-probe":
        _probe_init(cfg, folder)
    else:
        run_pipeline(cfg, folder)
    rows = _relabel(read_results(folder / "results.csv"), cell)
    record = {"id": cell.id, **cell.axes(), "seconds": round(time.time() - start, 2), "reused": reused,
              "rows": [r.as_dict() for r in rows]}  # fmt: skip
    atomic_write_text(folder / "cell.json", json.dumps(record, indent=1))
    return record


def _die_with_parent() -> None:
    """In a child: be killed when the study process dies (Linux), so no orphan writes a cell."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        log.debug("no parent-death signal on this platform: an orphaned cell process may finish its cell")


def spawn_child(folder: Path, args: list[str], threads: int) -> subprocess.Popen:
    """``python -m ARGS`` with ``threads`` threads, logging to ``folder/cell.log``, killed with its parent."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(folder / "cell.log", "ab") as logfile:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)  # fmt: skip


def _spawn(out: Path, cell: Cell, threads: int) -> subprocess.Popen:
    return spawn_child(cell_folder(out, cell), ["selftrain.study", str(out), cell.id, str(threads)], threads)


def run_parallel(cells: list, jobs: int, spawn, folder, what: str = "study") -> list[str]:
    """Runs ``cells`` (anything with an ``id``) as ``spawn(cell, threads)`` child processes, at most ``jobs``
    at a time, the CPU's threads shared among them; returns the ids of the cells that failed."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo, running, failed = list(cells), {}, []
    while todo or running:
        while todo and len(running) < jobs:
            cell = todo.pop(0)
            log.info("%s: cell %s (%d threads)", what, cell.id, threads)
            running[cell.id] = (cell, spawn(cell, threads))
        for cell_id, (cell, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[cell_id]
                if proc.returncode != 0:
                    failed.append(cell_id)
                    log.error("%s: cell %s failed (exit %d); see %s", what, cell_id, proc.returncode,
                              folder(cell) / "cell.log")  # fmt: skip
        time.sleep(0.2)
    return failed


def _run_parallel(out: Path, cells: list[Cell], jobs: int) -> list[str]:
    """Runs ``cells`` in at most ``jobs`` child processes; returns the ids of cells that failed."""
    return run_parallel(cells, jobs, lambda cell, threads: _spawn(out, cell, threads), lambda cell: cell_folder(out, cell))


def _pretrain(out: Path, base: dict[str, Any], cells: list[Cell], threads: int) -> None:
    """Runs each (init, seed) pretraining the cells need once, before the cells, with ``threads`` threads
    (a cell's share of the CPU, as ``--dry-run`` times it: more threads than cores a process can use
    well slow small networks down badly on a busy machine)."""
    import torch

    from selftrain.pipeline import run_pipeline

    previous = torch.get_num_threads()
    try:
        for rel in dict.fromkeys(c.pretrain_run for c in cells if c.pretrain_run):
            cell = next(c for c in cells if c.pretrain_run == rel)
            if not (out / rel / PRETRAIN_EXPORT).exists():
                log.info("study: pretraining %s (%d threads)", rel, threads)
                torch.set_num_threads(threads)
                run_pipeline(pretrain_config(base, cell.init, cell.seed), out / rel)
    finally:
        torch.set_num_threads(previous)


def _study_record(study: StudyConfig, base: dict[str, Any], cells: list[Cell]) -> dict:
    return {"name": study.name, "base": base, "grid": study.grid.model_dump(mode="json"),
            "cells": [{"id": c.id, **c.axes()} for c in cells]}  # fmt: skip


def _write_study(out: Path, record: dict) -> None:
    path = out / "study.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in ("base", "grid")} != {k: record[k] for k in ("base", "grid")}:
            raise ValueError(f"{out} holds a different study (see {path}); use another --out, or the same study to resume")
    atomic_write_text(path, json.dumps(record, indent=1))


def merge_results(out: Path, cells: list[Cell]) -> int:
    """Rebuilds ``OUT/results.csv`` from the finished cells, in grid order; returns the row count."""
    rows = [ResultRow(**r) for c in cells if (done := finished(out, c)) for r in done["rows"]]
    path = out / "results.csv"
    path.unlink(missing_ok=True)  # rebuilt, never appended to: the file is a function of the cells
    table = ResultsTable(path)
    table.add(rows)  # one row per identity: a teacher shared by several cells counts once
    return len(table.rows())


def run_study(study: StudyConfig, base: dict[str, Any], out: str | Path, *, jobs: int | None = None) -> dict:
    """Runs every unfinished cell (``jobs`` at a time), merges results.csv and writes the report.

    Returns:
        ``cells`` (all), ``ran`` (ids run now), ``failed`` (ids), ``rows`` (in results.csv).
    """
    from selftrain.report import build_report

    out = Path(out)
    cells = validate(study, base, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_study(out, _study_record(study, base, cells))
    # Methods in order, so a self-training cell finds the teacher of its finetune cell finished.
    todo = sorted((c for c in cells if finished(out, c) is None), key=lambda c: METHODS.index(c.method))
    log.info("study %s: %d cells, %d finished, %d to run", study.name, len(cells), len(cells) - len(todo), len(todo))
    jobs = jobs or study.jobs
    _pretrain(out, base, todo, threads=max(1, (os.cpu_count() or 1) // jobs))
    failed: list[str] = []
    if jobs == 1:
        for i, cell in enumerate(todo, 1):
            log.info("study: cell %d/%d %s", i, len(todo), cell.id)
            run_cell(out, base, cell)
    else:
        failed = _run_parallel(out, todo, jobs)
    n_rows = merge_results(out, cells)
    build_report(out, title=f"selftrain study: {study.name}")
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; fix and run the study again to resume")
    return {"cells": [c.id for c in cells], "ran": [c.id for c in todo], "failed": failed, "rows": n_rows}


def _child(argv: list[str]) -> None:
    """``python -m selftrain.study OUT CELL_ID THREADS``: one cell, in a child process."""
    import torch

    out, cell_id, threads = Path(argv[0]), argv[1], int(argv[2])
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    record = json.loads((out / "study.json").read_text())
    (axes,) = [{k: v for k, v in c.items() if k != "id"} for c in record["cells"] if c["id"] == cell_id]
    run_cell(out, record["base"], Cell(**axes))


if __name__ == "__main__":
    _child(sys.argv[1:])
