"""Tasks: each module holds one task's head, loss, metrics and pseudo-label encoding."""

from collections.abc import Sequence

from selftrain.registry import Registry

TASKS: Registry = Registry("task")


def build_task(name: str, classes: Sequence[str]):
    """The task ``name`` for a labeled source with these classes (its size follows from them:
    classification and detection ``K``, segmentation ``K + 1`` with the background, depth 1)."""
    return TASKS.get(name).for_classes(list(classes))


from selftrain.tasks import classification, depth, detection, keypoints, segmentation  # noqa: E402, F401  (register themselves)
