"""Which process of a multi-process job this is, and how the processes wait for each other.

``torchrun`` starts one process per GPU (or CPU worker) and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` turns that into a
``torch.distributed`` process group (nccl on GPUs, gloo on CPUs) whose barriers time out
after ``SELFTRAIN_DIST_TIMEOUT`` seconds (default one hour) instead of hanging forever.
Ranks started some other way (a job array, one process per machine) can pass
:class:`Ranks` explicitly; without a process group they meet through files on a shared
folder (:func:`wait_for`), polled until the same timeout.
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
