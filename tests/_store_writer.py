"""A stand-in ``label`` run that tests kill with SIGKILL and run again.

Usage: ``python tests/_store_writer.py STORE_DIR N_SHARDS SHARD_SIZE``

It opens the store with ``create(resume=True)``, prints ``ready N_PENDING``, writes every
pending shard with rows that depend only on the shard, then writes the manifest.
Environment knobs (test only; the library itself never sleeps or crashes on purpose):

* ``SELFTRAIN_TEST_SHARD_DELAY``: seconds to sleep before each shard, so that a kill at a
  random moment lands before, between and during shard writes.
* ``SELFTRAIN_TEST_KILL_BEFORE_RENAME``: a shard id; the process SIGKILLs itself after
  that shard's temporary file is fsynced and before it is renamed to its final name.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pyarrow as pa

from selftrain import atomic as atomic_mod
from selftrain.store import PseudoLabelStore

NUM_CLASSES = 10


def fingerprint(n_shards: int, shard_size: int) -> dict:
    """The fingerprint every run of this script uses for the same arguments."""
    return {"teacher": "synthetic-teacher", "pool": "synthetic", "n": n_shards * shard_size}


def build_shard(shard_id: int, shard_size: int) -> pa.Table:
    """Deterministic pseudo-labels of one shard: a pure function of (shard_id, shard_size)."""
    idx = np.arange(shard_id * shard_size, (shard_id + 1) * shard_size, dtype=np.int64)
    rng = np.random.default_rng([1234, shard_id])
    logits = rng.normal(size=(len(idx), NUM_CLASSES)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return pa.table({
        "key": pa.array([f"img{i}" for i in idx], pa.string()),
        "index": pa.array(idx, pa.int64()),
        "score": pa.array(np.sin(idx * 0.001) + rng.random(len(idx)), pa.float64()),
        "classification.probs": pa.FixedSizeListArray.from_arrays(
            pa.array(probs.reshape(-1), pa.float32()), NUM_CLASSES
        ),
        "classification.label": pa.array(probs.argmax(axis=1), pa.int32()),
        "classification.confidence": pa.array(probs.max(axis=1), pa.float32()),
    })


def _kill_before_rename(shard_id: int) -> None:
    # Crash exactly between "temporary file complete" and "final name exists".
    target = f"shard-{shard_id:05d}.parquet"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.basename(os.fspath(dst)) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    atomic_mod.os.replace = replace  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    root, n_shards, shard_size = argv[0], int(argv[1]), int(argv[2])
    delay = float(os.environ.get("SELFTRAIN_TEST_SHARD_DELAY", "0"))
    if "SELFTRAIN_TEST_KILL_BEFORE_RENAME" in os.environ:
        _kill_before_rename(int(os.environ["SELFTRAIN_TEST_KILL_BEFORE_RENAME"]))
    store = PseudoLabelStore.create(
        root, fingerprint=fingerprint(n_shards, shard_size), n_shards=n_shards,
        shard_size=shard_size, tasks=["classification"], resume=True,
    )
    pending = [] if store.complete else store.pending_shards()
    # Tells the test that startup is over, so its kills can aim at the writing phase.
    print(f"ready {len(pending)}", flush=True)
    if store.complete:
        return 0
    for shard_id in pending:
        time.sleep(delay)
        store.write_shard(shard_id, build_shard(shard_id, shard_size))
    store.write_manifest({"teacher": "synthetic-teacher"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
