"""The fault suite (DESIGN.md §7): SIGKILL at seeded points of label, teach, student and study;
a truncated newest checkpoint; injected NaN losses.

Kills are made by ``tests/_fault_driver.py``: the real command line in a subprocess that SIGKILLs
itself at the N-th event of a kind (before or after an atomic rename, a training step, a labeled
shard, a hard link). The kill points are drawn from a seeded generator over the events of an
uninterrupted reference run and printed, so a failure reruns exactly; every run is bounded by
``RUN_TIMEOUT``. After the kills, one more run finishes the job, and what it left is compared
with the reference run's: the store records, the weights and metrics, or results.csv.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import check_cell_markers, tiny_overrides
from selftrain.checkpoint import CheckpointDir
from selftrain.config import EngineConfig, OptimConfig, apply_override, build_config
from selftrain.engine import FAULT_NAN_ENV, TrainingDiverged, fault_nan_steps, fit
from selftrain.pipeline import run_pipeline
from selftrain.store import PseudoLabelStore

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("_fault_driver.py")
# Seconds any one run may take before the test fails (never hangs). Generous: at `nice -n 10` on a
# shared 2-core machine under a load average of 12, one study run took over 300 s to start.
RUN_TIMEOUT = 900


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
    for key in ("SELFTRAIN_TEST_KILL", "SELFTRAIN_TEST_EVENTS", FAULT_NAN_ENV):
        if key not in extra:
            env.pop(key, None)
    return env


def _drive(args: list[str], log: Path, **env: str) -> int:
    """Runs the command line through the fault driver; returns its exit status (-9: killed)."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(args[:3])} ... {env}\n".encode())
        fh.flush()
        proc = subprocess.run([sys.executable, str(DRIVER), *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=_env(**env), timeout=RUN_TIMEOUT)  # fmt: skip
    return proc.returncode


def _reference(args: list[str], log: Path) -> dict[str, int]:
    """An uninterrupted run through the driver; returns its event counts."""
    events = log.with_suffix(".events.json")
    assert _drive(args, log, SELFTRAIN_TEST_EVENTS=str(events)) == 0, log.read_text()[-3000:]
    return json.loads(events.read_text())


def _kill_points(rng: random.Random, total: int, kills: int) -> list[tuple[str, int]]:
    """``kills`` kill points spread over a run of at least ``total`` driver events (any kind).

    Marks ``g_1 < ... < g_kills`` are drawn below ``total``; kill ``k`` is at event ``g_k - g_{k-1}``
    of its run. A resumed run redoes some events (start-up, steps after the last checkpoint), so
    the kills move through the whole run and each one lands before its end.
    """
    marks = sorted(rng.sample(range(1, total), kills))  # distinct, so every N >= 1
    return [("any", m - p) for m, p in zip(marks, [0, *marks])]


def _kill_runs(args: list[str], log: Path, points: list[tuple[str, int]], after_kill=None) -> list[str]:
    """One run per kill point; each must die by SIGKILL. Returns where each kill landed ("replace shard-00003.parquet")."""
    landed = []
    for i, (kind, n) in enumerate(points):
        rc = _drive(args, log, SELFTRAIN_TEST_KILL=f"{kind}:{n}")
        assert rc == -signal.SIGKILL, f"kill {i} ({kind}:{n}) did not land (exit {rc}): {log.read_text()[-3000:]}"
        last = [line for line in log.read_text().splitlines() if line.startswith("fault driver: SIGKILL")][-1]
        event, _, path = last.rsplit(": ", 1)[1].partition(" ")
        landed.append(f"{event} {Path(path).name}".strip())
        if after_kill is not None:
            after_kill(i, kind, n)
    return landed


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --------------------------------------------------------------------------- label


def _label_kills(small_idx, tmp_path: Path, kills: int, seed: int, shard_size: int) -> None:
    overrides = tiny_overrides(small_idx) + [f"label.shard_size={shard_size}", "label.batch_size=32", "engine.threads=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_pipeline(build_config({}, overrides), a, stages=["teach"])
    shutil.copytree(a, b)  # the same teacher, so the labels can be compared record by record
    cfg = build_config({}, overrides)
    run_pipeline(cfg, a, stages=["label"])  # the reference, in this process: no interpreter start-up
    n_shards = PseudoLabelStore(a / "label" / "round-1").header["n_shards"]
    # Events of a label run, per shard: the teacher's labels, then two renames (before and after),
    # of its skip list and its store shard; more at start-up and at the end (selection, manifest).
    points = _kill_points(random.Random(seed), 5 * n_shards, kills)
    print(f"label: seed {seed}, {n_shards} shards, kill points {points}")
    log = tmp_path / "label.log"
    store_dir = b / "label" / "round-1"
    partial = []

    def check(i: int, kind: str, n: int) -> None:
        if (store_dir / "header.json").exists():
            store = PseudoLabelStore(store_dir)  # no create(): what the kill left; raises on a torn shard
            partial.append(len(store.done_shards()))

    landed = _kill_runs(["label", "--out", str(b), *_sets(overrides)], log, points, check)
    for side in ("skips", "missing"):  # as a kill before a skip or no-label list's rename leaves
        leftover = store_dir / side / "shard-00000.json.tmp-99999"
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_text("[")
    run_pipeline(cfg, b, stages=["label"])  # the run after the last kill finishes the store
    print(f"label: {len(landed)} kills survived, at {landed}; shards on disk after each: {partial}")
    want, got = PseudoLabelStore(a / "label" / "round-1"), PseudoLabelStore(store_dir)
    assert sum(0 < d < n_shards for d in partial) >= kills // 2, "too few kills landed mid-run"
    keys = got.read().column("key").to_pylist()
    assert len(keys) == len(set(keys)) == want.count()  # none lost, none duplicated
    assert got.read().equals(want.read())
    assert got.selection().equals(want.selection())
    drop = ("created",)
    assert {k: v for k, v in got.manifest.items() if k not in drop} == {k: v for k, v in want.manifest.items() if k not in drop}
    assert not list(store_dir.rglob("*.tmp*"))


def test_label_sigkilled_three_times_ends_with_the_records_of_an_uninterrupted_run(small_idx, tmp_path):
    _label_kills(small_idx, tmp_path, kills=3, seed=0, shard_size=128)


@pytest.mark.slow
def test_label_sigkilled_twenty_times_ends_with_the_records_of_an_uninterrupted_run(small_idx, tmp_path):
    _label_kills(small_idx, tmp_path, kills=20, seed=1, shard_size=32)


# --------------------------------------------------------------------------- teach and student


def _metrics(path: Path) -> list[dict]:
    """metrics.jsonl less the wall-clock seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{b} differs from {a}"


def _training_kills(small_idx, tmp_path: Path, kills: dict[str, int], seed: int, steps: int) -> None:
    """Kills each training stage of ``kills`` that many times; weights and metrics must equal the reference's."""
    every = 10
    overrides = tiny_overrides(small_idx) + [
        f"teach.steps={steps}", f"student.steps={steps}", f"engine.checkpoint_every={every}", "engine.threads=1",
        "student.human_batch_size=8", "student.pseudo_batch_size=24",
    ]  # fmt: skip
    cfg = build_config({}, overrides)
    a, b, log = tmp_path / "a", tmp_path / "b", tmp_path / "train.log"
    stages = ["teach", "label", "student"] if kills.get("student") else ["teach"]
    run_pipeline(cfg, a, stages=stages)  # the reference, in this process
    # Events of a training run: its steps, and before and after each checkpoint's renames (weights
    # file, folder), the start-up files and the exported model.
    rng = random.Random(seed)
    landed: list[str] = []
    for stage in stages:
        n = kills.get(stage, 0)
        if n:
            points = _kill_points(rng, steps, n)
            print(f"{stage}: seed {seed}, kill points {points}")
            landed += [f"{stage}: {at}" for at in _kill_runs([stage, "--out", str(b), *_sets(overrides)], log, points)]
        run_pipeline(cfg, b, stages=[stage])  # resumes after the last kill
    print(f"training: {len(landed)} kills survived, at {landed}")
    for folder in ["teach", "student/round-1"] if "student" in stages else ["teach"]:
        _same_weights(a / folder / "model.safetensors", b / folder / "model.safetensors")
        assert _metrics(b / folder / "metrics.jsonl") == _metrics(a / folder / "metrics.jsonl")
        assert json.loads((b / folder / "done.json").read_text())["bad_steps"] == 0


def test_teach_sigkilled_twice_ends_with_the_weights_of_an_uninterrupted_run(small_idx, tmp_path):
    _training_kills(small_idx, tmp_path, {"teach": 2}, seed=0, steps=60)


@pytest.mark.slow
def test_teach_and_student_sigkilled_six_times_end_with_the_weights_of_an_uninterrupted_run(small_idx, tmp_path):
    _training_kills(small_idx, tmp_path, {"teach": 3, "student": 3}, seed=1, steps=120)


# --------------------------------------------------------------------------- NaN losses


def test_injected_nan_losses_are_counted_and_repeated_ones_stop_teach_with_the_last_good_checkpoint(
    small_idx, tmp_path, monkeypatch, caplog
):
    overrides = tiny_overrides(small_idx) + ["teach.steps=40", "engine.checkpoint_every=10", "engine.max_bad_steps=4", "engine.threads=1"]
    cfg = build_config({}, overrides)
    monkeypatch.setenv(FAULT_NAN_ENV, "3,4,17")  # isolated NaNs: skipped, counted, the run goes on
    run_pipeline(cfg, tmp_path / "isolated", stages=["teach"])
    assert json.loads((tmp_path / "isolated" / "teach" / "done.json").read_text())["bad_steps"] == 3
    assert [s for s in (3, 4, 17) if f"non-finite loss at step {s}," in caplog.text] == [3, 4, 17]
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "isolated" / "teach" / "model.safetensors").values())

    monkeypatch.setenv(FAULT_NAN_ENV, "23-40")  # from step 23 on: 4 in a row stop the run at step 26
    with pytest.raises(TrainingDiverged, match="4 consecutive non-finite losses at step 26"):
        run_pipeline(cfg, tmp_path / "diverged", stages=["teach"])
    ckpts = CheckpointDir(tmp_path / "diverged" / "teach" / "checkpoints")
    assert ckpts.steps() == [10, 20] and not (tmp_path / "diverged" / "teach" / "done.json").exists()
    step, weights, _ = ckpts.load_latest()
    assert step == 20 and all(torch.isfinite(w).all() for w in weights.values())

    # The kept checkpoint is the uninterrupted run's: without the fault the run resumes there and
    # ends with the weights of a run that never saw a NaN.
    monkeypatch.delenv(FAULT_NAN_ENV)
    run_pipeline(cfg, tmp_path / "clean", stages=["teach"])
    caplog.clear()
    caplog.set_level(logging.INFO, logger="selftrain.engine")
    run_pipeline(cfg, tmp_path / "diverged", stages=["teach"])
    assert "resuming at step 20 of 40" in caplog.text
    _same_weights(tmp_path / "clean" / "teach" / "model.safetensors", tmp_path / "diverged" / "teach" / "model.safetensors")
    assert json.loads((tmp_path / "diverged" / "teach" / "done.json").read_text())["bad_steps"] == 0


# --------------------------------------------------------------------------- study


def _finished_stage(root: Path) -> dict[str, list[str]]:
    """A finished teach folder and label store as a study cell leaves them (contents are stand-ins)."""
    files = {"teach": ["done.json", "metrics.jsonl", "model.json", "model.safetensors", "checkpoints/step-0000010/state.pt"],
             "label/round-1": ["header.json", "manifest.json", "selection.parquet", "shard-00000.parquet",
                               "shard-00001.parquet", "skips/shard-00000.json"]}  # fmt: skip
    for stage, names in files.items():
        for name in names:
            (root / stage / name).parent.mkdir(parents=True, exist_ok=True)
            (root / stage / name).write_text(f"{stage}/{name}")
    return files


@pytest.mark.parametrize("link", ["hard link", "copy"])
def test_a_study_killed_while_reusing_a_stage_never_leaves_its_marker_before_its_files(tmp_path, monkeypatch, link):
    """``_link_tree`` stopped after any file: done.json / manifest.json only once every other file is there."""
    from selftrain import study as study_mod

    files = _finished_stage(tmp_path / "src")
    real_link, real_replace = os.link, os.replace
    for stage, names in files.items():
        wanted = [n for n in names if "checkpoints" not in n]
        marker = "done.json" if stage == "teach" else "manifest.json"
        for k in range(len(wanted) + 1):
            dst = tmp_path / f"dst-{k}" / stage
            calls = []

            def place(real, src, target, *args):  # type: ignore[no-untyped-def]
                if len(calls) == k:
                    raise KeyboardInterrupt  # the process dies here
                calls.append(target)
                if link == "copy" and real is real_link:
                    raise OSError("cross-device link")
                return real(src, target, *args)

            monkeypatch.setattr(os, "link", lambda s, t, *a: place(real_link, s, t, *a))
            if link == "copy":
                monkeypatch.setattr(os, "replace", lambda s, t, *a: place(real_replace, s, t, *a))
            with contextlib.suppress(KeyboardInterrupt):  # the simulated death
                study_mod._link_tree(tmp_path / "src" / stage, dst)
            monkeypatch.undo()
            present = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) if dst.exists() else []
            assert marker not in present or sorted(wanted) == [p for p in present if ".tmp-" not in p], (k, present)
            for p in present:
                assert ".tmp-" in p or (dst / p).read_text() == f"{stage}/{p}"  # whole files only
        assert not (tmp_path / f"dst-{len(wanted)}" / stage / "checkpoints").exists()


def _study_rows(path: Path) -> list[dict]:
    """results.csv less the training seconds (a clock, not a result)."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_study_sigkilled_twelve_times_ends_with_the_results_of_an_uninterrupted_study(small_idx, tmp_path):
    import yaml

    from selftrain.study import cell_folder, load_study, plan_cells

    base: dict = {}
    for override in [*tiny_overrides(small_idx), "teach.steps=6", "student.steps=6", "data.pool_limit=300", "engine.threads=1"]:
        apply_override(base, override)
    spec = {"name": "faults", "base": base, "grid": {"init": ["random"], "augment": ["S1"], "label_fraction": [0.1],
                                                     "method": ["finetune", "self-training"], "seed": [0, 1]}}  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    cells = plan_cells(load_study(path)[0])
    log = tmp_path / "study.log"
    events = _reference(["study", str(path), "--out", str(tmp_path / "reference")], log)
    kills, seed = 12, 2
    points = _kill_points(random.Random(seed), sum(events.values()), kills)
    print(f"study: seed {seed}, reference events {events}, kill points {points}")
    out = tmp_path / "killed"
    seen: dict[str, tuple[int, int]] = {}
    finished_after: list[int] = []

    def check(i: int, kind: str, n: int) -> None:
        check_cell_markers({c.id: cell_folder(out, c) for c in cells}, seen)
        finished_after.append(len(seen))

    landed = _kill_runs(["study", str(path), "--out", str(out)], log, points, check)
    print(f"study: {len(landed)} kills survived, at {landed}; cells finished after each: {finished_after}")
    assert _drive(["study", str(path), "--out", str(out)], log) == 0, log.read_text()[-3000:]
    check(kills, "", 0)
    assert len(seen) == len(cells)
    assert _study_rows(out / "results.csv") == _study_rows(tmp_path / "reference" / "results.csv")
