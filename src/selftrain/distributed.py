"""Which process of a multi-process job this is, and how the processes wait for each other.

``torchrun`` starts one process per GPU (or CPU worker) and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` turns that into a
``torch.distributed`` process group (nccl on GPUs, gloo on CPUs) whose barriers time out
after ``SELFTRAIN_DIST_TIMEOUT`` seconds (default one hour) instead of hanging forever.
Ranks started some other way (a job array, one process per machine) can pass
:class:`Ranks` explicitly; without a process group they meet through files on a shared
folder (:func:`wait_for`), polled until the same timeout.

The training stages use the process group through :func:`selftrain.engine.fit`
(DistributedDataParallel); :func:`mean_over_ranks` and :func:`collective_error` are its
helpers for values every rank must agree on and for failures of the other ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "SELFTRAIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


def _timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world_size``; ``timeout_s`` bounds every wait."""

    rank: int = 0
    world_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world_size {self.world_size}: need 0 <= rank < world_size")

    @property
    def grouped(self) -> bool:
        """Whether the ranks share an initialized process group (else they meet through files)."""
        return self.world_size > 1 and _group() and dist.get_world_size() == self.world_size

    def barrier(self) -> None:
        """Waits for every rank of the process group; a no-op without one."""
        if self.grouped:
            dist.barrier()


def env_rank() -> int:
    """``RANK`` as torchrun sets it (0 when unset): only rank 0 logs at INFO and writes provenance."""
    return int(os.environ.get("RANK", 0))


def current_ranks() -> Ranks:
    """The process group's ranks if one is initialized, else torchrun's variables, else one process."""
    if _group():
        return Ranks(dist.get_rank(), dist.get_world_size(), _timeout_s())
    return Ranks(env_rank(), int(os.environ.get("WORLD_SIZE", 1)), _timeout_s())


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index under torchrun -> this process's GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_from_env(device: torch.device) -> bool:
    """Starts the process group torchrun's variables describe; True if this call started it.

    Nothing happens for one process (no ``WORLD_SIZE`` above 1) or an existing group.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or _group():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=_timeout_s()))
    return True


def wait_for(ready: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Polls ``ready()`` until it is true.

    Raises:
        TimeoutError: After ``timeout_s`` seconds, naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(poll_s)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks of the process group (``values`` itself without one).

    Every rank must call it at the same point with a tensor of the same shape.
    """
    if not _group() or dist.get_world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


_COLLECTIVE_SIGNS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")


def collective_error(err: BaseException, what: str) -> RuntimeError | None:
    """A clearer error for ``err`` if it is a failed collective (a rank died or hung), else None.

    A rank killed mid-step closes its sockets and the others fail at once ("Connection closed
    by peer"); a rank that hangs makes them fail after ``SELFTRAIN_DIST_TIMEOUT`` seconds.
    """
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(s in str(err).lower() for s in _COLLECTIVE_SIGNS))):
        return None
    return RuntimeError(
        f"{what}: communication with the other processes failed (a rank died, or one waited longer than "
        f"{TIMEOUT_ENV}={_timeout_s():g} s); rerun the job to resume from the last checkpoint. Cause: {err}"
    )
