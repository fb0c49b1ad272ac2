"""2D face landmarks (68-point 300W / iBUG, 98-point WFLW): heatmaps, inter-ocular NME, FR, AUC.

The network and the pseudo labels are those of :mod:`selftrain.tasks.keypoints` (one Gaussian
heatmap per point; pseudo points with ``v`` = heatmap peak, ``v = 0`` under
``label.point_threshold``); what is the face benchmark's own (Bulat et al. 2021, Sec. 4) is the
measurement: :func:`selftrain.metrics_faces.landmark_metrics` normalises each face's mean point
error by its inter-ocular (outer eye corner) distance and reports ``nme``, ``failure_rate``
(NME > 10%) and ``auc`` (CED area up to 0.08), all in percent. A horizontal flip swaps the
source's left/right points (68: :data:`FLIP_PAIRS_68`, 98: :data:`FLIP_PAIRS_98`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import torch

from selftrain.metrics_faces import INTEROCULAR, interocular_distance, landmark_metrics
from selftrain.tasks import TASKS
from selftrain.tasks.dense import SetMeter, stack_key
from selftrain.tasks.keypoints import Keypoints, decode_heatmaps


def landmark_set_metrics(preds: Sequence[dict], targets: Sequence[dict], corners: tuple[int, int]) -> dict[str, float]:
    """``nme``, ``failure_rate``, ``auc`` (%) of predicted against true ``keypoints`` dicts."""
    pred, truth = stack_key(list(preds), "keypoints"), stack_key(list(targets), "keypoints")
    return landmark_metrics(pred[..., :2], truth[..., :2], norm=interocular_distance(truth, corners))


@TASKS.register("landmarks")
class Landmarks(Keypoints):
    """Face landmarks: :class:`Keypoints` measured with the face-alignment metrics.

    Args:
        num_points: 68 or 98 (or any count with ``corners``).
        corners: The two outer eye corner indices; default :data:`selftrain.metrics_faces.INTEROCULAR`.
    """

    name = "landmarks"
    needs_classes = False
    metric = "nme"
    higher_is_better = False

    @classmethod
    def for_source(cls, source) -> Landmarks:
        if getattr(source, "num_points", None) is None:
            raise ValueError(f"{source.uri!r} has no landmarks to size the landmarks task by (use pts:, wflw: or aflw3d:)")
        corners = getattr(source, "interocular", None) or INTEROCULAR.get(int(source.num_points))
        return cls(int(source.num_points), flip_pairs=getattr(source, "keypoint_flip_pairs", ()), corners=corners)

    def __init__(self, num_points: int, *, corners: tuple[int, int] | None = None, sigma: float = 1.5, **kwargs) -> None:
        super().__init__(num_points, sigma=sigma, **kwargs)
        self.corners = tuple(corners) if corners is not None else INTEROCULAR.get(num_points)
        if self.corners is None:
            raise ValueError(f"landmarks: no standard eye corners for {num_points} points; the source must name them "
                             "(interocular)")  # fmt: skip

    def check_source(self, source, where: str) -> None:
        super().check_source(source, where)
        corners = getattr(source, "interocular", None)
        if corners is not None and tuple(corners) != self.corners:
            raise ValueError(f"{where}={source.uri!r} has its eye corners at {corners}, the labeled source at {self.corners}")

    def build_metric(self) -> SetMeter:
        """NME (inter-ocular), failure rate and CED AUC over the whole set (percent)."""
        return SetMeter(lambda p, t: landmark_set_metrics(p, t, self.corners))

    # The store columns carry the task's name, so a landmarks store is not read as a keypoints one.
    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"landmarks.points": pa.list_(pa.float32()), "landmarks.confidence": pa.float32()}

    def record_columns(self, targets) -> dict[str, list]:
        return {"landmarks.points": [t["keypoints"].reshape(-1).tolist() for t in targets]}

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        return [{"keypoints": torch.tensor(p, dtype=torch.float32).reshape(-1, 3)}
                for p in table.column("landmarks.points").to_pylist()]  # fmt: skip

    def quality_meter(self) -> SetMeter:
        """The pseudo points' NME against the pool's hidden landmarks, every point counted."""
        return self.build_metric()


__all__ = ["Landmarks", "landmark_set_metrics", "decode_heatmaps"]
