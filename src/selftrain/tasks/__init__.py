"""Tasks: each module holds one task's head, loss, metrics and pseudo-label encoding."""

from selftrain.registry import Registry

TASKS: Registry = Registry("task")

from selftrain.tasks import classification  # noqa: E402,F401  (registers itself)
