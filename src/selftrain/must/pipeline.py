"""``selftrain must``: the MuST stages in one output folder, each resumable.

::

    OUT/
      config.yaml, run.json      as for every run
      must/teach/<name>/         a sub-run per teacher with spec ``train`` (teach/model.safetensors ...)
      must/label/                the multi-task store (shard-*.parquet, skips/, manifest.json)
      must/student/              model.safetensors + model.json, backbone.safetensors, checkpoints/, done.json
      must/benchmark/            the transfer benchmark (``must.transfer``; :mod:`selftrain.must.benchmark`)
      results.csv                teachers and student heads on the teachers' test sets (stage ``must``),
                                 the benchmark's cells (stage ``must-transfer``)
      report.md, report.html     written by the ``transfer`` stage: the MuST transfer table and verdict
"""

from __future__ import annotations

import logging
from pathlib import Path

from selftrain.config import Config, ConfigError
from selftrain.distributed import current_ranks
from selftrain.engine import build_runtime
from selftrain.outputs import RunFolder

log = logging.getLogger("selftrain.must")

MUST_STAGES = ("label", "student", "transfer")


def run_must(cfg: Config, out: str | Path, *, stages: tuple[str, ...] | list[str] | None = None, resume: str = "auto") -> Path:
    """Runs the MuST ``stages`` into ``out``: ``label`` (trains the teachers that need it), ``student``, and
    ``transfer`` (the benchmark). By default all three, ``transfer`` only when ``must.transfer.downstream``
    declares tasks."""
    from selftrain.must.label import must_label
    from selftrain.must.student import must_student
    from selftrain.must.benchmark import check_benchmark, run_benchmark
    from selftrain.must.transfer import must_results
    from selftrain.report import build_report

    if (world_size := current_ranks().world_size) > 1:
        raise ValueError(f"{world_size} processes (torchrun): MuST runs in one process; run, pretrain, teach, label, student and transfer are the commands that run distributed")
    if not cfg.must.teachers:
        raise ConfigError("must.teachers: no teacher declared; MuST needs at least one (see configs/must/example.yaml)")
    todo = tuple(stages or (MUST_STAGES if cfg.must.transfer.downstream else MUST_STAGES[:2]))
    if unknown := [s for s in todo if s not in MUST_STAGES]:
        raise ValueError(f"unknown MuST stages {unknown}; known: {', '.join(MUST_STAGES)}")
    if "transfer" in todo:
        check_benchmark(cfg)
    run = RunFolder(out)
    if resume == "never" and run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(f"{run.root} is not empty and --resume never was given")
    run.write_provenance(cfg)
    runtime = build_runtime(cfg.engine)
    log.info("must %s: device %s, precision %s", run.root, runtime.device, runtime.precision)
    if "label" in todo:
        must_label(cfg, run, runtime)
    if "student" in todo:
        must_student(cfg, run, runtime)
        must_results(cfg, run, runtime)
    if "transfer" in todo:
        run_benchmark(cfg, run, runtime)
        build_report(run.root, title=f"selftrain MuST: {cfg.name}")
    return run.root
