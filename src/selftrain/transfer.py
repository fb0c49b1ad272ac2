"""``transfer``: how good is a model, and how well does its backbone transfer?

Protocols:
    evaluate  the model as trained, on the held-out test set, with the task's metric
              (``top1``/``top5``; ``miou``; ``absrel``/``rmse``/``delta1``; ``ap``/``ap50``; ``nme``)
    linear    frozen backbone; a linear classifier on its pooled features (``linear.top1``)
    finetune  the whole backbone plus a new head, trained on a labeled split (``finetune.top1``);
              under torchrun the ranks share each batch (DDP), like teach

``linear`` and ``finetune`` are classification protocols (the config refuses them for dense tasks).

:func:`probe_init` measures a run's *init* instead, before any training: the backbone that
``model.weights`` names, or the random weights of the run's seed, frozen under the ``linear``
protocol on the run's labeled split (a study's ``linear-probe`` cells).

In a run, every model of the output folder is measured: the pretrain stage's backbone (method
``pretrain``; linear and finetune only), the teacher (method ``supervised``, round 0) and the
student of each round (method ``self-training``). The ``init`` column says where the teacher's and
students' weights started: ``random``, ``supervised`` / ``ssl:<method>`` (``model.weights: pretrain``)
or ``pretrained`` (a file). Each student's margin over the teacher of the same run (so the same
seed and split) is written too, as metric ``margin.<metric>`` = student - teacher: positive is
better, except for the errors (``margin.absrel``, ``margin.rmse``, ``margin.nme``), where negative is.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selftrain.atomic import atomic_write_text
from selftrain.config import Config
from selftrain.data import Source, build_source, labeled_subset
from selftrain.engine import Runtime
from selftrain.network import Network, load_network
from selftrain.outputs import RunFolder, read_done
from selftrain.results import PROBE_METHOD, ResultRow, ResultsTable, margin_rows
from selftrain.tasks import build_task

log = logging.getLogger("selftrain.transfer")


@torch.no_grad()
def predict(net: Network, source: Source, indices: np.ndarray, runtime: Runtime, batch_size: int, features: bool = False) -> torch.Tensor:
    """Logits (or pooled features) of ``net`` for ``source[indices]``, in order."""
    net.eval().to(runtime.device)
    out = []
    for start in range(0, len(indices), batch_size):
        x = runtime.images(source.load_batch(indices[start : start + batch_size]))
        with runtime.autocast():
            y = net.features(x) if features else net(x)
        out.append(y.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def evaluate(net: Network, task, source: Source, indices: np.ndarray, runtime: Runtime, batch_size: int = 1000) -> dict[str, float]:
    """The task's metrics of ``net`` on ``source[indices]`` (``task.build_metric()`` over batches)."""
    net.eval().to(runtime.device)
    meter = task.build_metric()
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        x = runtime.images(source.load_batch(idx))
        with runtime.autocast():
            outputs = net(x)
        meter.update(task.predict(outputs), task.metric_targets(source, idx))
    return meter.compute()


def linear_probe(net: Network, task, train: tuple[Source, np.ndarray], test: tuple[Source, np.ndarray], runtime: Runtime, *, steps: int, lr: float, seed: int) -> dict[str, float]:
    """Trains a linear classifier on frozen, standardized features (full batch AdamW)."""
    xtr = predict(net, *train, runtime, 1000, features=True)
    xte = predict(net, *test, runtime, 1000, features=True)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr = torch.tensor(train[0].labels[train[1]])
    torch.manual_seed(seed)
    head = nn.Linear(xtr.shape[1], task.num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return task.metrics(head(xte), torch.tensor(test[0].labels[test[1]]))


def finetune(net: Network, cfg: Config, data, runtime: Runtime, folder: Path) -> dict[str, float]:
    """Fine-tunes a copy of ``net`` with a new head on the transfer split, then evaluates it."""
    from selftrain.pipeline import PreparedData
    from selftrain.teach import train_supervised

    t = cfg.transfer
    source = data.labeled if t.data is None else build_source(t.data, image_size=data.image_size, channels=data.channels)
    idx = labeled_subset(source.labels, t.label_fraction, cfg.seed)
    tuned = copy.deepcopy(net)
    torch.manual_seed(cfg.seed)
    tuned.backbone.reset_classifier(len(source.classes))
    split = PreparedData(source, idx, None, idx[:0], data.test, data.test_idx, list(source.classes), data.channels, data.image_size)
    train_supervised(tuned, cfg, split, runtime, folder, steps=t.steps, batch_size=t.batch_size, augment=t.augment, optim=t.optim, desc="finetune", seed=cfg.seed)
    return evaluate(tuned, build_task(cfg.task, source), data.test, data.test_idx, runtime, cfg.engine.eval_batch_size)


def student_augment(cfg: Config) -> str:
    """The student's augmentation as the ``augment`` column says it: ``S1``, or ``S1 (pool S4)``
    when the pool images have their own view (``student.pool_augment``)."""
    s = cfg.student
    return s.augment if s.pool_augment in (None, s.augment) else f"{s.augment} (pool {s.pool_augment})"


def run_models(run: RunFolder, rounds: int) -> list[tuple[str, int, Path]]:
    """(method, round, weights) of every finished model in the run folder."""
    models = []
    teacher = run.root / "teach" / "model.safetensors"
    if teacher.exists():
        models.append(("supervised", 0, teacher))
    for r in range(1, rounds + 1):
        path = run.root / "student" / f"round-{r}" / "model.safetensors"
        if path.exists():
            models.append(("self-training", r, path))
    return models


def pretrained_backbone(cfg: Config, run: RunFolder, data) -> tuple[Network, dict] | None:
    """The pretrain stage's backbone under a new classifier (for ``linear``/``finetune``) and its metadata.

    None when the run has no finished pretrain stage, or only ``evaluate`` is asked for (a
    backbone without its task's head has nothing to evaluate).
    """
    from selftrain.pretrain import BACKBONE_FILE
    from selftrain.teach import network_spec

    path = run.root / "pretrain" / BACKBONE_FILE
    if not (path.exists() and read_done(path.parent)) or not set(cfg.transfer.protocols) - {"evaluate"}:
        return None
    torch.manual_seed(cfg.seed)
    return Network(network_spec(cfg, data), weights=str(path)), json.loads(path.with_suffix(".json").read_text())


def measure(net: Network, cfg: Config, data, runtime: Runtime, folder: Path, name: str, protocols: list[str]) -> dict[str, float]:
    """The ``protocols`` metrics of ``net`` (``name`` tells fine-tuning folders apart)."""
    task = build_task(cfg.task, data.labeled)
    metrics: dict[str, float] = {}
    if "evaluate" in protocols:
        metrics.update(evaluate(net, task, data.test, data.test_idx, runtime, cfg.engine.eval_batch_size))
    if "linear" in protocols:
        src = data.labeled if cfg.transfer.data is None else build_source(cfg.transfer.data, image_size=data.image_size, channels=data.channels)
        idx = labeled_subset(src.labels, cfg.transfer.label_fraction, cfg.seed)
        probe = linear_probe(net, task, (src, idx), (data.test, data.test_idx), runtime, steps=cfg.transfer.steps, lr=cfg.transfer.linear_lr, seed=cfg.seed)
        metrics.update({f"linear.{k}": v for k, v in probe.items()})
    if "finetune" in protocols:
        tuned = finetune(net, cfg, data, runtime, folder / f"finetune-{name}")
        metrics.update({f"finetune.{k}": v for k, v in tuned.items()})
    return metrics


def probe_init(cfg: Config, run: RunFolder, data, runtime: Runtime) -> list[ResultRow]:
    """The linear probe of the run's init: how good are its features before any training?

    The backbone is ``model.weights`` (``pretrain``: this run's exported backbone) or, without
    weights, a random initialization drawn from the run's seed; a linear classifier is trained
    on its frozen, standardized features of the labeled split (the teacher's images) and
    measured on the test set. Rows: method ``linear-probe``, augment ``none`` (the probe sees
    clean images), round 0, metrics ``linear.<metric>``; not written anywhere.
    """
    from selftrain.pretrain import init_name, resolve_weights
    from selftrain.teach import network_spec

    if data.test is None:
        raise ValueError("transfer: the config has no held-out test set (data.test)")
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = Network(network_spec(cfg, data), weights=resolve_weights(cfg, run))
    task = build_task(cfg.task, data.labeled)
    probe = linear_probe(net, task, (data.labeled, data.labeled_idx), (data.test, data.test_idx), runtime,
                         steps=cfg.transfer.steps, lr=cfg.transfer.linear_lr, seed=cfg.seed)  # fmt: skip
    base = dict(stage="transfer", method=PROBE_METHOD, init=init_name(cfg), augment="none", task=cfg.task, dataset=cfg.data.test,
                label_fraction=cfg.data.label_fraction, seed=cfg.seed, round=0, seconds=round(time.perf_counter() - start, 2))  # fmt: skip
    log.info("transfer: linear probe of the init (%s): %s", init_name(cfg), ", ".join(f"{k} {v:.2f}" for k, v in probe.items()))
    return [ResultRow(metric=f"linear.{k}", value=round(float(v), 4), **base) for k, v in probe.items()]


def transfer(cfg: Config, run: RunFolder, data, runtime: Runtime) -> list[ResultRow]:
    """Measures every model of the run with the configured protocols; rows go to results.csv.

    A finished pretrain stage's backbone is measured too (``linear``/``finetune`` only), as
    method ``pretrain`` with its own init (``supervised`` or ``ssl:<method>``).
    """
    from selftrain.pretrain import init_name, pretrain_name

    if data.test is None:
        raise ValueError("transfer: the config has no held-out test set (data.test)")
    folder = run.stage("transfer")
    rows: list[ResultRow] = []
    common = dict(stage="transfer", task=cfg.task, dataset=cfg.data.test, label_fraction=cfg.data.label_fraction, seed=cfg.seed)
    pretrained = pretrained_backbone(cfg, run, data)
    if pretrained is not None:
        net, meta = pretrained
        augment = cfg.pretrain.augment if cfg.pretrain.method == "supervised" else "ssl"
        metrics = measure(net, cfg, data, runtime, folder, "pretrain", [p for p in cfg.transfer.protocols if p != "evaluate"])
        base = dict(method="pretrain", init=pretrain_name(cfg), augment=augment, round=0, seconds=round(float(meta.get("seconds", 0.0)), 2), **common)
        rows += [ResultRow(metric=k, value=round(float(v), 4), **base) for k, v in metrics.items()]
        log.info("transfer: pretrain (%s): %s", pretrain_name(cfg), ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    for method, round_, path in run_models(run, cfg.student.rounds):
        net = load_network(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        augment = cfg.teach.augment if round_ == 0 else student_augment(cfg)
        base = dict(method=method, init=init_name(cfg), augment=augment, round=round_, seconds=round(float(meta.get("seconds", 0.0)), 2), **common)
        metrics = measure(net, cfg, data, runtime, folder, f"{method}-r{round_}", cfg.transfer.protocols)
        rows += [ResultRow(metric=k, value=round(float(v), 4), **base) for k, v in metrics.items()]
        log.info("transfer: %s (round %d): %s", method, round_, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    margins = margin_rows(rows)
    for m in margins:
        log.info("transfer: %s (round %d) against the teacher: %s %+.4f", m.method, m.round, m.metric, m.value)
    rows += margins
    ranks = runtime.ranks  # under torchrun every rank measures (fine-tuning is shared); rank 0 writes
    if ranks.rank == 0:
        ResultsTable(run.results).add(rows)
        atomic_write_text(folder / "done.json", json.dumps({"rows": len(rows), "time": time.time()}))
    ranks.barrier()
    return rows
