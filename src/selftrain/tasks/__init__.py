"""Tasks: each module holds one task's head, loss, metrics and pseudo-label encoding."""

from selftrain.registry import Registry

TASKS: Registry = Registry("task")

from selftrain.tasks import classification, depth, detection, keypoints, segmentation  # noqa: F401  (register themselves)
