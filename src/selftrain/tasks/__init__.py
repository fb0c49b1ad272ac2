"""Tasks: each module holds one task's head, loss, metrics and pseudo-label encoding."""

from collections.abc import Sequence

from selftrain.registry import Registry

TASKS: Registry = Registry("task")


def build_task(name: str, labeled):
    """The task ``name`` sized for the run's labeled source ``labeled``.

    The size follows from the source: classification and detection ``K`` classes, segmentation
    ``K + 1`` with the background, depth 1, keypoints the source's points (and its flip pairs); the face
    tasks their source's points, action units, expressions or identities.
    A sequence of class names will do for the tasks that are sized by their classes alone.
    """
    task = TASKS.get(name)
    if isinstance(labeled, Sequence) and not isinstance(labeled, str):
        return task.for_classes(list(labeled))
    return task.for_source(labeled)


from selftrain.tasks import classification, depth, detection, keypoints, segmentation  # noqa: E402, F401  (register themselves)
from selftrain.tasks import alignment3d, au_intensity, emotion, landmarks, verification  # noqa: E402, F401  (face tasks)
