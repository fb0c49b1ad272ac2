"""Pre-training pools of the face benchmark: curation of a planted uncurated pool, nested pool sizes,
the pools table and pool-size curve equal to results.csv (configs/faces/pools.yaml, scaled down)."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from selftrain.config import ConfigError
from selftrain.data.face_fixtures import read_planted, write_uncurated_pool
from selftrain.face_pools import parse_pool_init, pool_tables, read_pools
from selftrain.faces import load_benchmark, plan, run_benchmark
from selftrain.results import read_results

CONFIG = Path(__file__).parents[1] / "configs" / "faces" / "pools.yaml"


def test_uncurated_pool_plants_every_kind_and_is_written_once(tmp_path: Path) -> None:
    counts = write_uncurated_pool(tmp_path, unique=20, size=32, clips=2, frames=5)
    truth = read_planted(tmp_path)
    assert counts["original"] == 20 + 2 and counts["frame"] == 2 * 4
    assert all(counts[k] > 0 for k in ("reencode", "shift", "brightness"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".csv") == sorted(truth)
    # Every copy points at an original that is in the pool.
    originals = {origin for origin, kind in truth.values() if kind == "original"}
    assert {origin for origin, _ in truth.values()} == originals
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert write_uncurated_pool(tmp_path, unique=20, size=32, clips=2, frames=5) == counts
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_pool_inits_are_validated() -> None:
    assert parse_pool_init("ssl:simclr@curated#200") == ("simclr", "curated", 200)
    assert parse_pool_init("ssl:simclr") is None
    with pytest.raises(ConfigError, match="no pool 'nowhere' in pretrain_pools"):
        load_benchmark(CONFIG, ["inits=[random, 'ssl:simclr@nowhere']"])
    with pytest.raises(ConfigError, match="pool init is ssl:"):
        load_benchmark(CONFIG, ["inits=[random, 'ssl:simclr@curated#0']"])
    with pytest.raises(ConfigError, match="unknown init 'supervised@curated'"):
        load_benchmark(CONFIG, ["inits=[random, 'supervised@curated']"])
    bench = load_benchmark(CONFIG)
    # Each size of a pool is one more init, right after the pool's own.
    assert bench.all_inits == ["random", "ssl:simclr@uncurated", "ssl:simclr@uncurated#40", "ssl:simclr@uncurated#120",
                               "ssl:simclr@curated"]  # fmt: skip
    assert len(plan(bench)) == len(bench.tasks) * 5


def test_pools_curated_vs_uncurated_and_sizes_end_to_end(tmp_path: Path) -> None:
    bench = load_benchmark(CONFIG, [
        "data.train=24", "data.test=20", "data.size=48", "data.uncurated=30", "pretrain_pools.0.sizes=[10, 25]",
        "base.teach.steps=3", "base.pretrain.steps=3", "base.pretrain.batch_size=8", "base.data.image_size=16",
        "seeds=[0, 1]", "tasks=[{name: emotion, task: emotion, labeled: 'affectnet:{data}/affectnet/train.csv', "
        "test: 'affectnet:{data}/affectnet/test.csv'}]",
    ])  # fmt: skip
    run_benchmark(bench, tmp_path)
    truth = read_planted(tmp_path / "data" / "pool_uncurated")
    pools = read_pools(tmp_path)
    uncurated, curated = pools["uncurated"], pools["curated"]
    # Curation removes the planted near-duplicates: one image kept per original face (or video clip).
    kept = (tmp_path / "pools" / "curated" / "kept.txt").read_text().split()
    per_origin = collections.Counter(truth[k][0] for k in kept)
    n_origins = len({origin for origin, _ in truth.values()})
    assert len(per_origin) == n_origins  # no distinct face lost
    assert len(kept) - n_origins <= 0.05 * (len(truth) - n_origins)  # at most 5% of the copies survive
    assert curated["size"] == len(kept) == len(list((tmp_path / "pools" / "curated" / "pool").iterdir()))
    assert uncurated["size"] == uncurated["images"] == curated["images"] == len(truth)
    assert uncurated["redundancy"] == pytest.approx(1 - len(kept) / len(truth))
    # The sizes are nested subsets of the pool, of exactly N images each.
    small, large = ((tmp_path / "pools" / "uncurated" / "sizes" / f"{n}.txt").read_text().split() for n in (10, 25))
    assert len(small) == 10 and len(large) == 25 and small == large[:10] and set(large) <= set(truth)
    assert sorted(p.name for p in (tmp_path / "pools" / "uncurated" / "sizes" / "10").iterdir()) == sorted(small)
    # results.csv keeps each init; the report's numbers are its means.
    rows = read_results(tmp_path / "results.csv")
    assert {r.init for r in rows} == set(bench.all_inits)
    t = pool_tables(rows, pools)
    assert [init for init, *_ in t["pools"]] == ["ssl:simclr@uncurated", "ssl:simclr@curated"]
    assert [images for images, _, _ in t["curve"][0][1]] == [10, 25, len(truth)]
    report = (tmp_path / "report.md").read_text()
    checked = 0
    for init, cells in [(i, c) for i, _, _, c in t["pools"]] + [(i, c) for _, pts in t["curve"] for _, i, c in pts]:
        for (task, metric, split), cell in zip(t["columns"], cells):
            values = [r.value for r in rows if (r.init, r.task, r.metric, r.method) == (init, task, metric, "finetune")]
            assert cell is not None and cell[2] == 2 and cell[0] == pytest.approx(sum(values) / 2)
            assert f"{cell[0]:.2f} ± {cell[1]:.2f}" in report
            checked += 1
    assert checked == 5 * len(t["columns"])
    assert re.search(rf"\| ssl:simclr@curated \| curated \| curated: embedding ≥ 0.9 \| {len(truth)} \| {len(kept)} \| "
                     rf"{100 * curated['redundancy']:.1f} \|", report)  # fmt: skip
    assert "![downstream metric against pre-training pool size (nested subsets)](plots/pool_size.png)" in report
    assert (tmp_path / "plots" / "pool_size.png").stat().st_size > 1000
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
