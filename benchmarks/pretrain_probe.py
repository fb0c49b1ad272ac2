"""``make bench-pretrain``: does self-supervised pre-training beat random init under a linear probe?

Fashion-MNIST with 1% labels (600 images, stratified and seeded as in every run): each method
pre-trains the backbone on the unlabeled pool (the other 59,400 training images, labels hidden),
then a linear classifier is trained on the frozen features of the 600 labeled images (the
``transfer`` stage's linear protocol: standardized features, full-batch AdamW) and measured on the
official 10,000 test images. ``random`` is the same backbone at its seeded initialization.
Every cell is a run folder under ``--out``, so an interrupted benchmark resumes.

    python benchmarks/pretrain_probe.py [--methods random,simclr,moco,byol,swav] [--seeds 0,1]
        [--steps 400] [--batch-size 128] [--backbone cnn-small] [--out runs/bench-pretrain]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from selftrain.config import build_config
from selftrain.engine import build_runtime
from selftrain.network import Network
from selftrain.outputs import RunFolder
from selftrain.pipeline import prepare_data
from selftrain.pretrain import pretrain
from selftrain.tasks import build_task
from selftrain.teach import network_spec
from selftrain.transfer import linear_probe


def measure(method: str, seed: int, args) -> dict:
    """Pre-trains (unless ``random``) and linear-probes one backbone; returns its row."""
    folder = Path(args.out) / f"{method}-seed{seed}"
    done = folder / "probe.json"
    if done.exists():  # measured by an earlier invocation
        return json.loads(done.read_text())
    overrides = [
        f"seed={seed}", f"model.backbone={args.backbone}", f"data.label_fraction={args.label_fraction}",
        f"pretrain.steps={args.steps}", f"pretrain.batch_size={args.batch_size}", "engine.progress=false",
        f"engine.threads={args.threads}", "engine.checkpoint_every=50", "stages=[pretrain]", "transfer.protocols=[linear]",
    ]  # fmt: skip
    if method != "random":
        overrides.append(f"pretrain.method={method}")
        if method == "supervised":  # a different labeled source: the 4,000 MNIST digits
            overrides.append("pretrain.data=mnist:train")
    cfg = build_config({}, overrides)
    run = RunFolder(folder)
    run.write_provenance(cfg)
    runtime = build_runtime(cfg.engine)
    data = prepare_data(cfg, run)
    meta: dict = {"probe_top1": None, "seconds": 0.0}
    weights = None
    if method != "random":
        weights = pretrain(cfg, run, data, runtime)
        meta = json.loads(weights.with_suffix(".json").read_text())
    torch.manual_seed(seed)
    net = Network(network_spec(cfg, data), weights=None if weights is None else str(weights))
    t = cfg.transfer
    probe = linear_probe(net, build_task(cfg.task, data.labeled), (data.labeled, data.labeled_idx), (data.test, data.test_idx),
                         runtime, steps=t.steps, lr=t.linear_lr, seed=seed)  # fmt: skip
    row = {"method": method, "seed": seed, "linear_top1": round(probe["top1"], 2), "online_probe_top1": meta["probe_top1"],
           "pretrain_seconds": meta["seconds"], "labeled": int(len(data.labeled_idx)), "test": int(len(data.test_idx))}  # fmt: skip
    done.write_text(json.dumps(row))
    return row


def table(rows: list[dict]) -> str:
    """Mean linear-probe top-1 per method over seeds, and its mean gain over random init of the same seeds."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    # Paired: each seed's gain is measured against random init with the same seed (same labeled split).
    base = {r["seed"]: r["linear_top1"] for r in by.get("random", [])}
    lines = ["| init | seeds | linear probe top-1 (%) | vs random (same seeds) | online probe (%) | pretrain s |", "|---|---|---|---|---|---|"]
    for method, rs in by.items():
        acc = [r["linear_top1"] for r in rs]
        mean = statistics.mean(acc)
        spread = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        paired = [r["linear_top1"] - base[r["seed"]] for r in rs if r["seed"] in base]
        gain = "—" if method == "random" or not paired else f"{statistics.mean(paired):+.1f}"
        online = [r["online_probe_top1"] for r in rs if r["online_probe_top1"] is not None]
        online_s = f"{statistics.mean(online):.1f}" if online else "—"
        seconds = statistics.mean(r["pretrain_seconds"] for r in rs)
        lines.append(f"| {method} | {','.join(str(r['seed']) for r in rs)} | {mean:.1f}{spread} | {gain} | {online_s} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="random,simclr")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backbone", default="cnn-small")
    parser.add_argument("--label-fraction", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-pretrain")
    args = parser.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            start = time.time()
            rows.append(measure(method, seed, args))
            print(json.dumps(rows[-1]), f"({time.time() - start:.0f} s)", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-pretrain.json").write_text(json.dumps(rows, indent=2))
    print(f"\nFashion-MNIST, {args.label_fraction:g} labels, {args.backbone}, {args.steps} x {args.batch_size} pre-training steps")
    print(table(rows))


if __name__ == "__main__":
    main()
