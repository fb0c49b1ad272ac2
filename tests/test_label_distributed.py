"""Distributed labeling: ranks label disjoint input shards; 2 gloo processes give the records of 1.

The ranks are real processes, spawned (a process forked from a parent whose OpenMP threads
already ran can hang in its first parallel operation), with the variables ``torchrun`` sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT), each running the command line
``selftrain label --out OUT --set ...``. The process group's timeout and a hard timeout on
every process make a broken test fail instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from selftrain.cli import app
from selftrain.config import build_config
from selftrain.distributed import Ranks
from selftrain.engine import build_runtime
from selftrain.label import label
from selftrain.must.pipeline import run_must
from selftrain.outputs import RunFolder
from selftrain.pipeline import prepare_data, run_pipeline
from selftrain.store import PseudoLabelStore, StoreError, shards_of_rank

POOL = 101
SHARD = 4  # 26 shards: 13 for each of 2 ranks
PROCESS_TIMEOUT_S = 120


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_of_rank_cover_every_shard_exactly_once(world_size):
    for n_shards in (0, 1, 2, 3, 7, 26):
        parts = [shards_of_rank(n_shards, r, world_size) for r in range(world_size)]
        flat = [i for part in parts for i in part]
        assert sorted(flat) == list(range(n_shards)) and len(flat) == n_shards
        for r, part in enumerate(parts):
            assert part == sorted(part) and all(i % world_size == r for i in part)
        # Static and balanced: no rank holds more than one shard above another, none padded in.
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shards_of_rank(5, world_size, world_size)
    with pytest.raises(ValueError):
        Ranks(rank=-1, world_size=world_size)


def test_a_rank_other_than_0_does_not_start_a_store(tmp_path):
    with pytest.raises(StoreError, match="rank 0 starts the store"):
        PseudoLabelStore.create(tmp_path / "s", fingerprint={}, n_shards=4, shard_size=2, tasks=["classification"], rank=1, world_size=2)


def _overrides(small_idx) -> list[str]:
    return tiny_overrides(small_idx) + [f"data.pool_limit={POOL}", f"label.shard_size={SHARD}", "label.batch_size=2", "teach.steps=5"]


@pytest.fixture(scope="module")
def taught(small_idx, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A run folder with a teacher, and a copy of it labeled by one process (the reference)."""
    root = tmp_path_factory.mktemp("distlabel")
    overrides = _overrides(small_idx)
    cfg = build_config({}, overrides)
    run_pipeline(cfg, root / "taught", stages=["teach"])
    shutil.copytree(root / "taught", root / "one")
    run_pipeline(cfg, root / "one", stages=["label"])
    return root / "taught", root / "one", overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_records(folder: Path, reference: Path) -> None:
    store = PseudoLabelStore(folder / "label" / "round-1")
    ref = PseudoLabelStore(reference / "label" / "round-1")
    table = store.read()
    keys = table.column("key").to_pylist()
    assert table.num_rows == POOL and len(set(keys)) == POOL
    assert store.manifest["n_records"] == POOL and store.manifest["processed"] == POOL
    assert table.sort_by("index").equals(ref.read().sort_by("index"))
    assert store.selection().equals(ref.selection())
    assert not list(store.root.glob("*.tmp*"))


def _join(procs: list) -> None:
    for p in procs:
        p.join(timeout=PROCESS_TIMEOUT_S)
    hung = [p for p in procs if p.exitcode is None]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} rank(s) ran past {PROCESS_TIMEOUT_S} s"
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_two_ranks_label_101_images_into_101_records_as_one_process_does(taught, tmp_path):
    teacher_run, one, overrides = taught
    out = tmp_path / "two"
    shutil.copytree(teacher_run, out)
    _join(_start_ranks(out, overrides))
    _assert_same_records(out, one)
    assert PseudoLabelStore(out / "label" / "round-1").header["n_shards"] == (POOL + SHARD - 1) // SHARD


def _rank_main(rank: int, world_size: int, port: int, out: str, overrides: list[str]) -> None:
    """One rank: torchrun's variables, then ``selftrain label --out OUT --set ...``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "SELFTRAIN_DIST_TIMEOUT": "60"})  # fmt: skip
    app(["label", "--out", out, *[a for o in overrides for a in ("--set", o)]], standalone_mode=False)


def _start_ranks(out: Path, overrides: list[str], world_size: int = 2) -> list:
    """The ranks as spawned processes (fresh interpreters, as torchrun starts them)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, str(out), overrides)) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def _kill_rank_1_mid_way(out: Path, overrides: list[str]) -> bool:
    """Starts 2 ranks, SIGKILLs rank 1 once it wrote a shard (then rank 0, as torchrun would)."""
    store = out / "label" / "round-1"
    procs = _start_ranks(out, overrides)
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while not any(store.glob("shard-*[13579].parquet")):
            if time.monotonic() > deadline or any(p.exitcode is not None for p in procs):
                break
            time.sleep(0.002)
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=PROCESS_TIMEOUT_S)
    return (store / "header.json").exists() and bool(PseudoLabelStore(store).pending_shards())


def test_a_rank_killed_mid_way_then_the_job_rerun_gives_101_records_none_twice(taught, tmp_path):
    teacher_run, one, overrides = taught
    out = tmp_path / "killed"
    shutil.copytree(teacher_run, out)
    killed_mid_way = False
    for _ in range(3):  # rank 1 may finish before the kill lands; then start again from a fresh copy
        if _kill_rank_1_mid_way(out, overrides):
            killed_mid_way = True
            break
        shutil.rmtree(out)
        shutil.copytree(teacher_run, out)
    assert killed_mid_way
    store = PseudoLabelStore(out / "label" / "round-1")
    assert not store.complete and 0 < len(store.done_shards()) < store.header["n_shards"]
    _join(_start_ranks(out, overrides))
    _assert_same_records(out, one)


def test_ranks_without_a_process_group_meet_through_the_store_folder(taught, tmp_path):
    teacher_run, one, overrides = taught
    out = tmp_path / "files"
    shutil.copytree(teacher_run, out)
    cfg = build_config({}, overrides)
    run = RunFolder(out)
    data, runtime = prepare_data(cfg, run), build_runtime(cfg.engine)
    store = out / "label" / "round-1"
    # Rank 0 alone: its shards are written, then it gives up waiting for rank 1's, naming them.
    with pytest.raises(TimeoutError, match="other ranks' shards"):
        label(cfg, run, data, runtime, 1, Ranks(0, 2, timeout_s=1))
    pending = PseudoLabelStore(store).pending_shards()
    assert pending == shards_of_rank((POOL + SHARD - 1) // SHARD, 1, 2)
    # Rank 1 returns once its own shards are on disk; rank 0, rerun, finishes the store.
    assert label(cfg, run, data, runtime, 1, Ranks(1, 2, timeout_s=5)) == store
    assert not PseudoLabelStore(store).complete and not PseudoLabelStore(store).pending_shards()
    label(cfg, run, data, runtime, 1, Ranks(0, 2, timeout_s=5))
    _assert_same_records(out, one)


def test_must_refuses_to_run_on_several_processes(taught, monkeypatch):
    # The single-task stages train on several processes (tests/test_train_distributed.py); MuST does not.
    teacher_run, _, overrides = taught
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MuST runs in one process"):
        run_must(build_config({}, overrides), teacher_run)


def test_each_rank_removes_only_the_leftovers_of_its_own_files(tmp_path):
    root = tmp_path / "s"
    header = {"fingerprint": {"teacher": "t"}, "n_shards": 4, "shard_size": 2, "tasks": ["classification"]}
    PseudoLabelStore.create(root, **header)
    names = ["shard-00000.parquet.tmp-1", "shard-00001.parquet.tmp-2", "shard-00002.parquet.tmp-3",
             "shard-00003.parquet.tmp-4", "manifest.json.tmp-5", "selection.parquet.tmp-6"]  # fmt: skip
    for name in names:
        (root / name).write_bytes(b"torn")
    PseudoLabelStore.create(root, **header, rank=1, world_size=2)  # another rank may be writing the rest
    assert sorted(p.name for p in root.glob("*.tmp*")) == sorted(set(names) - {names[1], names[3]})
    PseudoLabelStore.create(root, **header, rank=0, world_size=2)
    assert not list(root.glob("*.tmp*"))
