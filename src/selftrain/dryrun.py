"""``study --dry-run``: every cell of a study with its estimated cost, from a short timing probe.

The probe runs a few real steps of every stage (teach, label, student, transfer, and the linear
probe of an init) with the study's base config on its real data, once per augmentation strength
of the grid (the strength changes the cost of a step), with the thread count the cells will
get; and a few steps of each pretraining the grid needs (once per pre-trained init: every seed
costs the same). A cell's estimate is the probe's fixed costs plus its per-step and per-image
costs times the cell's steps and pool; a pretraining run's is its fixed cost plus its per-step
cost times ``pretrain.steps``. The total is the pretraining runs (one after the other, before
the cells) plus the wall time of the cells on ``jobs`` workers.

Every estimate is given on two clocks. *Wall* seconds are what the study takes if the machine
stays as busy as it was during the probe; *CPU* seconds are the probe process's own CPU time
(all its threads), which other work on the machine does not inflate. On an otherwise idle
machine, a CPU-bound study takes about its CPU time or less (its threads can overlap).

Example:
    >>> study, base = load_study("configs/study/rethinking-fashion.yaml")
    >>> print(format_plan(dry_run(study, base, "runs/study")))
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftrain.config import build_config
from selftrain.study import METHODS, PRETRAIN_EXPORT, Cell, StudyConfig, cell_config, finished, pretrain_config, validate

#: The two clocks of every estimate: wall seconds as the probe measured them, and its CPU seconds.
CLOCKS = ("wall", "cpu")


@dataclass
class StageCosts:
    """Measured seconds of one augmentation strength on one clock: per step, per pool image, per model."""

    setup: float  # opening the sources, drawing the split, building and exporting the networks: once per cell
    teach_step: float
    label_image: float
    student_step: float
    transfer_model: float
    linear_probe: float  # the linear probe of an init: its features, the probe's training, the test set


@dataclass
class PretrainCosts:
    """Measured seconds of one pretraining method on one clock."""

    setup: float  # opening the sources, building the method, exporting the backbone, the online probe's test
    step: float


class _Laps:
    """(wall, CPU) seconds since the previous call; CPU is this process's time, all its threads."""

    def __init__(self) -> None:
        self.last = (time.perf_counter(), time.process_time())

    def __call__(self) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        lap, self.last = (now[0] - self.last[0], now[1] - self.last[1]), now
        return lap


def _per_step(wall_step: float, lap: tuple[float, float]) -> dict[str, float]:
    """A training loop's seconds per step on both clocks: CPU in the stage's CPU-to-wall proportion."""
    return {"wall": wall_step, "cpu": wall_step * lap[1] / max(lap[0], 1e-9)}


@contextlib.contextmanager
def _probe_run(cfg, threads: int) -> Iterator[tuple]:
    """A throwaway run folder of ``cfg`` on ``threads`` threads, its data prepared: yields
    (run, runtime, data, laps, the setup's lap)."""
    import tempfile

    import torch

    from selftrain.engine import build_runtime
    from selftrain.outputs import RunFolder
    from selftrain.pipeline import prepare_data

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="selftrain-probe-") as tmp:
            run = RunFolder(tmp)
            run.write_provenance(cfg)
            runtime = build_runtime(cfg.engine)
            lap = _Laps()
            data = prepare_data(cfg, run)
            yield run, runtime, data, lap, lap()
    finally:
        torch.set_num_threads(previous)


def probe_costs(study: StudyConfig, base: dict[str, Any], augment: str, threads: int, linear: bool = True) -> dict[str, StageCosts]:
    """Times a few real steps of every stage with the base config on its real data; one StageCosts per clock.

    ``linear``: time the linear probe of an init too (it does not depend on the augmentation; else 0).
    """
    from selftrain import label, student, teach, transfer

    k = study.probe.steps
    sets = [f"teach.steps={k}", f"student.steps={k}", f"teach.augment={augment}", f"student.augment={augment}",
            f"data.label_fraction={max(study.grid.label_fraction)!r}", f"data.pool_limit={study.probe.pool}",
            "engine.progress=false", f"engine.checkpoint_every={10 * k}", "student.rounds=1"]  # fmt: skip
    cfg = build_config(base, sets, source="probe")
    with _probe_run(cfg, threads) as (run, runtime, data, lap, setup):
        teach.teach(cfg, run, data, runtime)
        teach_lap = lap()
        label.label(cfg, run, data, runtime, 1)
        label_lap = lap()
        student.student(cfg, run, data, runtime, 1)
        student_lap = lap()
        transfer.transfer(cfg, run, data, runtime)
        transfer_lap = lap()
        if linear:
            transfer.probe_init(cfg, run, data, runtime)
        linear_lap = lap() if linear else (0.0, 0.0)
        # Per step from the loop's own clock, past its first step (allocation, lazy imports).
        teach_step = _per_step(_step_seconds(run.root / "teach"), teach_lap)
        student_step = _per_step(_step_seconds(run.root / "student" / "round-1"), student_lap)
    costs = {}
    for i, clock in enumerate(CLOCKS):
        fixed = teach_lap[i] - teach_step[clock] * k + student_lap[i] - student_step[clock] * k  # building, exporting
        costs[clock] = StageCosts(setup[i] + fixed, teach_step[clock], label_lap[i] / max(1, len(data.pool_idx)),
                                  student_step[clock], transfer_lap[i] / 2, linear_lap[i])  # fmt: skip
    return costs


def probe_pretrain(study: StudyConfig, base: dict[str, Any], init: str, threads: int) -> dict[str, PretrainCosts]:
    """Times a few real steps of the pretraining of ``init`` on its real data; one PretrainCosts per clock."""
    from selftrain import pretrain

    k = study.probe.steps
    sets = [f"pretrain.steps={k}", "engine.progress=false", f"engine.checkpoint_every={10 * k}"]
    cfg = pretrain_config(base, init, study.grid.seed[0], sets)
    with _probe_run(cfg, threads) as (run, runtime, data, lap, setup):
        pretrain.pretrain(cfg, run, data, runtime)
        train = lap()
        step = _per_step(_step_seconds(run.root / "pretrain"), train)
    return {clock: PretrainCosts(setup[i] + train[i] - step[clock] * k, step[clock]) for i, clock in enumerate(CLOCKS)}


def _step_seconds(folder: Path) -> float:
    """Seconds per training step from a ``metrics.jsonl`` (cumulative ``seconds`` per logged step)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = records[0], records[-1]
    return (last["seconds"] - first["seconds"]) / max(1, last["step"] - first["step"])


def _pool_size(base: dict[str, Any], fraction: float) -> int:
    """Pool images a cell labels: the labeled source outside its split, or the unlabeled source."""
    from selftrain.data import build_source

    cfg = build_config(base, [f"data.label_fraction={fraction!r}"])
    d = cfg.data
    if not d.unlabeled:
        return 0
    if d.unlabeled == d.labeled:
        n = len(build_source(d.labeled, image_size=d.image_size, channels=d.channels, progress=False))
        n -= round(n * fraction)
    else:
        n = len(build_source(d.unlabeled, image_size=d.image_size, channels=d.channels, progress=False))
    return min(n, d.pool_limit) if d.pool_limit else n


def _startup_seconds() -> dict[str, float]:
    """What starting a child process costs: the interpreter and the imports of a cell (CPU: the child's)."""
    start, children = time.perf_counter(), os.times()
    subprocess.run([sys.executable, "-c", "import selftrain.pipeline, selftrain.student, selftrain.transfer"], check=True)
    after = os.times()
    cpu = after.children_user - children.children_user + after.children_system - children.children_system
    return {"wall": time.perf_counter() - start, "cpu": cpu}


def _makespan(seconds: list[float], jobs: int) -> float:
    """Wall time of running tasks longest-first on ``jobs`` workers, each taking the next free one."""
    workers = [0.0] * jobs
    for s in sorted(seconds, reverse=True):
        workers[workers.index(min(workers))] += s
    return max(workers)


def _cell_seconds(cell: Cell, cfg, c: StageCosts, pool: int, shared: bool) -> float:
    """One cell's seconds on one clock; ``shared``: a sibling cell trained its teacher (and labels)."""
    if cell.method == "linear-probe":
        return c.setup + c.linear_probe
    seconds = c.setup + c.transfer_model + (0.0 if shared else c.teach_step * cfg.teach.steps)
    if "student" in cfg.stages:
        seconds += 0.0 if shared and cell.method == "pretrain+self-training" else c.label_image * pool
        seconds += (c.student_step * cfg.student.steps + c.transfer_model) * cfg.student.rounds
        seconds += c.label_image * pool * (cfg.student.rounds - 1)
    return seconds


def dry_run(study: StudyConfig, base: dict[str, Any], out: str | Path, *, jobs: int | None = None) -> dict:
    """Lists the cells and pretraining runs with a cost estimate from a timing probe; trains nothing, writes nothing.

    Each cell's estimate is the probe's setup time plus its per-step and per-image costs times
    the cell's steps and pool (plus a child process start when ``jobs > 1``); a cell that
    reuses the teacher (and pseudo labels) of an earlier cell of its grid point does not pay
    for them. Finished cells and pretraining runs of an existing study in ``out`` are listed as
    done and cost nothing. ``seconds`` are wall seconds, ``cpu_seconds`` CPU seconds.
    """
    out = Path(out)
    cells = validate(study, base, out)
    jobs = jobs or study.jobs
    threads = max(1, (os.cpu_count() or 1) // jobs)
    trained = [c.augment for c in cells if c.method != "linear-probe"] or study.grid.augment[:1]
    probed = any(c.method == "linear-probe" for c in cells)
    costs = {a: probe_costs(study, base, a, threads, linear=probed and i == 0) for i, a in enumerate(dict.fromkeys(trained))}
    if probed:
        costs.setdefault("none", next(iter(costs.values())))  # linear-probe cells: setup and the probe, timed once
    runs = {c.pretrain_run: c for c in cells if c.pretrain_run}
    pretrain_costs = {i: probe_pretrain(study, base, i, threads) for i in dict.fromkeys(c.init for c in runs.values())}
    pools = {f: _pool_size(base, f) for f in study.grid.label_fraction}
    startup = _startup_seconds() if jobs > 1 else dict.fromkeys(CLOCKS, 0.0)
    rows, pending, teachers = [], [], set()
    for cell in sorted(cells, key=lambda c: METHODS.index(c.method)):  # the order cells run in
        cfg = cell_config(base, cell, out)
        point = (cell.init, cell.augment, cell.label_fraction, cell.seed)
        shared = point in teachers and cfg.student.rounds == 1  # teacher (and labels) of a sibling cell
        if "teach" in cfg.stages:
            teachers.add(point)
        est = {k: startup[k] + _cell_seconds(cell, cfg, costs[cell.augment][k], pools[cell.label_fraction], shared)
               for k in CLOCKS}  # fmt: skip
        status = "done" if finished(out, cell) else "to run"
        if status == "to run":
            pending.append(est)
        rows.append({"id": cell.id, **cell.axes(), "teach_steps": cfg.teach.steps if "teach" in cfg.stages else 0,
                     "student_steps": cfg.student.steps if "student" in cfg.stages else 0,
                     "seconds": est["wall"], "cpu_seconds": est["cpu"], "status": status})  # fmt: skip
    order = {c.id: i for i, c in enumerate(cells)}
    rows.sort(key=lambda r: order[r["id"]])
    pretraining = []
    for rel, cell in sorted(runs.items()):
        steps = pretrain_config(base, cell.init, cell.seed).pretrain.steps
        est = {k: pretrain_costs[cell.init][k].setup + pretrain_costs[cell.init][k].step * steps for k in CLOCKS}
        status = "done" if (out / rel / PRETRAIN_EXPORT).exists() else "to run"
        pretraining.append({"id": rel, "init": cell.init, "seed": cell.seed, "steps": steps, "seconds": est["wall"],
                            "cpu_seconds": est["cpu"], "status": status})  # fmt: skip
    todo = [p for p in pretraining if p["status"] == "to run"]
    totals = {}
    for clock, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):
        cells_serial = sum(e[clock] for e in pending)
        pretrain_s = sum(p[key] for p in todo)  # in the study process, before the cells
        totals[clock] = {"cells": cells_serial, "pretrain": pretrain_s,
                         "total": pretrain_s + _makespan([e[clock] for e in pending], jobs)}  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cells": rows, "pretraining": pretraining, "jobs": jobs, "threads": threads, "load_average": load,
            "cpus": os.cpu_count(), "serial_seconds": totals["wall"]["cells"], "pretrain_seconds": totals["wall"]["pretrain"],
            "wall_seconds": totals["wall"]["total"], "cpu": totals["cpu"],
            "probe": {a: {k: vars(c) for k, c in by.items()} for a, by in costs.items()},
            "probe_pretrain": {i: {k: vars(c) for k, c in by.items()} for i, by in pretrain_costs.items()}}  # fmt: skip


def format_plan(plan: dict) -> str:
    """The dry run as a plain-text table and its totals on both clocks."""
    header = ["cell", "steps (teach/student)", "estimate", "CPU time", "status"]
    texts = [[p["id"], f"pretrain {p['steps']}", f"{p['seconds'] / 60:.1f} min", f"{p['cpu_seconds'] / 60:.1f} min", p["status"]]
             for p in plan["pretraining"]]  # fmt: skip
    for r in plan["cells"]:
        steps = "linear probe" if r["method"] == "linear-probe" else f"{r['teach_steps']}/{r['student_steps']}"
        texts.append([r["id"], steps, f"{r['seconds'] / 60:.1f} min", f"{r['cpu_seconds'] / 60:.1f} min", r["status"]])
    widths = [max(len(t[i]) for t in [header, *texts]) for i in range(len(header))]
    lines = ["  ".join(t.ljust(w) for t, w in zip(row, widths)).rstrip() for row in [header, *texts]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    todo = sum(r["status"] == "to run" for r in plan["cells"])
    runs = plan["pretraining"]
    pretrain = f"; {len(runs)} pretraining run(s), {sum(p['status'] == 'to run' for p in runs)} to run" if runs else ""
    cpu = plan["cpu"]
    lines.append(
        f"{len(plan['cells'])} cells, {todo} to run{pretrain}: estimated {plan['wall_seconds'] / 60:.0f} min on "
        f"{plan['jobs']} job(s) of {plan['threads']} thread(s) ({plan['serial_seconds'] / 60:.0f} min of cell time"
        + (f", {plan['pretrain_seconds'] / 60:.0f} min of pretraining)" if runs else ")")
    )
    lines.append(
        f"CPU time: {cpu['total'] / 60:.0f} min ({cpu['cells'] / 60:.0f} min of cell time"
        + (f", {cpu['pretrain'] / 60:.0f} min of pretraining" if runs else "")
        + f"); the probe got {cpu['total'] / max(plan['wall_seconds'], 1e-9):.2f} CPU-seconds per wall second. "
        "On an otherwise idle machine the study takes about its CPU time or less"
    )
    if plan.get("load_average") is not None:
        lines.append(f"measured with a load average of {plan['load_average']:.1f} on {plan['cpus']} CPUs: "
                     "other work on the machine slows the probe and the study alike")  # fmt: skip
    return "\n".join(lines)
