"""Multi-task batches read from the MuST store: joint batches, or one task per step.

``must.student.sampling``:

``joint`` (default)
    Every student step draws ``must.student.batch_size`` pool images out of those that have at least
    one task, and every image brings all the tasks it has. Each task's loss is computed over the
    images of the batch that have it and averaged over them, so a task missing for an image
    contributes nothing (no zero target, no gradient). Every teacher labels the whole pool, so each
    task normally sees the whole batch, and one backbone pass serves all tasks.
``round-robin``
    Step ``s`` trains task ``s mod T`` only, on a batch of images that have it. For a task with
    labels on few images (ground truth only, spec ``none``), which a joint batch would rarely hold:
    each task gets full batches, at the price of one backbone pass per task.

Batches are seeded epoch permutations, a pure function of the step, so a resumed run draws the
same batches.

A record counts for a task when its source is ``human``, or ``pseudo`` with a confidence of at
least the teacher's ``threshold`` (``must.teachers[i].threshold``, applied here so that it can be
changed without labeling again); ``missing`` never counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selftrain.engine import BatchIndices

from selftrain.must.label import HUMAN, PSEUDO, task_table
from selftrain.store import PseudoLabelStore
from selftrain.tasks.base import Target


@dataclass
class TaskBatch:
    """One task's part of a batch: which images of the batch have it, their targets, which are human."""

    rows: np.ndarray  # (n,) positions in the batch
    targets: list[Target]
    human: np.ndarray  # (n,) bool


class MultiTaskRecords:
    """The store's records for the student: pool indices and, per task, which records count.

    Args:
        store_dir: A complete MuST store (``OUT/must/label``).
        tasks: ``{name: task}`` of the teachers, in config order.
        thresholds: ``{name: threshold}``; pseudo records under it do not count.

    Attributes:
        index: Pool index of every record that has at least one task (N,).
        present: ``{name: (N,) bool}``, whether the record counts for the task.
        human: ``{name: (N,) bool}``, whether its label is ground truth.
    """

    def __init__(self, store_dir: str | Path, tasks: dict, thresholds: dict[str, float]) -> None:
        store = PseudoLabelStore(store_dir)
        if not store.complete:
            raise FileNotFoundError(f"{store_dir}: the MuST store is incomplete; run (or resume) must-label")
        stored = store.header["tasks"]
        if missing := [k for k in tasks if k not in stored]:
            raise ValueError(f"{store_dir}: no labels of {missing} in the store (it has {stored}); label again")
        table = store.read()
        present, human = {}, {}
        for key in tasks:
            source = np.asarray(table.column(f"{key}.source").to_pylist(), dtype=object)
            confidence = table.column(f"{key}.confidence").fill_null(0.0).to_numpy(zero_copy_only=False)
            human[key] = source == HUMAN
            present[key] = human[key] | ((source == PSEUDO) & (confidence >= thresholds.get(key, 0.0)))
        any_task = np.logical_or.reduce(list(present.values())) if present else np.zeros(table.num_rows, bool)
        rows = np.flatnonzero(any_task)
        self.tasks = tasks
        self.index = table.column("index").to_numpy()[rows]
        self.present = {k: v[rows] for k, v in present.items()}
        self.human = {k: v[rows] for k, v in human.items()}
        self._tables = {k: task_table(table.take(rows), k, t) for k, t in tasks.items()}
        if len(rows) == 0:
            raise ValueError(f"{store_dir}: no record has a task that counts (every threshold too high?)")

    def __len__(self) -> int:
        return len(self.index)

    def counts(self) -> dict[str, int]:
        """Records that count, per task."""
        return {k: int(v.sum()) for k, v in self.present.items()}

    def batch(self, records: np.ndarray, only: str | None = None) -> dict[str, TaskBatch]:
        """The tasks of records ``records`` (positions into :attr:`index`), or task ``only``; tasks none
        of them has are left out."""
        records = np.asarray(records, dtype=np.int64)
        out = {}
        for key, task in self.tasks.items():
            if only is not None and key != only:
                continue
            has = self.present[key][records]
            if not has.any():
                continue
            rows = np.flatnonzero(has)
            targets = task.decode_rows(self._tables[key].take(records[rows]))
            out[key] = TaskBatch(rows, targets, self.human[key][records[rows]])
        return out


class TaskSampler:
    """Which records, and which of their tasks, a student step learns from (see the module docstring).

    Args:
        records: The store's records.
        sampling: ``joint`` or ``round-robin``.
        batch_size: Images per step.
        seed: Seeds the epoch permutations (the same for every run of that seed).
    """

    def __init__(self, records: MultiTaskRecords, sampling: str, batch_size: int, seed: int) -> None:
        if sampling not in ("joint", "round-robin"):
            raise ValueError(f"unknown sampling {sampling!r}; known: joint, round-robin")
        self.records, self.sampling = records, sampling
        self.keys = [k for k, n in records.counts().items() if n > 0]
        self.joint = BatchIndices(len(records), batch_size, seed)
        self.having = {k: np.flatnonzero(records.present[k]) for k in self.keys}
        self.per_task = {k: BatchIndices(len(rows), batch_size, seed + 1 + i) for i, (k, rows) in enumerate(self.having.items())}

    def __call__(self, step: int) -> tuple[np.ndarray, dict[str, TaskBatch]]:
        """Step ``step`` -> (record positions (B,), ``{task: TaskBatch}``)."""
        if self.sampling == "joint":
            chosen = self.joint(step).numpy()
            return chosen, self.records.batch(chosen)
        key = self.keys[step % len(self.keys)]
        chosen = self.having[key][self.per_task[key](step // len(self.keys)).numpy()]
        return chosen, self.records.batch(chosen, only=key)
