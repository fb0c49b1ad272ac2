"""Atomic, resumable checkpoints that never unpickle.

A checkpoint is a folder ``step-000250/`` with ``model.safetensors`` (weights) and
``state.pt`` (optimizer, scheduler, RNG and loop state: tensors and plain containers only,
read back with ``torch.load(weights_only=True)``). It is written under a temporary name and
renamed, so a killed run leaves either a whole checkpoint or none; a newest checkpoint that
fails to load (truncated disk, say) is reported and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from selftrain.atomic import atomic_write, fsync_dir

log = logging.getLogger("selftrain.checkpoint")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Exports weights as safetensors, atomically (shared storage is cloned, as safetensors requires)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads weights from safetensors, or from a torch file without unpickling code.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: The file is not a valid safetensors file (bad header, offsets outside the
            file, a pickle renamed ``.safetensors``) or not a plain tensor file; names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - SafetensorError is not exported in a stable place
            # Without this the error says "header too large" and nothing of which file.
            raise ValueError(f"{path}: not a valid safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means "not safe to load"
        raise ValueError(f"{path}: refused to load (not a plain tensor file; pickled code is never run): {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return state


class CheckpointDir:
    """The ``checkpoints/`` folder of one training stage; keeps the newest ``keep`` checkpoints."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob("step-*"):
            if p.is_dir() and p.name[5:].isdigit():
                found.append(int(p.name[5:]))
        return sorted(found)

    def save(self, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".step-{step:07d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(tmp / "model.safetensors", model_state)
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.root / f"step-{old:07d}", ignore_errors=True)
        return final

    def load_latest(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest checkpoint that loads, or None; unreadable newer ones are warned about."""
        for tmp in self.root.glob(".step-*.tmp-*") if self.root.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
        for step in reversed(self.steps()):
            folder = self.root / f"step-{step:07d}"
            try:
                weights = load_file(str(folder / "model.safetensors"))
                state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a damaged checkpoint must not end the run
                log.warning("checkpoint %s is unreadable (%s); falling back to an older one", folder, err)
                continue
            return step, weights, state
        return None
