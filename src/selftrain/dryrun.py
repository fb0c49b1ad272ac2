"""``study --dry-run``: every cell of a study with its estimated cost, from a short timing probe.

The probe runs a few real steps of every stage (teach, label, student, transfer) with the
study's base config on its real data, once per augmentation strength of the grid (the
strength changes the cost of a step), with the thread count the cells will get. A cell's
estimate is the probe's fixed costs plus its per-step and per-image costs times the cell's
steps and pool; the total is the wall time of the cells on ``jobs`` workers.

Example:
    >>> study, base = load_study("configs/study/rethinking-fashion.yaml")
    >>> print(format_plan(dry_run(study, base, "runs/study")))
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftrain.config import build_config
from selftrain.study import METHODS, StudyConfig, cell_config, finished, validate

@dataclass
class StageCosts:
    """Measured seconds of one augmentation strength: per step, per pool image, per model."""

    setup: float  # opening the sources, drawing the split, scanning the images: once per cell
    teach_step: float
    label_image: float
    student_step: float
    transfer_model: float


def probe_costs(study: StudyConfig, base: dict[str, Any], augment: str, threads: int) -> StageCosts:
    """Times a few real steps of every stage with the base config on its real data."""
    import tempfile

    import torch

    from selftrain import label, student, teach, transfer
    from selftrain.engine import build_runtime
    from selftrain.outputs import RunFolder
    from selftrain.pipeline import prepare_data

    k = study.probe.steps
    sets = [f"teach.steps={k}", f"student.steps={k}", f"teach.augment={augment}", f"student.augment={augment}",
            f"data.label_fraction={max(study.grid.label_fraction)!r}", f"data.pool_limit={study.probe.pool}",
            "engine.progress=false", f"engine.checkpoint_every={10 * k}", "student.rounds=1"]  # fmt: skip
    cfg = build_config(base, sets, source="probe")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="selftrain-probe-") as tmp:
            run = RunFolder(tmp)
            run.write_provenance(cfg)
            runtime = build_runtime(cfg.engine)
            clock = [time.perf_counter()]

            def lap() -> float:
                clock.append(time.perf_counter())
                return clock[-1] - clock[-2]

            data = prepare_data(cfg, run)
            setup = lap()
            teach.teach(cfg, run, data, runtime)
            teach_s = lap()
            label.label(cfg, run, data, runtime, 1)
            label_s = lap()
            student.student(cfg, run, data, runtime, 1)
            student_s = lap()
            transfer.transfer(cfg, run, data, runtime)
            transfer_s = lap()
            # Per step from the loop's own clock, past its first step (allocation, lazy imports).
            teach_step, student_step = _step_seconds(run.root / "teach"), _step_seconds(run.root / "student" / "round-1")
    finally:
        torch.set_num_threads(previous)
    fixed = teach_s - teach_step * k + student_s - student_step * k  # building, exporting the networks
    return StageCosts(setup + fixed, teach_step, label_s / max(1, len(data.pool_idx)), student_step, transfer_s / 2)


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


def _startup_seconds() -> float:
    """What starting a child process costs: the interpreter and the imports of a cell."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import selftrain.pipeline, selftrain.student, selftrain.transfer"], check=True)
    return time.perf_counter() - start


def _makespan(seconds: list[float], jobs: int) -> float:
    """Wall time of running tasks longest-first on ``jobs`` workers, each taking the next free one."""
    workers = [0.0] * jobs
    for s in sorted(seconds, reverse=True):
        workers[workers.index(min(workers))] += s
    return max(workers)


def dry_run(study: StudyConfig, base: dict[str, Any], out: str | Path, *, jobs: int | None = None) -> dict:
    """Lists the cells with a cost estimate from a timing probe; trains nothing, writes nothing.

    Each cell's estimate is the probe's setup time plus its per-step and per-image costs times
    the cell's steps and pool (plus a child process start when ``jobs > 1``); a cell that
    reuses the teacher (and pseudo labels) of an earlier cell of its grid point does not pay
    for them. Finished cells of an existing study in ``out`` are listed as done and cost nothing.
    """
    out = Path(out)
    cells = validate(study, base, out)
    jobs = jobs or study.jobs
    threads = max(1, (os.cpu_count() or 1) // jobs)
    costs = {a: probe_costs(study, base, a, threads) for a in dict.fromkeys(c.augment for c in cells)}
    pools = {f: _pool_size(base, f) for f in study.grid.label_fraction}
    startup = _startup_seconds() if jobs > 1 else 0.0
    rows, pending, teachers = [], [], set()
    for cell in sorted(cells, key=lambda c: METHODS.index(c.method)):  # the order cells run in
        cfg, c = cell_config(base, cell, out), costs[cell.augment]
        point = (cell.init, cell.augment, cell.label_fraction, cell.seed)
        shared = point in teachers and cfg.student.rounds == 1  # teacher (and labels) of a sibling cell
        teachers.add(point)
        seconds = startup + c.setup + c.transfer_model + (0.0 if shared else c.teach_step * cfg.teach.steps)
        if "student" in cfg.stages:
            labels = 0.0 if shared and cell.method == "pretrain+self-training" else c.label_image * pools[cell.label_fraction]
            seconds += labels + (c.student_step * cfg.student.steps + c.transfer_model) * cfg.student.rounds
            seconds += c.label_image * pools[cell.label_fraction] * (cfg.student.rounds - 1)
        status = "done" if finished(out, cell) else "to run"
        if status == "to run":
            pending.append(seconds)
        rows.append({"id": cell.id, **cell.axes(), "teach_steps": cfg.teach.steps,
                     "student_steps": cfg.student.steps if "student" in cfg.stages else 0,
                     "seconds": seconds, "status": status})  # fmt: skip
    order = {c.id: i for i, c in enumerate(cells)}
    rows.sort(key=lambda r: order[r["id"]])
    pretrain = sorted({c.pretrain_run for c in cells if c.pretrain_run})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cells": rows, "jobs": jobs, "threads": threads, "load_average": load, "cpus": os.cpu_count(), "serial_seconds": sum(pending),
            "wall_seconds": _makespan(pending, jobs), "probe": {a: vars(c) for a, c in costs.items()},
            "pretrain_runs_not_estimated": pretrain}  # fmt: skip


def format_plan(plan: dict) -> str:
    """The dry run as a plain-text table and a total."""
    header = ["cell", "steps (teach/student)", "estimate", "status"]
    texts = [[r["id"], f"{r['teach_steps']}/{r['student_steps']}", f"{r['seconds'] / 60:.1f} min", r["status"]]
             for r in plan["cells"]]  # fmt: skip
    widths = [max(len(t[i]) for t in [header, *texts]) for i in range(len(header))]
    lines = ["  ".join(t.ljust(w) for t, w in zip(row, widths)).rstrip() for row in [header, *texts]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    todo = sum(r["status"] == "to run" for r in plan["cells"])
    lines.append(
        f"{len(plan['cells'])} cells, {todo} to run: estimated {plan['wall_seconds'] / 60:.0f} min on "
        f"{plan['jobs']} job(s) of {plan['threads']} thread(s) ({plan['serial_seconds'] / 60:.0f} min of cell time)"
    )
    if plan.get("load_average") is not None:
        lines.append(f"measured with a load average of {plan['load_average']:.1f} on {plan['cpus']} CPUs: "
                     "other work on the machine slows the probe and the study alike")  # fmt: skip
    if plan["pretrain_runs_not_estimated"]:
        lines.append(f"plus {len(plan['pretrain_runs_not_estimated'])} pretraining run(s), not in the estimate")
    return "\n".join(lines)
