"""Measuring the MuST student and the hooks the transfer benchmark builds on.

:func:`must_results` measures, on each teacher's ``test`` set, the teacher (method ``supervised``,
round 0; only selftrain networks: ``train`` and ``checkpoint:`` teachers) and the student's head for
that task (method ``must``, init ``must``, round 1), as rows of ``results.csv`` with stage ``must``,
so ``selftrain report`` compares them per task.

The transfer benchmark (:mod:`selftrain.must.benchmark`) starts from :func:`transfer_backbones`:
the student's backbone (``OUT/must/student/backbone.safetensors``, under the names a plain backbone
has, so ``model.weights`` of any run loads it) and each selftrain teacher's weights, by init name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from selftrain.config import Config
from selftrain.data import build_source
from selftrain.engine import Runtime
from selftrain.must.network import HeadView, build_head_task, load_multitask_network
from selftrain.must.student import student_dir
from selftrain.must.teachers import teacher_weights
from selftrain.network import load_network
from selftrain.outputs import RunFolder
from selftrain.results import ResultRow, ResultsTable
from selftrain.tasks import build_task
from selftrain.transfer import evaluate

log = logging.getLogger("selftrain.must")


def transfer_backbones(run: RunFolder, cfg: Config) -> dict[str, Path]:
    """``{init: weights}`` to start a transfer run from: ``must`` (the student's backbone) and
    ``supervised:<teacher>`` (each selftrain teacher's weights), the ones that exist."""
    out = {}
    backbone = student_dir(run) / "backbone.safetensors"
    if backbone.exists():
        out["must"] = backbone
    for tcfg in cfg.must.teachers:
        path = teacher_weights(run, tcfg)
        if path is not None and path.exists():
            out[f"supervised:{tcfg.key}"] = path
    return out


def _measure(net, task, uri: str, image_size: int, channels: int, cfg: Config, runtime: Runtime) -> dict[str, float]:
    """The task's metrics of ``net`` on the whole test source ``uri`` at the model's image size."""
    test = build_source(uri, image_size=image_size, channels=channels, progress=False)
    task.check_source(test, "test")
    return evaluate(net, task, test, np.arange(len(test)), runtime, cfg.engine.eval_batch_size)


def must_results(cfg: Config, run: RunFolder, runtime: Runtime) -> list[ResultRow]:
    """Teachers and the student's heads on the teachers' test sets -> rows added to ``results.csv``."""
    path = student_dir(run) / "model.safetensors"
    student = load_multitask_network(path)
    seconds = float(json.loads(path.with_suffix(".json").read_text()).get("seconds", 0.0))
    heads = {h.key: h for h in student.spec.heads}
    rows: list[ResultRow] = []
    for tcfg in cfg.must.teachers:
        if not tcfg.test:
            continue
        base = dict(stage="must", task=tcfg.task, dataset=tcfg.test, label_fraction=tcfg.label_fraction, seed=cfg.seed)
        weights = teacher_weights(run, tcfg)
        if weights is not None:
            teacher = load_network(weights)
            meta = json.loads(weights.with_suffix(".json").read_text())
            task = build_task(tcfg.task, build_source(tcfg.data, progress=False)) if tcfg.data else build_head_task(heads[tcfg.key])
            metrics = _measure(teacher, task, tcfg.test, teacher.spec.image_size, teacher.spec.channels, cfg, runtime)
            init = "random" if cfg.model.weights is None or tcfg.kind == "checkpoint" else "pretrained"
            rows += [ResultRow(method="supervised", init=init, augment=cfg.teach.augment, round=0, metric=k,
                               value=round(float(v), 4), seconds=round(float(meta.get("seconds", 0.0)), 2), **base)
                     for k, v in metrics.items()]  # fmt: skip
        task = build_head_task(heads[tcfg.key])
        metrics = _measure(HeadView(student, tcfg.key), task, tcfg.test, student.spec.image_size, student.spec.channels, cfg, runtime)
        rows += [ResultRow(method="must", init="must", augment=cfg.must.student.augment, round=1, metric=k,
                           value=round(float(v), 4), seconds=round(seconds, 2), **base) for k, v in metrics.items()]  # fmt: skip
        log.info("must: %s on %s: %s", tcfg.key, tcfg.test, ", ".join(f"{r.method} {r.metric} {r.value:.3g}" for r in rows[-len(metrics):]))
    if rows:
        ResultsTable(run.results).add(rows)
    return rows
