"""The ``selftrain`` command line with test-only SIGKILL points, for the fault suite (test_faults.py).

Usage: ``python tests/_fault_driver.py SELFTRAIN-ARGS...`` (e.g. ``label --out RUN --set ...``).

The process counts events as it runs and SIGKILLs itself at one of them, so a kill point is a
position in the run's progress, reproducible from a seed, not a moment on a loaded machine's
clock. Environment (tests only; the library never kills itself):

* ``SELFTRAIN_TEST_KILL=EVENT:N``: SIGKILL at the N-th ``EVENT`` of this process, one of

  - ``replace``: just before an ``os.replace`` -- a temporary file (store shard, skip list,
    selection, manifest, results.csv, cell.json...) or checkpoint folder is complete and
    fsynced, its final name does not exist yet;
  - ``replaced``: just after an ``os.replace``, before the folder fsync and what follows;
  - ``link``: just before an ``os.link`` (a study cell linking a finished stage of another);
  - ``step``: at the start of a training step, before its batch is drawn;
  - ``shard``: after the teacher labeled an input shard, before anything of it is written;
  - ``any``: any of the above, so that kill points can be spread over a whole run's events.

* ``SELFTRAIN_TEST_EVENTS=PATH``: on a normal exit, write this process's event counts (JSON),
  so that a test can spread its kill points over an uninterrupted run's events.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
from collections import Counter

_counts: Counter[str] = Counter()
_kind, _, _at = os.environ.get("SELFTRAIN_TEST_KILL", "").partition(":")
_kill_at = int(_at) if _at else 0
_hits = 0


def _event(kind: str, path: object = "") -> None:
    global _hits
    _counts[kind] += 1
    if _kind in (kind, "any"):
        _hits += 1
        if _hits == _kill_at:
            print(f"fault driver: SIGKILL at {_kind} {_kill_at}: {kind} {path}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    real_replace, real_link = os.replace, os.link

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        _event("replace", dst)
        real_replace(src, dst, *args, **kwargs)
        _event("replaced", dst)

    def link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        _event("link", dst)
        real_link(src, dst, *args, **kwargs)

    os.replace, os.link = replace, link  # every module's os.replace: atomic, checkpoint, study

    # Patched before the stage modules import it by name (``from selftrain.engine import fit``):
    # selftrain.engine imports no stage, selftrain.label imports teach.
    import selftrain.engine

    real_fit = selftrain.engine.fit

    @functools.wraps(real_fit)
    def fit(model, step_fn, **kwargs):  # type: ignore[no-untyped-def]
        def counted(step: int):  # type: ignore[no-untyped-def]
            _event("step")
            return step_fn(step)

        return real_fit(model, counted, **kwargs)

    selftrain.engine.fit = fit

    import selftrain.label

    real_label_shard = selftrain.label.label_shard

    @functools.wraps(real_label_shard)
    def label_shard(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_label_shard(*args, **kwargs)
        _event("shard")
        return out

    selftrain.label.label_shard = label_shard


def _write_counts() -> None:
    path = os.environ.get("SELFTRAIN_TEST_EVENTS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(_counts), f)


if __name__ == "__main__":
    _install()
    atexit.register(_write_counts)
    from selftrain.cli import main

    sys.argv = ["selftrain", *sys.argv[1:]]
    main()
