"""A student interrupted after a checkpoint and resumed, for the resume-parity tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from selftrain.pipeline import run_pipeline


def resumed_student_weights(cfg, out: Path, last_step: int) -> dict[str, torch.Tensor]:
    """Runs ``cfg`` into ``out``, then undoes the student's end (its export, done mark and the
    checkpoint of ``last_step``) and resumes the student stage from the checkpoint before it.
    Returns the resumed run's exported weights."""
    run_pipeline(cfg, out)
    folder = out / "student/round-1"
    for name in ("done.json", "model.safetensors"):
        (folder / name).unlink()
    shutil.rmtree(folder / f"checkpoints/step-{last_step:07d}")
    run_pipeline(cfg, out, stages=["student"])
    return load_file(folder / "model.safetensors")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
