"""Tests of the pseudo-label store: layout, atomicity, crash-resume and record selection."""

from __future__ import annotations

import importlib.util
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from selftrain.selection import select_records, selection_stats
from selftrain.store import PseudoLabelStore, StoreError

WRITER = Path(__file__).with_name("_store_writer.py")
_spec = importlib.util.spec_from_file_location("_store_writer", WRITER)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)

TASKS = ["classification"]


def _create(root: Path, n_shards: int = 3, shard_size: int = 4, **kw) -> PseudoLabelStore:
    fp = kw.pop("fingerprint", writer.fingerprint(n_shards, shard_size))
    return PseudoLabelStore.create(root, fingerprint=fp, n_shards=n_shards,
                                   shard_size=shard_size, tasks=kw.pop("tasks", TASKS), **kw)


def _fill(store: PseudoLabelStore, order: list[int] | None = None) -> None:
    size = store.header["shard_size"]
    for shard_id in order if order is not None else store.pending_shards():
        store.write_shard(shard_id, writer.build_shard(shard_id, size))


def _tmp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.tmp*"))


# --------------------------------------------------------------------------- layout


def test_create_writes_header_and_reopens(tmp_path: Path) -> None:
    store = _create(tmp_path / "s", n_shards=3, shard_size=4)
    header = PseudoLabelStore(tmp_path / "s").header
    assert header["format"] == "selftrain-store/1"
    assert (header["n_shards"], header["shard_size"], header["tasks"]) == (3, 4, TASKS)
    assert header["fingerprint"] == writer.fingerprint(3, 4) and header["created"]
    assert store.pending_shards() == [0, 1, 2] and store.done_shards() == set()
    assert not store.complete and store.manifest is None and store.count() == 0


def test_open_requires_header(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="header.json: missing"):
        PseudoLabelStore(tmp_path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{", "unreadable JSON"), ('{"format": "other/9"}', "format 'other/9'"),
     ('{"format": "selftrain-store/1"}', "damaged header, missing")],
)
def test_damaged_header_is_reported(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "header.json").write_text(text)
    with pytest.raises(StoreError, match=f"header.json: {problem}"):
        _create(tmp_path)


def test_header_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="header.json: the header is not JSON-serializable"):
        _create(tmp_path, fingerprint={"teacher": object()})
    assert not (tmp_path / "header.json").exists()


def test_create_refuses_shards_without_header(tmp_path: Path) -> None:
    (tmp_path / "shard-00000.parquet").write_bytes(b"x")
    with pytest.raises(StoreError, match="no header.json"):
        _create(tmp_path)


def test_roundtrip_in_shard_order(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=3, shard_size=4)
    _fill(store, order=[2, 0])
    assert store.done_shards() == {0, 2} and store.pending_shards() == [1]
    assert store.count() == 8
    partial = store.read(allow_partial=True)
    assert partial["index"].to_pylist() == [0, 1, 2, 3, 8, 9, 10, 11]
    _fill(store, order=[1])
    store.write_manifest({"teacher": "t"})
    assert store.complete
    assert store.manifest == {"teacher": "t", "n_records": 12, "shards": 3}
    table = store.read()
    expected = pa.concat_tables([writer.build_shard(i, 4) for i in range(3)])
    assert table.equals(expected)
    assert store.read(["key"]).column_names == ["key"]
    streamed = list(store.iter_shards(["index"]))
    assert [i for i, _ in streamed] == [0, 1, 2]
    assert [t.num_rows for _, t in streamed] == [4, 4, 4]


def test_read_requires_complete(tmp_path: Path) -> None:
    store = _create(tmp_path)
    with pytest.raises(StoreError, match="incomplete store"):
        store.read()
    with pytest.raises(StoreError, match="incomplete store"):
        next(store.iter_shards())
    assert store.read(allow_partial=True).num_rows == 0


def test_read_unknown_column_names_file(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=1)
    _fill(store)
    store.write_manifest({})
    with pytest.raises(StoreError, match="shard-00000.parquet: cannot read columns"):
        store.read(["nope"])


def test_write_shard_refusals(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=2, shard_size=4)
    _fill(store, order=[0])
    with pytest.raises(StoreError, match="already written"):
        store.write_shard(0, writer.build_shard(0, 4))
    with pytest.raises(StoreError, match="out of range"):
        store.write_shard(2, writer.build_shard(2, 4))
    with pytest.raises(StoreError, match="exceed shard_size"):
        store.write_shard(1, writer.build_shard(1, 5))
    with pytest.raises(StoreError, match="schema differs"):
        store.write_shard(1, writer.build_shard(1, 4).drop_columns(["score"]))
    with pytest.raises(StoreError, match=r"key \(string\) and index \(int64\)"):
        store.write_shard(1, pa.table({"key": ["a"], "index": pa.array([0], pa.int32())}))
    assert store.pending_shards() == [1] and _tmp_files(tmp_path) == []
    _fill(store)
    store.write_manifest({})
    with pytest.raises(StoreError, match="manifest.json: already written"):
        store.write_manifest({})


def test_write_manifest_needs_every_shard(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=3)
    _fill(store, order=[0])
    with pytest.raises(StoreError, match=r"2 shards are missing \(first: \[1, 2\]\)"):
        store.write_manifest({})
    _fill(store)
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.write_manifest({"bad": object()})
    assert not store.complete and _tmp_files(tmp_path) == []


# --------------------------------------------------------------------------- resume


def test_resume_keeps_done_shards(tmp_path: Path) -> None:
    _fill(_create(tmp_path, n_shards=3), order=[1])
    again = _create(tmp_path, n_shards=3)
    assert again.pending_shards() == [0, 2]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"fingerprint": {"teacher": "other", "pool": "synthetic", "n": 12}},
         "fingerprint.teacher"),
        ({"n_shards": 4, "fingerprint": writer.fingerprint(3, 4)}, "n_shards"),
        ({"shard_size": 5, "fingerprint": writer.fingerprint(3, 4)}, "shard_size"),
        ({"tasks": ["classification", "detection"]}, "tasks"),
    ],
)
def test_resume_with_other_header_is_refused(tmp_path: Path, change: dict, field: str) -> None:
    _fill(_create(tmp_path, n_shards=3, shard_size=4), order=[0])
    args = {"n_shards": 3, "shard_size": 4, **change}
    with pytest.raises(StoreError) as info:
        _create(tmp_path, **args)
    msg = str(info.value)
    assert f"{field} differs" in msg and "header.json" in msg
    assert "another teacher/pool/config" in msg and "new output folder" in msg
    assert PseudoLabelStore(tmp_path).done_shards() == {0}


def test_resume_off_refuses_existing_store(tmp_path: Path) -> None:
    _create(tmp_path)
    with pytest.raises(StoreError, match="resume is off"):
        _create(tmp_path, resume=False)


def test_stale_temporary_is_removed_and_shard_redone(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=2)
    _fill(store, order=[0])
    (tmp_path / "shard-00001.parquet.tmp-99999").write_bytes(b"half a shard")
    (tmp_path / "manifest.json.tmp-99999").write_bytes(b"{")
    resumed = _create(tmp_path, n_shards=2)
    assert _tmp_files(tmp_path) == [] and resumed.pending_shards() == [1]


def _run_writer(root: Path, n_shards: int, shard_size: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(root), str(n_shards), str(shard_size)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )


def _finish(root: Path, n_shards: int, shard_size: int) -> None:
    out, err = _run_writer(root, n_shards, shard_size).communicate(timeout=60)
    assert PseudoLabelStore(root).complete, f"writer failed: {err}"


def test_crash_between_temp_write_and_rename(tmp_path: Path) -> None:
    proc = _run_writer(tmp_path / "b", 3, 50, SELFTRAIN_TEST_KILL_BEFORE_RENAME="1")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "b").glob("shard-00001.parquet*")] == [
        f"shard-00001.parquet.tmp-{proc.pid}"
    ]
    assert PseudoLabelStore(tmp_path / "b").done_shards() == {0}
    _finish(tmp_path / "b", 3, 50)
    _finish(tmp_path / "a", 3, 50)
    assert _tmp_files(tmp_path / "b") == []
    assert PseudoLabelStore(tmp_path / "b").read().equals(PseudoLabelStore(tmp_path / "a").read())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_final_shard_is_reported(tmp_path: Path, damage: str) -> None:
    store = _create(tmp_path, n_shards=2, shard_size=50)
    _fill(store)
    path = store.shard_path(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not parquet" * 9)
    for call in (store.done_shards, store.pending_shards, store.count,
                 lambda: store.write_manifest({})):
        with pytest.raises(StoreError, match=r"shard-00001\.parquet: unreadable Parquet"):
            call()
    assert not store.complete


def _kill_and_resume(
    tmp_path: Path, kills: int, n_shards: int, seed: int, max_wait: float = 10.0
) -> None:
    """Kill the writer ``kills`` times at random moments, finish, compare with a clean run.

    A quarter of the kills are blind (they may hit interpreter start-up or ``create()``);
    the rest wait for the writer's "ready" line and then a random part (at most
    ``max_wait`` seconds) of its remaining writing time, so they hit shard writes.
    """
    size, delay = 2000, 0.03
    a, b = tmp_path / "a", tmp_path / "b"
    _finish(a, n_shards, size)
    rng = random.Random(seed)
    mid_run = 0  # kills that found the writer alive with some but not all shards done
    for _ in range(kills):
        proc = _run_writer(b, n_shards, size, SELFTRAIN_TEST_SHARD_DELAY=str(delay))
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 0.6))
        elif select.select([proc.stdout], [], [], 30)[0]:
            line = proc.stdout.readline().split()
            pending = int(line[1]) if len(line) == 2 else 0
            if pending >= 2 and rng.random() < 0.5:
                # Kill once a random number of new shards is on disk (then a random part of one
                # shard's time): lands mid-run however fast or loaded the machine is.
                target = len(list(b.glob("shard-*.parquet"))) + rng.randint(1, pending - 1)
                deadline = time.monotonic() + 60
                while len(list(b.glob("shard-*.parquet"))) < target and proc.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, delay))
            else:
                time.sleep(rng.uniform(0.0, min(0.8 * pending * (delay + 0.02), max_wait)))
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if (b / "header.json").exists():
            store = PseudoLabelStore(b)  # no create(): see what the kill left
            done = len(store.done_shards())  # raises if a final file is damaged
            mid_run += alive and 0 < done < n_shards and not store.complete
            if store.complete:
                break
    _finish(b, n_shards, size)
    assert mid_run >= 1, "no kill landed in the middle of the run; the test proved nothing"
    assert _tmp_files(b) == []
    got, want = PseudoLabelStore(b).read(), PseudoLabelStore(a).read()
    keys = got["key"].to_pylist()
    assert keys == [f"img{i}" for i in range(n_shards * size)]
    assert len(set(keys)) == len(keys)
    assert got.equals(want)
    assert PseudoLabelStore(b).manifest == PseudoLabelStore(a).manifest


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, kills=10, n_shards=12, seed=0)


@pytest.mark.slow
def test_sigkill_many_times_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, kills=20, n_shards=30, seed=1, max_wait=0.3)


# --------------------------------------------------------------------------- selection


def test_selection_roundtrip(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=3, shard_size=4)
    assert store.selection() is None
    _fill(store)
    np.testing.assert_array_equal(store.shard_offsets(), [0, 4, 8, 12])
    rows, repeat = np.array([1, 4, 11]), np.array([2, 1, 3], np.int32)
    table = store.make_selection(rows, repeat)
    assert table.to_pydict() == {"shard": [0, 1, 2], "row": [1, 0, 3], "repeat": [2, 1, 3]}
    store.write_selection(table)
    store.write_selection(table)  # a rerun after a kill rewrites it
    assert store.selection().equals(table)
    got_rows, got_repeat = store.selection_rows()
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_repeat, repeat)
    keys = store.read(["key"], allow_partial=True)["key"].take(got_rows).to_pylist()
    assert keys == ["img1", "img4", "img11"]
    store.write_manifest({})
    with pytest.raises(StoreError, match="complete; its selection cannot change"):
        store.write_selection(table)


def test_selection_is_validated(tmp_path: Path) -> None:
    store = _create(tmp_path, n_shards=2, shard_size=4)
    _fill(store, order=[0])
    ok = pa.table({c: pa.array([0], pa.int32()) for c in ("shard", "row", "repeat")})
    with pytest.raises(StoreError, match="need every shard written"):
        store.write_selection(ok)
    _fill(store)
    with pytest.raises(StoreError, match="selection.parquet: expected columns"):
        store.write_selection(pa.table({"shard": [0], "row": [0], "repeat": [1]}))
    for shard, row, rep in [(0, 4, 1), (2, 0, 1), (1, 0, 0), (-1, 0, 1)]:
        bad = pa.table({"shard": pa.array([0, shard], pa.int32()),
                        "row": pa.array([0, row], pa.int32()),
                        "repeat": pa.array([1, rep], pa.int32())})
        with pytest.raises(StoreError, match="entry 1 .* does not name a stored record"):
            store.write_selection(bad)
    with pytest.raises(StoreError, match="rows must lie in 0..7"):
        store.make_selection(np.array([8]), np.array([1]))
    assert store.selection() is None


# Hand-made case: class 0 has 6 kept, class 1 has 3, class 2 has 4, class 3 only a
# record below the threshold. Median of the kept counts (6, 3, 4) is K=4.
LABEL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
CONF = np.array([0.9, 0.85, 0.95, 0.6, 0.8, 0.8, 0.9, 0.6, 0.7, 0.99, 0.5, 0.75, 0.75, 0.3],
                np.float32)


def _check(result: tuple[np.ndarray, np.ndarray], rows: list[int], repeat: list[int]) -> None:
    got_rows, got_repeat = result
    assert got_rows.dtype == np.int64 and got_repeat.dtype == np.int32
    assert got_rows.tolist() == rows and got_repeat.tolist() == repeat


def test_select_threshold_only() -> None:
    _check(select_records(LABEL, CONF, threshold=0.8), [0, 1, 2, 4, 5, 6, 9], [1] * 7)
    _check(select_records(LABEL, CONF), list(range(14)), [1] * 14)
    nan = np.array([0.5, np.nan], np.float32)
    _check(select_records(np.array([0, 1]), nan), [0], [1])


def test_select_balance_to_median() -> None:
    # Class 0 keeps rows 2, 0, 1 and 4 (row 4 beats row 5 at 0.8 by index); class 1's
    # three rows make 4 with row 6 (most confident) twice; class 2 has exactly 4.
    result = select_records(LABEL, CONF, threshold=0.5, balance=True, num_classes=4)
    _check(result, [0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12], [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1])
    assert np.bincount(LABEL[result[0]], weights=result[1], minlength=4).tolist() == [4, 4, 4, 0]


def test_select_balance_to_per_class() -> None:
    # K=7: class 0 (6 rows) doubles row 2; class 1 (3 rows) gets 3, 2, 2 in confidence
    # order 6, 8, 7; class 2 (4 rows) doubles 9, 11 and 12 (11 before 12 on the tie).
    result = select_records(LABEL, CONF, threshold=0.5, balance=True, per_class=7)
    _check(result, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
           [1, 1, 2, 1, 1, 1, 3, 2, 2, 2, 1, 2, 2])
    _check(select_records(LABEL, CONF, balance=True, per_class=1), [2, 6, 9, 13], [1] * 4)


def test_select_empty_and_invalid() -> None:
    _check(select_records(LABEL, CONF, threshold=1.0), [], [])
    _check(select_records(LABEL, CONF, threshold=1.0, balance=True), [], [])
    _check(select_records(np.array([], int), np.array([]), balance=True), [], [])
    with pytest.raises(ValueError, match="per_class"):
        select_records(LABEL, CONF, per_class=3)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        select_records(LABEL, CONF, balance=True, num_classes=3)
    with pytest.raises(ValueError, match="same length"):
        select_records(LABEL, CONF[:3])


def test_select_is_deterministic_and_exact() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, 500)
    conf = rng.random(500).round(2).astype(np.float32)  # many ties
    rows, repeat = select_records(label, conf, threshold=0.3, balance=True, per_class=80)
    again = select_records(label.copy(), conf.copy(), threshold=0.3, balance=True, per_class=80)
    assert np.array_equal(rows, again[0]) and np.array_equal(repeat, again[1])
    assert np.all(np.diff(rows) > 0) and np.all(conf[rows] >= 0.3)
    assert np.bincount(label[rows], weights=repeat).tolist() == [80] * 5


def test_selection_stats_hand_computed() -> None:
    label, conf = np.array([0, 1, 1, 2]), np.array([0.05, 0.5, 0.97, 1.0], np.float32)
    rows, repeat = np.array([1, 3]), np.array([2, 1], np.int32)
    stats = selection_stats(label, conf, rows, repeat, 3, truth=np.array([0, 0, 1, -1]))
    hist = [0] * 20
    hist[1], hist[10], hist[19] = 1, 1, 2
    assert stats["kept"] == 3 and stats["unique"] == 2 and stats["per_class"] == [0, 2, 1]
    assert stats["mean_confidence"] == pytest.approx(0.75)
    assert stats["confidence_histogram"]["edges"] == [i / 20 for i in range(21)]
    assert stats["confidence_histogram"]["counts"] == hist
    assert stats["accuracy_all"] == pytest.approx(2 / 3)
    assert stats["accuracy_kept"] == 0.0  # row 1 is wrong, row 3 has no truth
    correct, wrong = [0] * 20, [0] * 20
    correct[1], correct[19], wrong[10] = 1, 1, 1
    assert stats["confidence_histogram_correct"] == correct
    assert stats["confidence_histogram_wrong"] == wrong
    plain = selection_stats(label, conf, rows[:0], repeat[:0], 3)
    assert plain["kept"] == 0 and plain["mean_confidence"] is None
    assert "accuracy_all" not in plain
