"""What the stages need from a dense task, shared by segmentation, depth, detection and keypoints.

The stages are task-agnostic: they ask the task for a batch's targets, to augment a batch with
its targets, for the per-sample loss, and to turn teacher outputs into store columns and back.
Classification answers with tensors (``selftrain.tasks.classification``); a dense task answers
with one ``dict[str, Tensor]`` per image (keys of :mod:`selftrain.data.targets`), which this base
class implements once. Each dense task module adds only what is its own: which target keys it
learns, how its pseudo labels become Parquet columns (:meth:`DenseTask.record_columns`,
:meth:`DenseTask.decode_rows`) and how confident a record is.

Store columns (one row per pool image, next to ``key`` and ``index``)::

    segmentation.mask        binary   H*W uint8 bytes, row-major; 255 = ignore (low-confidence pixel)
    segmentation.height/width int32
    depth.depth              binary   H*W float16 bytes, row-major
    depth.height/width       int32
    detection.boxes          list<float32>  4 values per box, XYXY pixels
    detection.labels         list<int32>
    detection.scores         list<float32>
    keypoints.points         list<float32>  3 values per point, x, y, v (pixels; v = confidence, 0 = missing)
    TASK.confidence          float32  what ``label.threshold`` filters on (see each task)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

Targets = list[dict[str, torch.Tensor]]



def stack_key(items, key: str) -> torch.Tensor:
    """A batch tensor as is, or the ``key`` entries of a list of target dicts stacked into one."""
    return items if isinstance(items, torch.Tensor) else torch.stack([item[key] for item in items])


class DenseTask:
    """Batch, augmentation and store plumbing of a task with one target dict per image.

    Subclasses set ``name``, ``target_keys`` and implement ``encode_pseudo`` (teacher outputs ->
    target dicts), :meth:`record_columns`, :meth:`pseudo_schema`, :meth:`decode_rows`,
    :meth:`record_confidence` and :meth:`pseudo_options`.
    """

    dense = True
    #: Whether the labeled source must name classes (box labels, mask values); depth does not.
    needs_classes = True
    name: str
    #: The keys of a source's targets this task learns from (and is evaluated on).
    target_keys: tuple[str, ...] = ()

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> DenseTask:
        """The task for a labeled source with these object classes."""
        return cls(len(classes))

    @classmethod
    def for_source(cls, source) -> DenseTask:
        """The task for a labeled source; sized by its classes unless the task says otherwise."""
        return cls.for_classes(source.classes)

    # ------------------------------------------------------------------ batches

    def check_source(self, source, where: str) -> None:
        """Raises ValueError unless ``source`` gives the targets this task learns."""
        keys = getattr(source, "target_keys", ())
        missing = [k for k in self.target_keys if k not in keys]
        if missing:
            raise ValueError(
                f"{where}={source.uri!r} has no {'/'.join(missing)} targets, which task {self.name!r} learns; "
                "use a dense source that has them (e.g. scenes:train?n=2000)"
            )

    def load_targets(self, source, indices: np.ndarray, smoothing: float = 0.0) -> Targets:
        """The targets of ``source[indices]``: one dict per image with this task's keys."""
        if smoothing:
            raise ValueError(f"label smoothing applies to classification only, not to {self.name}")
        out = []
        for i in indices:
            target = source.load_targets(int(i))
            out.append({k: target[k] for k in self.target_keys})
        return out

    #: Targets the metric compares predictions with: the same as the training targets.
    metric_targets = load_targets

    @staticmethod
    def collate(parts: Sequence[Targets]) -> Targets:
        """Human then pseudo targets of one step, in the order of the images."""
        return [t for part in parts for t in part]

    @staticmethod
    def to_device(targets: Targets, device: torch.device) -> Targets:
        return [{k: v.to(device) for k, v in t.items()} for t in targets]

    @staticmethod
    def augment(aug, images: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, Targets]:
        """Augments the images and moves their targets with them (boxes, masks, depth, keypoints)."""
        return aug.forward_dense(images, targets)

    # ------------------------------------------------------------------ pseudo-label store

    def pseudo_options(self, label_cfg) -> dict:
        """Keyword arguments of ``encode_pseudo`` taken from the ``label`` config section."""
        return {}

    def pseudo_fingerprint(self, label_cfg) -> dict:
        """What the stored records depend on besides the teacher and the pool."""
        return {f"{self.name}_encoding": self.pseudo_options(label_cfg)}

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        """Store columns of this task (see the module docstring), ``confidence`` included."""
        raise NotImplementedError

    def record_columns(self, targets: Targets) -> dict[str, list]:
        """Pseudo targets (from ``encode_pseudo``) -> one Python value per record and column."""
        raise NotImplementedError

    def record_confidence(self, outputs, targets: Targets) -> np.ndarray:
        """One confidence per record (B,), what ``label.threshold`` filters on."""
        raise NotImplementedError

    def decode_rows(self, table: pa.Table) -> Targets:
        """Store rows -> target dicts for the student (the inverse of :meth:`record_columns`)."""
        raise NotImplementedError

    def pseudo_column_names(self) -> list[str]:
        return list(self.pseudo_schema())

    def pseudo_targets(self, outputs, label_cfg) -> tuple[Targets, np.ndarray]:
        """Teacher outputs of one batch -> pseudo target dicts and one confidence per image."""
        targets = self.encode_pseudo(outputs, **self.pseudo_options(label_cfg))
        return targets, np.asarray(self.record_confidence(outputs, targets), dtype=np.float32)

    def human_targets(self, source, indices: np.ndarray) -> list[dict[str, torch.Tensor] | None]:
        """The source's ground truth as target dicts (the common view of :mod:`selftrain.tasks.base`)."""
        return list(self.load_targets(source, indices))

    @staticmethod
    def batch_targets(targets: Targets) -> Targets:
        """A dense task's loss takes the list of target dicts as it is."""
        return list(targets)

    def encode_records(self, outputs, label_cfg) -> dict[str, list]:
        """Teacher outputs of one batch -> store column values (``confidence`` included)."""
        targets, confidence = self.pseudo_targets(outputs, label_cfg)
        columns = self.record_columns(targets)
        columns[f"{self.name}.confidence"] = [float(c) for c in confidence]
        return columns

    def pseudo_table_columns(self, parts: Sequence[dict[str, list]]) -> dict[str, pa.Array]:
        """The batches of one shard as Arrow columns; an empty shard keeps the schema."""
        return {
            column: pa.array([v for part in parts for v in part[column]], type=kind)
            for column, kind in self.pseudo_schema().items()
        }

    def decode_pseudo(self, table: pa.Table) -> PseudoTargets:
        """Store rows -> targets the student indexes by batch positions, decoded per batch."""
        return PseudoTargets(self, table)

    def quality_meter(self):
        """Accumulates how good pseudo labels are against the pool's hidden targets."""
        return self.build_metric()


class PseudoTargets:
    """Selected store rows of a dense task; ``targets[positions]`` decodes only those rows.

    Decoding the whole pool up front would hold every mask as int64 tensors; the rows stay in
    their compact Arrow form instead (a 64 px mask is 4 KiB).
    """

    def __init__(self, task: DenseTask, table: pa.Table) -> None:
        self.task, self.table = task, table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, positions) -> Targets:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        return self.task.decode_rows(self.table.take(positions))


def map_to_bytes(values: torch.Tensor, dtype: np.dtype) -> bytes:
    """A (H, W) map as row-major bytes of ``dtype``."""
    return np.ascontiguousarray(values.cpu().numpy().astype(dtype)).tobytes()


def maps_from_column(table: pa.Table, name: str, dtype: np.dtype) -> list[np.ndarray]:
    """The (H, W) maps of column ``name`` (with ``name.height``/``name.width`` beside it)."""
    prefix = name.rsplit(".", 1)[0]
    data = table.column(name).to_pylist()
    heights = table.column(f"{prefix}.height").to_pylist()
    widths = table.column(f"{prefix}.width").to_pylist()
    return [np.frombuffer(b, dtype=dtype).reshape(h, w) for b, h, w in zip(data, heights, widths)]


class SetMeter:
    """Collects a whole evaluation set's predictions and targets (target dicts, or anything a task's
    ``predict`` / ``metric_targets`` give), then ``compute`` applies a metric to all of them at once.

    The face metrics need every score together (ICC's variances, CCC, fold thresholds), so they are
    not batch accumulators (:mod:`selftrain.metrics_faces`).
    """

    def __init__(self, metric) -> None:
        self.metric = metric
        self.preds: list = []
        self.targets: list = []

    def update(self, preds, targets) -> None:
        self.preds.extend(preds)
        self.targets.extend(targets)

    def compute(self) -> dict[str, float]:
        if not self.preds:
            return {}
        return self.metric(self.preds, self.targets)


class ImageLevelTask(DenseTask):
    """A task with one target vector per image that the geometry of the image does not move
    (action-unit intensities, expression and valence/arousal, identity): flips and crops change
    the pixels only. Its targets are still one dict per image, so the stages treat it as dense."""

    needs_classes = False

    @staticmethod
    def augment(aug, images: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, Targets]:
        return aug(images), list(targets)


def vector_column(table: pa.Table, name: str, key: str, width: int) -> Targets:
    """Store rows of a ``list<float32>`` column -> ``{key: (width,) float32}`` per row."""
    values = table.column(name).to_pylist()
    return [{key: torch.tensor(v, dtype=torch.float32).reshape(width)} for v in values]
