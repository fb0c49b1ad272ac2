"""Pre-training pools of the face benchmark: curated vs uncurated pools and pool-size curves.

Bulat et al. (2021, FRL) pre-train on face pools of different quality and size and measure what
reaches the downstream tasks: a pool curated of its near-duplicates against the raw one, and
nested subsets of a pool (the pool-size curve). In a face benchmark file::

    pretrain_pools:
      - {name: uncurated, uri: "imagefolder:{data}/pool_uncurated?labels=none",
         curate: {method: embedding, drop: false}, sizes: [60, 120]}
      - {name: curated, uri: "imagefolder:{data}/pool_uncurated?labels=none", curate: {method: embedding}}
    inits: [random, "ssl:simclr@uncurated", "ssl:simclr@curated"]

An init ``ssl:<method>@<pool>`` pre-trains on the whole pool (after curation when it has one),
and brings one more init ``ssl:<method>@<pool>#N`` per size N of the pool: the same pre-training
on the first N images of a seeded permutation of that pool (so the subsets are nested). Each
pool is prepared once, before any pre-training, in ``OUT/pools/<name>/``::

    curate.json, duplicates.csv, kept.txt, pool/   selftrain.curate's outputs (with ``curate``)
    sizes/<N>/, sizes/<N>.txt                      the nested subsets (images linked) and their keys
    pool.json                                      written last: images, size, redundancy, subsets

``curate: {drop: false}`` measures the redundancy of a pool without removing it, so the uncurated
row of the report has its redundancy too. The report adds the pools table (pool, curation,
images pre-trained on, redundancy of the source) against the downstream metrics, and the
pool-size curve (metric against images pre-trained on, per task) with its table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from selftrain.atomic import atomic_write_text
from selftrain.config import ConfigError, _Strict

log = logging.getLogger("selftrain.faces")

POOL_INIT = re.compile(r"^ssl:(?P<method>[a-z]+)@(?P<pool>[A-Za-z0-9_-]+)(?:#(?P<size>[1-9][0-9]*))?$")


class PoolCurateConfig(_Strict):
    """How a pool's near-duplicates are found (:func:`selftrain.curate.find_duplicates`)."""

    method: Literal["phash", "embedding"] = "phash"
    threshold: float | None = Field(None, description="phash: max Hamming distance (default 10); embedding: min cosine (0.9)")
    backbone: str = Field("cnn-small", description="embedding: the random-init backbone of the features")
    drop: bool = Field(True, description="pre-train on the de-duplicated pool; false: only measure the redundancy")


class PretrainPoolConfig(_Strict):
    """An unlabeled pool that ``ssl:<method>@<name>`` inits pre-train on."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    uri: str = Field(description="the pool's source URI ({data} = the data folder)")
    curate: PoolCurateConfig | None = Field(None, description="find near-duplicates; drop them unless drop: false")
    sizes: list[int] = Field([], description="nested seeded subsets of the (curated) pool, one init ssl:<m>@<name>#N each")
    seed: int = Field(0, description="the permutation the subsets are prefixes of")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[int]) -> list[int]:
        if any(n < 1 for n in sizes):
            raise ValueError(f"sizes must be >= 1, got {sizes}")
        return sorted(set(sizes))


def parse_pool_init(init: str) -> tuple[str, str, int | None] | None:
    """``ssl:simclr@curated#200`` -> ``("simclr", "curated", 200)``; None for an init without a pool."""
    match = POOL_INIT.match(init)
    if match is None:
        return None
    return match["method"], match["pool"], int(match["size"]) if match["size"] else None


def expand_inits(inits: list[str], pools: list[PretrainPoolConfig]) -> list[str]:
    """The inits with, after each ``ssl:<m>@<pool>``, one ``ssl:<m>@<pool>#N`` per size of the pool."""
    sizes = {p.name: p.sizes for p in pools}
    out = []
    for init in inits:
        out.append(init)
        parsed = parse_pool_init(init)
        if parsed and parsed[2] is None:
            out += [f"{init}#{n}" for n in sizes.get(parsed[1], [])]
    return list(dict.fromkeys(out))


def check_pool_inits(inits: list[str], pools: list[PretrainPoolConfig], methods: tuple[str, ...]) -> None:
    """Every ``@pool`` init names a listed pool and a self-supervised method; raises ValueError."""
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"pretrain_pools: names must be unique, got {names}")
    for init in inits:
        if "@" not in init:
            continue
        parsed = parse_pool_init(init)
        if parsed is None or parsed[0] not in methods:
            raise ValueError(f"init {init!r}: a pool init is ssl:<{'|'.join(methods)}>@<pool>[#N]")
        if parsed[1] not in names:
            raise ValueError(f"init {init!r}: no pool {parsed[1]!r} in pretrain_pools (names: {', '.join(names) or 'none'})")


# ----------------------------------------------------------------------------- preparing the pools


def prepare_pools(pools: list[PretrainPoolConfig], used: set[str], out: Path, data: Path) -> dict[str, dict[str, Any]]:
    """Curates and subsets each pool in ``used`` once (``OUT/pools/<name>/pool.json`` written last)."""
    return {p.name: _prepare(p, out / "pools" / p.name, data) for p in pools if p.name in used}


def _prepare(pool: PretrainPoolConfig, folder: Path, data: Path) -> dict[str, Any]:
    from selftrain.curate import find_duplicates, write_curated
    from selftrain.data import build_source

    done = folder / "pool.json"
    if done.exists():
        return json.loads(done.read_text())
    uri = pool.uri.replace("{data}", str(data))
    source = build_source(uri)
    record: dict[str, Any] = {"name": pool.name, "uri": uri, "curate": pool.curate.model_dump() if pool.curate else None}
    if pool.curate is None:
        keys = [source.key(i) for i in range(len(source))]
        record.update(images=len(keys), redundancy=None, pool_uri=uri)
        index = dict(zip(keys, range(len(keys))))
    else:
        c = pool.curate
        log.info("faces: curating pool %s (%s)", pool.name, c.method)
        result = find_duplicates(source, method=c.method, threshold=c.threshold, backbone=c.backbone, progress=False)
        shutil.rmtree(folder / "pool", ignore_errors=True)  # an interrupted earlier preparation
        report = write_curated(result, source, folder)
        kept = result.kept if c.drop else np.arange(len(result.keys))
        keys = [result.keys[p] for p in kept.tolist()]
        index = {result.keys[p]: int(result.indices[p]) for p in kept.tolist()}
        record.update(images=report["images"], redundancy=report["redundancy"], threshold=report["threshold"],
                      duplicates=report["duplicates"], pool_uri=report["kept_pool"] if c.drop else uri)  # fmt: skip
    record["size"] = len(keys)
    record["subsets"] = _write_subsets(pool, source, keys, index, folder)
    atomic_write_text(done, json.dumps(record, indent=1) + "\n")
    return record


def _write_subsets(pool: PretrainPoolConfig, source, keys: list[str], index: dict[str, int], folder: Path) -> dict[str, str]:
    """``sizes/<N>/``: the first N keys of one seeded permutation (so each subset is inside the next)."""
    from selftrain.curate import _write_image

    too_big = [n for n in pool.sizes if n > len(keys)]
    if too_big:
        raise ConfigError(f"pretrain_pools {pool.name}: sizes {too_big} exceed its {len(keys)} images (after curation)")
    order = [keys[i] for i in np.random.default_rng(pool.seed).permutation(len(keys)).tolist()]
    subsets = {}
    for n in pool.sizes:
        target = folder / "sizes" / str(n)
        staging = folder / "sizes" / f"{n}.tmp-{os.getpid()}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        for key in order[:n]:
            _write_image(source, index[key], key, staging)
        os.replace(staging, target)
        atomic_write_text(folder / "sizes" / f"{n}.txt", "".join(k + "\n" for k in order[:n]))
        subsets[str(n)] = f"imagefolder:{target}?labels=none"
    return subsets


def pool_uri(init: str, pools: dict[str, dict[str, Any]]) -> str:
    """The source a pool init pre-trains on: the (curated) pool, or its subset of N images."""
    _, name, size = parse_pool_init(init)  # type: ignore[misc]
    return pools[name]["pool_uri"] if size is None else pools[name]["subsets"][str(size)]


def read_pools(out: Path) -> dict[str, dict[str, Any]]:
    """The ``pool.json`` records of a benchmark folder, by pool name (empty without pools)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "pools").glob("*/pool.json"))}


# ----------------------------------------------------------------------------- the report


def pool_images(init: str, pools: dict[str, dict[str, Any]]) -> int | None:
    """How many images ``init`` pre-trained on (None for an init without a pool, or an unknown pool)."""
    parsed = parse_pool_init(init)
    if parsed is None or parsed[1] not in pools:
        return None
    return parsed[2] or pools[parsed[1]]["size"]


def _curation(record: dict[str, Any]) -> str:
    c = record.get("curate")
    if not c:
        return "none (not measured)"
    how = f"{c['method']} {'≤' if c['method'] == 'phash' else '≥'} {record['threshold']:g}"
    return f"curated: {how}" if c["drop"] else f"uncurated (measured: {how})"


def pool_tables(rows, pools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pools table and the pool-size curve of the finetune rows (or of the first protocol).

    Returns ``columns`` [(task, metric, split)], ``pools`` [(init, record, images, [cell])] for the
    whole-pool inits, ``curve`` [(pool init, [(images, init, [cell])])] ascending in images; a cell
    is (mean, std, n) over seeds or None, from :func:`selftrain.faces.frl_tables`.
    """
    from selftrain.faces import frl_tables

    tables = frl_tables(rows)
    table = next((t for t in tables if t["method"] == "finetune"), tables[0] if tables else None)
    if table is None or not pools:
        return {"method": None, "columns": [], "pools": [], "curve": []}
    by_init = dict(table["rows"])
    whole = [i for i in by_init if (p := parse_pool_init(i)) and p[2] is None and p[1] in pools]
    body = [(i, pools[parse_pool_init(i)[1]], pool_images(i, pools), by_init[i]) for i in whole]  # type: ignore[index]
    curve = []
    for init in whole:
        points = [(pool_images(i, pools), i, by_init[i]) for i in by_init if i == init or i.startswith(init + "#")]
        if len(points) > 1:
            curve.append((init, sorted(points, key=lambda p: p[0])))
    return {"method": table["method"], "columns": table["columns"], "pools": body, "curve": curve}


def pools_section(rows, pools: dict[str, dict[str, Any]], markdown: bool, table, grid_type, cell_type) -> list[str]:
    """The report's "Pre-training pools" section: the pools table and the pool-size table (plot: Plots)."""
    t = pool_tables(rows, pools)
    if not t["pools"]:
        return []

    def value(c) -> Any:
        return cell_type("—") if c is None else cell_type(f"{c[0]:.2f} ± {c[1]:.2f}", f"n={c[2]}")

    metrics = [f"{task} {metric}{' ↓' if metric == 'nme' else ''} @ {split}" for task, metric, split in t["columns"]]
    body = []
    for init, record, images, cells in t["pools"]:
        redundancy = "—" if record.get("redundancy") is None else f"{100 * record['redundancy']:.1f}"
        body.append([cell_type(init), cell_type(record["name"]), cell_type(_curation(record)), cell_type(str(record["images"])),
                     cell_type(str(images)), cell_type(redundancy), *map(value, cells)])  # fmt: skip
    header = ["init", "pool", "curation", "source images", "pre-training images", "source redundancy %", *metrics]
    out = [table(grid_type(f"Pre-training pools ({t['method']}): mean ± std over seeds; redundancy = 1 - unique / images "
                           "of the source pool", header, body))]  # fmt: skip
    if t["curve"]:
        curve_body = [[cell_type(init), cell_type(str(images)), *map(value, cells)]
                      for _, points in t["curve"] for images, init, cells in points]  # fmt: skip
        out.append(table(grid_type(f"Pool-size curve ({t['method']}): nested subsets of each pool (plot pool_size.png)",
                                   ["init", "pre-training images", *metrics], curve_body)))  # fmt: skip
    head = "## Pre-training pools" if markdown else "<h2>Pre-training pools</h2>"
    return [head, *out]


def plot_pool_sizes(rows, pools: dict[str, dict[str, Any]]) -> bytes | None:
    """Metric against images pre-trained on: one panel per task and metric, a line per pool and split."""
    from selftrain.report import _panels, _png

    t = pool_tables(rows, pools)
    if not t["curve"]:
        return None
    panels = list(dict.fromkeys((task, metric) for task, metric, _ in t["columns"]))
    fig, axes = _panels(len(panels), 4.2, 3.3)
    for ax, (task, metric) in zip(axes, panels):
        for pool_init, points in t["curve"]:
            for k, (col_task, col_metric, split) in enumerate(t["columns"]):
                if (col_task, col_metric) != (task, metric):
                    continue
                xy = [(images, cells[k]) for images, _, cells in points if cells[k] is not None]
                if xy:
                    ax.errorbar([x for x, _ in xy], [c[0] for _, c in xy], yerr=[c[1] for _, c in xy], marker="o",
                                capsize=2, lw=1.2, label=f"{pool_init} @ {split}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("pre-training images")
        ax.set_ylabel(f"{metric}{' (lower is better)' if metric == 'nme' else ''}")
        ax.legend(fontsize=6)
    return _png(fig)
