"""``must-transfer``: the MuST transfer benchmark (Ghiasi et al. 2021, Table 2).

The multi-task student's backbone is measured by transfer to downstream tasks that no teacher
was trained on (``must.transfer.downstream``), against other ways of getting a backbone
(``must.transfer.inits``), each one a row of the table and the ``init`` column of ``results.csv``:

``random``
    no pre-training.
``supervised``
    the backbone of one teacher (``must.transfer.supervised``; default the first classification
    teacher with selftrain weights): supervised pre-training on that teacher's source task.
``self-training:<teacher>`` (``self-training`` alone: one per teacher)
    a *single-task student*: the MuST student with that teacher's head only, trained on that
    teacher's columns of the same store (pseudo labels and ground truth), with the same steps,
    batch size, augmentation, optimizer and seed as the multi-task student. It is cheaper than a
    separate single-task pipeline and a fairer comparison: the only difference to ``must`` is the
    number of tasks.
``must``
    the multi-task student's backbone (``OUT/must/student/backbone.safetensors``).
``ssl:<method>``
    the pretrain stage (``pretrain:`` settings, that method) on the unlabeled pool.

Every pre-training runs once, with the run's seed; the benchmark's ``seeds`` are downstream seeds
(the labeled subset, the new head's initialization and the batch order), as in the MuST and FRL
evaluations. Each (init, downstream task, seed) is a *cell*: a run folder whose ``cell.json``,
written last and atomically, marks it finished, so a killed benchmark resumes without re-running
a finished cell. ``finetune`` trains the whole network from the init with the teach stage
(``model.weights`` = the backbone) and measures it on the task's test set; ``linear`` trains a
linear classifier on the frozen backbone's pooled features (:func:`selftrain.transfer.linear_probe`).

::

    OUT/must/benchmark/
      plan.json                          the cells, in table order
      backbones/supervised/              backbone.safetensors: the chosen teacher's backbone
      backbones/self-training-<name>/    a single-task student (model, backbone, checkpoints, done.json)
      backbones/ssl-<method>/            a pretrain run (pretrain/backbone.safetensors)
      cells/<init>_<downstream>_seed<s>/ a run folder (teach/ for finetune) and cell.json

Rows go to ``OUT/results.csv`` with stage ``must-transfer``, method ``finetune`` or ``linear``;
:mod:`selftrain.must.benchmark_report` turns them into the report's "MuST transfer" table.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from selftrain.atomic import atomic_write_text
from selftrain.backbones import _classifier_keys
from selftrain.checkpoint import save_weights
from selftrain.config import Config, ConfigError, DownstreamConfig, MustTeacherConfig, build_config
from selftrain.engine import Runtime
from selftrain.must.benchmark_report import STAGE
from selftrain.must.student import must_student, student_dir
from selftrain.must.teachers import open_pool, single_task_raw
from selftrain.must.transfer import transfer_backbones
from selftrain.network import Network, load_network
from selftrain.outputs import RunFolder
from selftrain.results import ResultRow, ResultsTable

log = logging.getLogger("selftrain.must")


@dataclass(frozen=True)
class BenchmarkCell:
    """One (init, downstream task, seed): a run folder of its own."""

    init: str
    downstream: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.init.replace(':', '-')}_{self.downstream}_seed{self.seed}"


def benchmark_dir(run: RunFolder) -> Path:
    return run.root / "must" / "benchmark"


def expand_inits(cfg: Config) -> list[str]:
    """The table's rows: ``self-training`` becomes ``self-training:<teacher>`` for every teacher."""
    out = []
    for init in cfg.must.transfer.inits:
        out += [f"self-training:{t.key}" for t in cfg.must.teachers] if init == "self-training" else [init]
    return list(dict.fromkeys(out))


def plan_cells(cfg: Config) -> list[BenchmarkCell]:
    """Every cell, in table order: init, then downstream task, then seed."""
    t = cfg.must.transfer
    return [BenchmarkCell(init, d.key, seed) for init in expand_inits(cfg) for d in t.downstream for seed in t.seeds]


def supervised_teacher(cfg: Config) -> MustTeacherConfig:
    """The teacher whose backbone is the ``supervised`` init (see the module docstring)."""
    teachers = cfg.must.teachers
    if cfg.must.transfer.supervised is not None:
        chosen = next(t for t in teachers if t.key == cfg.must.transfer.supervised)
        if chosen.kind not in ("train", "checkpoint"):
            raise ConfigError(f"must.transfer.supervised: teacher {chosen.key!r} is a {chosen.kind} teacher; "
                              "the supervised init needs selftrain weights (spec train or checkpoint:PATH)")  # fmt: skip
        return chosen
    own = [t for t in teachers if t.kind in ("train", "checkpoint")]
    if not own:
        raise ConfigError("must.transfer.inits: supervised needs a teacher with selftrain weights (spec train or "
                          "checkpoint:PATH); none is declared")  # fmt: skip
    return next((t for t in own if t.task == "classification"), own[0])


def downstream_config(cfg: Config, d: DownstreamConfig, seed: int, weights: Path | None) -> Config:
    """The single-task run of one cell: ``d``'s task learnt from the init ``weights`` (None: random)."""
    raw = single_task_raw(cfg, d.task, d.data, d.test, d.label_fraction, d.image_size, None)
    raw["seed"] = seed
    raw["model"]["weights"] = None if weights is None else str(weights)
    raw["teach"].update(steps=d.steps, batch_size=d.batch_size, augment=d.augment)
    if d.lr is not None:
        raw["teach"]["optim"]["lr"] = d.lr
    return build_config(raw, source=f"must.transfer.downstream {d.key}")


def check_benchmark(cfg: Config) -> list[BenchmarkCell]:
    """Builds every cell's config (and picks the supervised teacher) before anything trains, so a bad
    benchmark section fails at once rather than after the teachers and the student."""
    if not cfg.must.transfer.downstream:
        raise ConfigError("must.transfer.downstream: no downstream task declared (see configs/must/demo.yaml)")
    if "supervised" in cfg.must.transfer.inits:
        supervised_teacher(cfg)
    cells = plan_cells(cfg)
    for d in cfg.must.transfer.downstream:
        downstream_config(cfg, d, cfg.must.transfer.seeds[0], None)
    return cells


# ----------------------------------------------------------------------------- backbones


def export_backbone(model: Path, out: Path) -> Path:
    """A selftrain network's backbone alone (classifier dropped), under the names ``model.weights`` loads."""
    if out.exists():
        return out
    net = load_network(model)
    state = net.backbone.state_dict()
    if net.head is None:  # classification: the source task's classifier must not reach the new task
        state = {k: v for k, v in state.items() if k not in _classifier_keys(net.backbone)}
    else:
        state = {k.removeprefix(net.backbone.weight_prefix): v for k, v in state.items()}
    save_weights(out, state, metadata={"backbone": net.spec.backbone, "source": str(model)})
    return out


def single_task_student(cfg: Config, run: RunFolder, runtime: Runtime, key: str) -> Path:
    """Trains (or reuses) the single-task student of teacher ``key``; returns its backbone."""
    raw = cfg.model_dump(mode="json")
    raw["must"]["teachers"] = [t for t in raw["must"]["teachers"] if (t["name"] or t["task"]) == key]
    raw["must"]["transfer"] = {}
    if cfg.must.transfer.single_task_steps:
        raw["must"]["student"]["steps"] = cfg.must.transfer.single_task_steps
    sub = build_config(raw, source=f"single-task student {key}")
    folder = benchmark_dir(run) / "backbones" / f"self-training-{key}"
    RunFolder(folder).write_provenance(sub)
    log.info("must-transfer: single-task student of %s", key)
    try:
        must_student(sub, run, runtime, folder=folder)
    except ValueError as err:  # e.g. no pseudo label of this teacher passes its threshold
        raise ValueError(f"the single-task student of teacher {key!r} cannot train: {err}; lower its threshold, or "
                         f"leave self-training:{key} out of must.transfer.inits") from None  # fmt: skip
    return folder / "backbone.safetensors"


def ssl_backbone(cfg: Config, run: RunFolder, runtime: Runtime, method: str) -> Path:
    """The pretrain stage with ``method`` on the pool (or ``pretrain.data``); returns its backbone."""
    from selftrain.pipeline import PreparedData
    from selftrain.pretrain import pretrain

    raw = cfg.model_dump(mode="json", exclude={"must"})
    raw["stages"] = ["pretrain"]
    raw["pretrain"]["method"] = method
    sub = build_config(raw, source=f"ssl:{method} pretraining")
    folder = RunFolder(benchmark_dir(run) / "backbones" / f"ssl-{method}")
    folder.write_provenance(sub)
    pool, idx = open_pool(cfg)
    sample = pool.load_batch(idx[:1])
    empty = idx[:0]
    data = PreparedData(pool, empty, pool, idx, None, empty, list(pool.classes or []), int(sample.shape[1]), int(sample.shape[-1]))
    return pretrain(sub, folder, data, runtime)


def init_weights(cfg: Config, run: RunFolder, runtime: Runtime, init: str) -> Path | None:
    """The backbone file of row ``init`` (None for ``random``), trained first where it is missing."""
    if init == "random":
        return None
    found = transfer_backbones(run, cfg)
    if init == "must":
        if "must" not in found:
            raise FileNotFoundError(f"{student_dir(run) / 'backbone.safetensors'} is missing: run the MuST student first "
                                    "(selftrain must or must-student)")  # fmt: skip
        return found["must"]
    if init == "supervised":
        key = supervised_teacher(cfg).key
        if f"supervised:{key}" not in found:
            raise FileNotFoundError(f"teacher {key}'s weights are missing: run must-label first (it trains the teachers)")
        return export_backbone(found[f"supervised:{key}"], benchmark_dir(run) / "backbones" / "supervised" / "backbone.safetensors")
    kind, _, arg = init.partition(":")
    if kind == "self-training":
        return single_task_student(cfg, run, runtime, arg)
    return ssl_backbone(cfg, run, runtime, arg)


# ----------------------------------------------------------------------------- cells


def cell_folder(run: RunFolder, cell: BenchmarkCell) -> Path:
    return benchmark_dir(run) / "cells" / cell.id


def finished(run: RunFolder, cell: BenchmarkCell) -> dict | None:
    """The cell's ``cell.json`` when it is finished, else None."""
    try:
        return json.loads((cell_folder(run, cell) / "cell.json").read_text())
    except (OSError, ValueError):
        return None


def run_cell(cfg: Config, run: RunFolder, runtime: Runtime, cell: BenchmarkCell, weights: Path | None) -> dict:
    """Fine-tunes or probes one init on one downstream task and seed; writes ``cell.json`` last."""
    from selftrain.pipeline import prepare_data
    from selftrain.tasks import build_task
    from selftrain.teach import network_spec, teach
    from selftrain.transfer import evaluate, linear_probe

    if (done := finished(run, cell)) is not None:
        return done
    d = next(t for t in cfg.must.transfer.downstream if t.key == cell.downstream)
    sub = downstream_config(cfg, d, cell.seed, weights)
    folder = RunFolder(cell_folder(run, cell))
    folder.write_provenance(sub)
    data = prepare_data(sub, folder)
    task = build_task(d.task, data.labeled)
    start = time.time()
    if d.protocol == "finetune":
        path = teach(sub, folder, data, runtime)
        seconds = float(json.loads(path.with_suffix(".json").read_text()).get("seconds", 0.0))
        metrics = evaluate(load_network(path), task, data.test, data.test_idx, runtime, cfg.engine.eval_batch_size)
    else:
        torch.manual_seed(cell.seed)
        net = Network(network_spec(sub, data), weights=None if weights is None else str(weights))
        lr = d.lr or cfg.transfer.linear_lr
        metrics = linear_probe(net, task, (data.labeled, data.labeled_idx), (data.test, data.test_idx), runtime,
                               steps=d.steps, lr=lr, seed=cell.seed)  # fmt: skip
        seconds = time.time() - start
    rows = [ResultRow(stage=STAGE, method=d.protocol, init=cell.init, augment=d.augment if d.protocol == "finetune" else "none",
                      task=d.task, dataset=d.test, label_fraction=d.label_fraction, seed=cell.seed, round=0, metric=k,
                      value=round(float(v), 4), seconds=round(seconds, 2)) for k, v in metrics.items()]  # fmt: skip
    record = {**asdict(cell), "id": cell.id, "weights": None if weights is None else str(weights),
              "labeled": int(len(data.labeled_idx)), "seconds": round(time.time() - start, 2), "rows": [r.as_dict() for r in rows]}  # fmt: skip
    atomic_write_text(folder.root / "cell.json", json.dumps(record, indent=1))
    log.info("must-transfer: %s: %s", cell.id, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return record


def merge_rows(cfg: Config, run: RunFolder) -> list[ResultRow]:
    """Every finished cell's rows, in table order, merged into ``OUT/results.csv``."""
    rows = [ResultRow(**r) for c in plan_cells(cfg) if (done := finished(run, c)) for r in done["rows"]]
    ResultsTable(run.results).add(rows)
    return rows


def run_benchmark(cfg: Config, run: RunFolder, runtime: Runtime) -> list[ResultRow]:
    """Builds the backbones the unfinished cells need, runs those cells, merges their rows into results.csv."""
    cells = check_benchmark(cfg)
    atomic_write_text(benchmark_dir(run) / "plan.json", json.dumps([{"id": c.id, **asdict(c)} for c in cells], indent=1))
    todo = [c for c in cells if finished(run, c) is None]
    log.info("must-transfer: %d cells, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    weights = {init: init_weights(cfg, run, runtime, init) for init in dict.fromkeys(c.init for c in todo)}
    jobs = min(cfg.must.transfer.jobs, len(todo))
    if jobs > 1:
        from selftrain.study import run_parallel, spawn_child

        def spawn(cell: BenchmarkCell, threads: int):
            w = weights[cell.init]
            args = ["selftrain.must.benchmark", str(run.root), cell.id, str(threads), "-" if w is None else str(w)]
            return spawn_child(cell_folder(run, cell), args, threads)

        failed = run_parallel(todo, jobs, spawn, lambda cell: cell_folder(run, cell), "must-transfer")
        rows = merge_rows(cfg, run)
        if failed:
            raise RuntimeError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; fix and run again to resume")
        return rows
    for i, cell in enumerate(todo, 1):
        log.info("must-transfer: cell %d/%d %s", i, len(todo), cell.id)
        run_cell(cfg, run, runtime, cell, weights[cell.init])
    return merge_rows(cfg, run)


def _child(argv: list[str]) -> None:
    """``python -m selftrain.must.benchmark OUT CELL_ID THREADS WEIGHTS|-``: one cell, in a child process."""
    from selftrain.config import load_config
    from selftrain.engine import build_runtime

    out, cell_id, threads, weights = Path(argv[0]), argv[1], int(argv[2]), argv[3]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(out / "config.yaml")
    runtime = build_runtime(cfg.engine)
    if not cfg.engine.threads:
        torch.set_num_threads(threads)
    (cell,) = [c for c in plan_cells(cfg) if c.id == cell_id]
    run_cell(cfg, RunFolder(out), runtime, cell, None if weights == "-" else Path(weights))


if __name__ == "__main__":
    import sys

    _child(sys.argv[1:])

