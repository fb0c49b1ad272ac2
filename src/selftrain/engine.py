"""The training loop shared by every training stage: device, precision, resume, NaN guard.

A plain, readable loop (nanoGPT style) rather than a framework: each stage hands it a
``step_fn(step) -> {"loss": tensor, ...}`` that builds its own batch, and the loop does the
rest: optimizer and schedule, atomic checkpoints every ``checkpoint_every`` steps, exact
resume (model, optimizer, schedule, RNG and loss-normalization state are all restored, and
batches are a pure function of ``(seed, step)``), non-finite loss detection, progress bar,
and ``metrics.jsonl``.

Fault injection (tests only): ``SELFTRAIN_FAULT_NAN_STEPS`` lists steps whose loss is replaced
by NaN (``3,4`` or ``20-40``); it is read once per :func:`fit` call, so a normal run pays one
empty-set lookup per step. The fault suite (``tests/test_faults.py``) uses it to check that
skipped steps are counted and that repeated NaNs stop the run with the last good checkpoint kept.
"""

from __future__ import annotations

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
from selftrain.distributed import local_device

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
    """Batch ``step`` of an endless sequence of seeded epoch permutations of ``range(n)``.

    A pure function of ``(seed, step)``, so a resumed run draws exactly the batches that the
    uninterrupted run would have drawn.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("cannot draw batches from an empty set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __call__(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        out, pos = [], start
        while pos < start + self.batch_size:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + self.batch_size - pos)
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


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
) -> FitResult:
    """Trains ``model`` for ``steps`` optimizer steps, resuming from ``out_dir/checkpoints``.

    ``stateful`` modules (e.g. :class:`~selftrain.losses.LossNormalization`) are checkpointed
    with the model. When ``params`` is given only those are optimized (linear probing).
    """
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    stateful = stateful or {}
    ckpts = CheckpointDir(out_dir / "checkpoints")
    opt, sched = build_optimizer(params if params is not None else list(model.parameters()), optim, steps)
    start, seconds, bad_total = 0, 0.0, 0
    torch.manual_seed(seed)
    latest = ckpts.load_latest()
    if latest is not None:
        start, weights, state = latest
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for name, module in stateful.items():
            module.load_state_dict(state["stateful"][name])
        _set_rng_state(state["rng"])
        seconds, bad_total = float(state["seconds"]), int(state["bad_steps"])
        log.info("%s: resuming at step %d of %d from %s", desc, start, steps, ckpts.root)
    nan_steps = fault_nan_steps()
    metrics_path = out_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)

    def checkpoint(step: int) -> None:
        state = {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
            "stateful": {k: m.state_dict() for k, m in stateful.items()},
            "seconds": seconds, "bad_steps": bad_total, "step": step,
        }  # fmt: skip
        ckpts.save(step, model.state_dict(), state)

    model.train()
    bad_run, log_every = 0, max(1, min(50, steps // 20))
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not engine.progress, dynamic_ncols=True, leave=False)
    with open(metrics_path, "a") as metrics:
        for step in bar:
            t0 = time.perf_counter()
            losses = step_fn(step)
            if step in nan_steps:
                losses["loss"] = losses["loss"].detach() * float("nan")
            loss = losses["loss"]
            if not torch.isfinite(loss):
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
                row = {"step": step + 1, "lr": sched.get_last_lr()[0], "seconds": round(seconds, 3)}
                row.update({k: float(v.detach()) for k, v in losses.items()})
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            if (step + 1) % engine.checkpoint_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
    checkpoint(steps)
    return FitResult(steps=steps, seconds=seconds, bad_steps=bad_total, resumed_from=start)


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
