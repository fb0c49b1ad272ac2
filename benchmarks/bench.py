"""``make bench``: selftrain's label and student stages against plain PyTorch loops.

Both sides use the same model, batch size, data (real Fashion-MNIST images) and augmentation,
in the same process, so the ratio measures what selftrain's machinery costs (store writing,
checkpoints, loss normalization, metrics, resume bookkeeping). Peak memory is the process's
peak RSS. Results are printed and written to ``bench.json``.

    python benchmarks/bench.py [--pool 20000] [--steps 150] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from selftrain.augment import BatchAugment
from selftrain.config import build_config
from selftrain.engine import build_runtime
from selftrain.label import label
from selftrain.network import load_network
from selftrain.outputs import RunFolder
from selftrain.pipeline import prepare_data
from selftrain.student import pseudo_records, student
from selftrain.tasks import TASKS
from selftrain.teach import teach


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def plain_label_loop(net, images: torch.Tensor, batch_size: int) -> float:
    """Images/s of a bare inference loop over uint8 images already in memory."""
    net.eval()
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float().div_(255).contiguous(memory_format=torch.channels_last)
        torch.softmax(net(x), dim=1).max(dim=1)
    return len(images) / (time.perf_counter() - start)


def plain_student_loop(net, human, pseudo, targets, cfg, steps: int) -> float:
    """Images/s of a bare training loop: same model, batch composition and augmentation."""
    aug = BatchAugment(cfg.student.augment)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.student.optim.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    nh, npb = cfg.student.human_batch_size, cfg.student.pseudo_batch_size
    hx, hy = human
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        hi = torch.randint(0, len(hx), (nh,))
        pi = torch.randint(0, len(pseudo), (npb,))
        x = torch.cat([hx[hi], pseudo[pi]]).float().div_(255)
        x = aug(x).contiguous(memory_format=torch.channels_last)
        y = torch.cat([torch.nn.functional.one_hot(hy[hi], 10).float(), targets[pi]])
        loss = -(y * torch.log_softmax(net(x), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * (nh + npb) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="selftrain-bench-"))
    try:
        cfg = build_config({}, [f"data.pool_limit={args.pool}", "teach.steps=50", f"student.steps={args.steps}",
                                "engine.progress=false", "label.shard_size=4096"])  # fmt: skip
        run = RunFolder(tmp)
        runtime = build_runtime(cfg.engine)
        data = prepare_data(cfg, run)
        teach(cfg, run, data, runtime)
        rss_before_label = peak_rss_mib()

        t0 = time.perf_counter()
        label(cfg, run, data, runtime, 1)
        ours_label = len(data.pool_idx) / (time.perf_counter() - t0)
        net = load_network(tmp / "teach" / "model.safetensors").to(memory_format=torch.channels_last)
        plain_label = plain_label_loop(net, data.pool.load_batch(data.pool_idx), cfg.label.batch_size)

        t0 = time.perf_counter()
        student(cfg, run, data, runtime, 1)
        ours_student = args.steps * (cfg.student.human_batch_size + cfg.student.pseudo_batch_size) / (time.perf_counter() - t0)
        index, targets = pseudo_records(tmp / "label" / "round-1", TASKS.get("classification")(10))
        net = load_network(tmp / "teach" / "model.safetensors", drop_rate=cfg.student.drop_rate).to(memory_format=torch.channels_last)
        human = (data.labeled.load_batch(data.labeled_idx), torch.from_numpy(data.labeled.labels[data.labeled_idx]))
        plain_student = plain_student_loop(net, human, data.pool.load_batch(index), targets, cfg, args.steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "precision": runtime.precision},
        "label": {"images_per_s": round(ours_label), "plain_images_per_s": round(plain_label), "ratio": round(ours_label / plain_label, 3), "pool": len(data.pool_idx)},
        "student": {"images_per_s": round(ours_student), "plain_images_per_s": round(plain_student), "ratio": round(ours_student / plain_student, 3),
                    "steps": args.steps, "batch": cfg.student.human_batch_size + cfg.student.pseudo_batch_size, "augment": cfg.student.augment},
        "peak_rss_mib": {"before_label": round(rss_before_label), "end": round(peak_rss_mib())},
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'':10} {'selftrain':>12} {'plain loop':>12} {'ratio':>7}")
    for stage in ("label", "student"):
        r = result[stage]
        print(f"{stage:10} {r['images_per_s']:>10} /s {r['plain_images_per_s']:>10} /s {r['ratio']:>7.2f}")
    print(f"peak RSS: {result['peak_rss_mib']['end']} MiB   ({args.out})")


if __name__ == "__main__":
    main()
