"""The training loop shared by every training stage: device, precision, resume, NaN guard.

A plain, readable loop (nanoGPT style) rather than a framework: each stage hands it a
``step_fn(step) -> {"loss": tensor, ...}`` that builds its own batch, and the loop does the
rest: optimizer and schedule, atomic checkpoints every ``checkpoint_every`` steps, exact
resume (model, optimizer, schedule, RNG and loss-normalization state are all restored, and
batches are a pure function of ``(seed, step)``), non-finite loss detection, progress bar,
and ``metrics.jsonl``.

Under ``torchrun`` (a process group of ``WORLD_SIZE`` > 1, started by
:func:`selftrain.pipeline.run_pipeline`) the same loop runs on every rank, and PyTorch's
``DistributedDataParallel`` is the engine: the whole step runs as the forward pass of the
DDP-wrapped model, so its gradients are averaged over the ranks in backward. Each rank takes
an equal, disjoint share of every global batch (:class:`BatchIndices`), so the configured batch
is the global batch whatever the number of processes. Rank 0 alone writes checkpoints and
metrics; each rank's RNG stream is its own (seeded ``seed + rank * 1_000_003``) and is saved
in the checkpoint. Batch norm is per rank (each normalizes with its own share of the batch;
DDP copies rank 0's running statistics to the others at every step) unless
``engine.sync_batchnorm`` converts it to ``SyncBatchNorm`` (GPUs only).

Fault injection (tests only): ``SELFTRAIN_FAULT_NAN_STEPS`` lists steps whose loss is replaced
by NaN (``3,4`` or ``20-40``); it is read once per :func:`fit` call, so a normal run pays one
empty-set lookup per step. The fault suite (``tests/test_faults.py``) uses it to check that
skipped steps are counted and that repeated NaNs stop the run with the last good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from selftrain.atomic import atomic_write_text
from selftrain.checkpoint import CheckpointDir, save_weights
from selftrain.config import EngineConfig, OptimConfig
from selftrain.distributed import Ranks, collective_error, current_ranks, local_device, mean_over_ranks

log = logging.getLogger("selftrain.engine")

#: Test-only: the steps whose loss :func:`fit` replaces by NaN (see the module docstring).
FAULT_NAN_ENV = "SELFTRAIN_FAULT_NAN_STEPS"


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


@dataclass
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    precision: str
    channels_last: bool

    def autocast(self) -> torch.autocast:
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float in [0, 1] on the device (channels_last when enabled)."""
        x = batch.to(self.device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def ranks(self) -> Ranks:
        """This process's rank among the processes of the job (one process: rank 0 of 1)."""
        return current_ranks()


def _cpu_has_native_bf16() -> bool:
    # On AVX2-only CPUs bf16 autocast is emulated: measured 10x slower than fp32 for a small CNN.
    return torch.backends.cpu.get_cpu_capability() in ("AMX", "AVX512_BF16")


def build_runtime(cfg: EngineConfig) -> Runtime:
    """Resolves ``auto`` device and precision, and the CPU thread count."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "auto":
        device = local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        device = local_device(torch.device(cfg.device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is available")
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            precision = "bf16-mixed" if _cpu_has_native_bf16() else "32-true"
    return Runtime(device=device, precision=precision, channels_last=cfg.channels_last)


class BatchIndices:
    """This rank's share of batch ``step`` of an endless sequence of seeded epoch permutations of ``range(n)``.

    A pure function of ``(seed, step)``, so a resumed run draws exactly the batches that the
    uninterrupted run would have drawn. Every rank draws the same global batch of
    ``batch_size`` and takes the ``rank``-th of ``world_size`` equal, contiguous parts, so the
    processes of a job see disjoint images and together the batch one process would see.

    Raises:
        ValueError: ``batch_size`` does not split evenly over the ranks (named by ``what``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, ranks: Ranks | None = None, what: str = "batch_size") -> None:
        if n < 1:
            raise ValueError("cannot draw batches from an empty set")
        ranks = ranks or Ranks()
        if batch_size % ranks.world_size:
            raise ValueError(
                f"{what}={batch_size} does not split evenly over {ranks.world_size} processes: make it a multiple "
                f"of {ranks.world_size} (each process takes an equal, disjoint share of every batch)"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.share = batch_size // ranks.world_size
        self._first = ranks.rank * self.share
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __call__(self, step: int) -> torch.Tensor:
        start = step * self.batch_size + self._first
        out, pos = [], start
        while pos < start + self.share:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + self.share - pos)
            out.append(self._permutation(epoch)[offset : offset + take])
            pos += take
        return torch.cat(out)


def build_optimizer(params, cfg: OptimConfig, steps: int):
    """SGD (Nesterov) or AdamW; linear warmup, then cosine decay to zero or a constant rate."""
    decay = [p for p in params if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    warm = max(1, int(cfg.warmup * steps))

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return min(1.0, (step + 1) / warm) if cfg.warmup > 0 else 1.0
        if step < warm and cfg.warmup > 0:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class FitResult:
    steps: int
    seconds: float
    bad_steps: int
    resumed_from: int


RANK_SEED_STRIDE = 1_000_003  # rank r's RNG starts at seed + r * stride; rank 0 keeps the one-process stream


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gathered_rng_states(ranks: Ranks) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: every rank calls it)."""
    if ranks.world_size == 1:
        return [_rng_state()]
    import torch.distributed as dist

    states: list = [None] * ranks.world_size
    dist.all_gather_object(states, _rng_state())
    return states


def _restore_rng(state: dict, ranks: Ranks, seed: int, step: int, desc: str) -> None:
    """This rank's RNG stream as saved; reseeded (and warned about) if the job's size changed."""
    saved = state.get("rng_ranks") or [state["rng"]]
    if ranks.rank == 0:
        _set_rng_state(state["rng"])
    elif len(saved) == ranks.world_size:
        _set_rng_state(saved[ranks.rank])
    else:
        torch.manual_seed(seed + RANK_SEED_STRIDE * ranks.rank + step)
        log.warning("%s: the checkpoint was written by %d process(es), this job has %d: rank %d's augmentation "
                    "draws are reseeded, so they differ from an uninterrupted run", desc, len(saved), ranks.world_size, ranks.rank)  # fmt: skip


class _Step(nn.Module):
    """A whole training step as the forward pass of the module DDP wraps.

    DDP averages the gradients of the parameters a forward pass through it used. A stage's
    step is more than ``model(x)`` (a student's two kinds of labels, a pre-training method's
    views, momentum encoders and queues), so the step itself is that forward pass.
    """

    def __init__(self, model: nn.Module, step_fn: Callable[[int], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, step: int) -> dict[str, torch.Tensor]:
        return self.step_fn(step)


def _sync_batchnorm(model: nn.Module, engine: EngineConfig, ranks: Ranks) -> None:
    """Converts batch norm to SyncBatchNorm in place when asked for (GPUs only)."""
    if not engine.sync_batchnorm or ranks.world_size == 1:
        return
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(
            f"engine.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on {device.type} "
            "(gloo); set it false, and each process normalizes with its own share of the batch"
        )
    for name, child in model.named_children():
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def _distribute(model: nn.Module, step_fn, ranks: Ranks, find_unused_parameters: bool, desc: str):
    """``step_fn`` itself for one process; under a process group, the step run through DDP."""
    if ranks.world_size == 1:
        return step_fn
    if not ranks.grouped:
        raise RuntimeError(
            f"{desc}: WORLD_SIZE={ranks.world_size} but no torch.distributed process group is started; "
            "launch with `torchrun ... -m selftrain run CONFIG` (run_pipeline starts the group)"
        )
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # Construction broadcasts rank 0's parameters and buffers, so every rank starts alike.
    return DistributedDataParallel(
        _Step(model, step_fn), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )  # fmt: skip


def _all_finite(loss: torch.Tensor, ranks: Ranks) -> bool:
    """Whether the loss is finite on every rank (all must skip a step together, or backward hangs)."""
    finite = torch.isfinite(loss.detach()).all().float()
    return bool(mean_over_ranks(finite) == 1) if ranks.world_size > 1 else bool(finite)


def fault_nan_steps() -> frozenset[int]:
    """The steps named by ``SELFTRAIN_FAULT_NAN_STEPS`` (``3,4``, ``20-40``, or both mixed).

    Raises:
        ValueError: Naming the variable, when an entry is not a step or an ``a-b`` range.
    """
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in os.environ.get(FAULT_NAN_ENV, "").split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not (last.isdigit() and int(last) >= int(first))):
            raise ValueError(f"{FAULT_NAN_ENV}={os.environ[FAULT_NAN_ENV]!r}: expected steps like 3,4 or 20-40")
        steps.update(range(int(first), int(last or first) + 1))
    if steps:
        log.warning("%s: the loss of %d step(s) will be replaced by NaN (fault injection)", FAULT_NAN_ENV, len(steps))
    return frozenset(steps)


def fit(
    model: nn.Module,
    step_fn: Callable[[int], dict[str, torch.Tensor]],
    *,
    steps: int,
    optim: OptimConfig,
    engine: EngineConfig,
    out_dir: Path,
    seed: int,
    desc: str,
    stateful: dict[str, nn.Module] | None = None,
    params: list[nn.Parameter] | None = None,
    find_unused_parameters: bool = False,
) -> FitResult:
    """Trains ``model`` for ``steps`` optimizer steps, resuming from ``out_dir/checkpoints``.

    ``stateful`` modules (e.g. :class:`~selftrain.losses.LossNormalization`) are checkpointed
    with the model. When ``params`` is given only those are optimized (linear probing).
    Under a process group every rank calls it; ``find_unused_parameters`` is DDP's flag, for
    steps that leave some parameters without a gradient (an online probe without labels).
    """
    ranks = current_ranks()
    try:
        return _fit(model, step_fn, steps, optim, engine, out_dir, seed, desc, stateful or {}, params, find_unused_parameters, ranks)
    except RuntimeError as err:
        better = None if ranks.world_size == 1 or isinstance(err, TrainingDiverged) else collective_error(err, desc)
        if better is None:
            raise
        raise better from err


def _fit(model, step_fn, steps, optim, engine, out_dir, seed, desc, stateful, params, find_unused, ranks: Ranks) -> FitResult:
    from tqdm.auto import tqdm

    lead = ranks.rank == 0  # only rank 0 writes
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointDir(out_dir / "checkpoints")
    _sync_batchnorm(model, engine, ranks)
    opt, sched = build_optimizer(params if params is not None else list(model.parameters()), optim, steps)
    start, seconds, bad_total = 0, 0.0, 0
    torch.manual_seed(seed + RANK_SEED_STRIDE * ranks.rank)
    latest = ckpts.load_latest()
    if latest is not None:
        start, weights, state = latest
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for name, module in stateful.items():
            module.load_state_dict(state["stateful"][name])
        _restore_rng(state, ranks, seed, start, desc)
        seconds, bad_total = float(state["seconds"]), int(state["bad_steps"])
        log.info("%s: resuming at step %d of %d from %s", desc, start, steps, ckpts.root)
    forward = _distribute(model, step_fn, ranks, find_unused, desc)
    nan_steps = fault_nan_steps()
    metrics_path = out_dir / "metrics.jsonl"
    if lead:
        _truncate_metrics(metrics_path, start)

    def checkpoint(step: int) -> None:
        rng = _gathered_rng_states(ranks)  # every rank takes part; rank 0 writes
        state = {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng[0], "rng_ranks": rng,
            "stateful": {k: m.state_dict() for k, m in stateful.items()},
            "seconds": seconds, "bad_steps": bad_total, "step": step,
        }  # fmt: skip
        if lead:
            ckpts.save(step, model.state_dict(), state)

    model.train()
    bad_run, log_every = 0, max(1, min(50, steps // 20))
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not (engine.progress and lead), dynamic_ncols=True, leave=False)
    with open(metrics_path, "a") if lead else contextlib.nullcontext() as metrics:
        for step in bar:
            t0 = time.perf_counter()
            losses = forward(step)
            if step in nan_steps:
                losses["loss"] = losses["loss"].detach() * float("nan")
            loss = losses["loss"]
            if not _all_finite(loss, ranks):
                bad_run, bad_total = bad_run + 1, bad_total + 1
                opt.zero_grad(set_to_none=True)
                log.warning("%s: non-finite loss at step %d, step skipped (%d in a row)", desc, step, bad_run)
                if bad_run >= engine.max_bad_steps:
                    raise TrainingDiverged(
                        f"{desc}: {bad_run} consecutive non-finite losses at step {step}; "
                        f"the last good checkpoint is kept in {ckpts.root}"
                    )
                sched.step()
                continue  # no checkpoint in a NaN streak: the one before it must survive ``keep``
            bad_run = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seconds += time.perf_counter() - t0
            if (step + 1) % log_every == 0 or step + 1 == steps:
                row = _metrics_row(step + 1, sched.get_last_lr()[0], seconds, losses)
                if lead:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
            if (step + 1) % engine.checkpoint_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
    checkpoint(steps)
    return FitResult(steps=steps, seconds=seconds, bad_steps=bad_total, resumed_from=start)


def _metrics_row(step: int, lr: float, seconds: float, losses: dict[str, torch.Tensor]) -> dict:
    """One line of metrics.jsonl; each value is the mean over the ranks (the global batch's)."""
    values = mean_over_ranks(torch.stack([v.detach().float().reshape(()) for v in losses.values()]))
    row = {"step": step, "lr": lr, "seconds": round(seconds, 3)}
    row.update({k: float(v) for k, v in zip(losses, values.cpu())})
    return row


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines logged after ``step`` (from a run that died before its next checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def export_model(path: Path, model: nn.Module, meta: dict) -> None:
    """Writes the final weights as safetensors with their metadata beside them (JSON)."""
    save_weights(path, model.state_dict(), metadata={"selftrain": json.dumps(meta)})
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2))
