"""``make bench``: selftrain's throughput, memory and scaling, each against a reference.

* ``label`` and ``student`` images/s as a ratio to a plain PyTorch loop with the same model,
  batch size, data (real Fashion-MNIST images) and augmentation, in the same process: what
  selftrain's machinery costs (store writing, checkpoints, loss normalization, metrics, resume
  bookkeeping).
* Peak RSS of labeling a pool of 1x and 10x the size, each in a fresh process (``ru_maxrss``):
  the label stage streams, so memory should not grow with the pool (target: <= 1.2x).
* Training throughput of ``teach`` on 1 and on 2 processes (``torchrun``, the same global
  batch, the machine's cores split between the processes).
* Training FLOP/s as a share of the machine's measured fp32 matmul peak (a large matmul
  loop); the model's FLOPs per step (forward and backward) counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions).

Results are printed and written to ``bench.json``.

    python benchmarks/bench.py [--pool 20000] [--steps 150] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from torch.utils.flop_counter import FlopCounterMode

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


def matmul_peak_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """The machine's fp32 matmul rate (GFLOP/s) over a loop of n x n products, best of three rounds."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def train_step_flops(net: torch.nn.Module, batch: int, channels: int, size: int) -> int:
    """FLOPs of one training step (forward + backward) of ``net`` on ``batch`` images."""
    x = torch.rand(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    net.train()
    with FlopCounterMode(display=False) as counter:
        net(x).logsumexp(1).mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _cli_env(threads: int) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo", "SELFTRAIN_DIST_TIMEOUT": "600"}


def label_child(folder: str, pool: int) -> None:
    """Runs in a fresh process: labels ``pool`` images with the teacher in ``folder``; prints peak RSS (MiB)."""
    cfg = build_config({}, _label_overrides(pool))
    run = RunFolder(folder)
    runtime = build_runtime(cfg.engine)
    data = prepare_data(cfg, run)
    before = peak_rss_mib()
    label(cfg, run, data, runtime, 1)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))  # cross-check, kB
    print(json.dumps({"pool": len(data.pool_idx), "peak_rss_mib_before_label": round(before), "peak_rss_mib": round(peak_rss_mib()),
                      "vm_hwm_mib": round(hwm / 1024)}))  # fmt: skip


def _label_overrides(pool: int) -> list[str]:
    # Shards of 1,000 images: the 1x pool (2,000) is 2 shards, the 10x pool 20.
    return [f"data.pool_limit={pool}", "teach.steps=50", "engine.progress=false", "label.shard_size=1000"]


def label_memory(teacher_run: Path, tmp: Path, pool: int) -> dict:
    """Peak RSS of labeling ``pool`` and ``10 * pool`` images, each in a fresh process."""
    out = {}
    for scale in (1, 10):
        folder = tmp / f"rss-{scale}x"
        shutil.copytree(teacher_run / "teach", folder / "teach")
        # Through sh, which forks it: a child forked (or vforked) from this process and exec'd
        # inherits this process's peak RSS in ru_maxrss; a grandchild starts from sh's.
        cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, __file__, "--label-child", str(folder), "--pool", str(pool * scale)]
        # A bound against a hung child, generous for shared machines (a 50,000-image child ran past 900 s on one).
        result = subprocess.run(cmd, env=_cli_env(torch.get_num_threads()), capture_output=True, text=True, timeout=7200)
        if result.returncode:
            raise RuntimeError(f"labeling {pool * scale} images in a fresh process failed:\n{result.stderr[-3000:]}")
        out[f"{scale}x"] = json.loads(result.stdout.strip().splitlines()[-1])
    out["growth"] = round(out["10x"]["peak_rss_mib"] / out["1x"]["peak_rss_mib"], 3)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teach_throughput(tmp: Path, nproc: int, steps: int, batch: int) -> dict:
    """``teach`` images/s under ``torchrun --nproc-per-node nproc`` (the cores split between the processes)."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    folder = tmp / f"scale-{nproc}"
    sets = ["stages=[teach]", f"teach.steps={steps}", f"teach.batch_size={batch}", "engine.progress=false",
            f"engine.threads={threads}", f"engine.checkpoint_every={steps}"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "selftrain", "run", "--out", str(folder),
           *[a for o in sets for a in ("--set", o)]]  # fmt: skip
    result = subprocess.run(cmd, env=_cli_env(threads), capture_output=True, text=True, timeout=7200)
    if result.returncode:
        raise RuntimeError(f"teach on {nproc} process(es) failed:\n{(result.stdout + result.stderr)[-3000:]}")
    seconds = json.loads((folder / "teach" / "done.json").read_text())["seconds"]
    return {"processes": nproc, "threads_each": threads, "images_per_s": round(steps * batch / seconds), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rss-pool", type=int, default=2000, help="the 1x pool of the memory test (10x is labeled too)")
    parser.add_argument("--scale-steps", type=int, default=100, help="teach steps of the 1- vs 2-process test")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--label-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.label_child:
        label_child(args.label_child, args.pool)
        return
    tmp = Path(tempfile.mkdtemp(prefix="selftrain-bench-"))
    try:
        result = stage_throughput(tmp, args.pool, args.steps)
        result["label_memory"] = label_memory(tmp / "stages", tmp, args.rss_pool)
        batch = 128
        one, two = (teach_throughput(tmp, n, args.scale_steps, batch) for n in (1, 2))
        result["scaling"] = {"stage": "teach", "global_batch": batch, "steps": args.scale_steps, "one": one, "two": two,
                             "speedup": round(two["images_per_s"] / one["images_per_s"], 3)}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    report(result, args.out)


def stage_throughput(tmp: Path, pool: int, steps: int) -> dict:
    """label and student against plain loops, and the student's FLOP/s against the matmul peak."""
    folder = tmp / "stages"
    cfg = build_config({}, [f"data.pool_limit={pool}", "teach.steps=50", f"student.steps={steps}",
                            "engine.progress=false", "label.shard_size=4096"])  # fmt: skip
    run = RunFolder(folder)
    runtime = build_runtime(cfg.engine)
    data = prepare_data(cfg, run)
    teach(cfg, run, data, runtime)
    rss_before_label = peak_rss_mib()

    t0 = time.perf_counter()
    label(cfg, run, data, runtime, 1)
    ours_label = len(data.pool_idx) / (time.perf_counter() - t0)
    net = load_network(folder / "teach" / "model.safetensors").to(memory_format=torch.channels_last)
    plain_label = plain_label_loop(net, data.pool.load_batch(data.pool_idx), cfg.label.batch_size)

    s = cfg.student
    batch = s.human_batch_size + s.pseudo_batch_size
    t0 = time.perf_counter()
    student(cfg, run, data, runtime, 1)
    ours_student = steps * batch / (time.perf_counter() - t0)
    index, targets = pseudo_records(folder / "label" / "round-1", TASKS.get("classification")(10))
    net = load_network(folder / "teach" / "model.safetensors", drop_rate=s.drop_rate).to(memory_format=torch.channels_last)
    human = (data.labeled.load_batch(data.labeled_idx), torch.from_numpy(data.labeled.labels[data.labeled_idx]))
    plain_student = plain_student_loop(net, human, data.pool.load_batch(index), targets, cfg, steps)

    flops = train_step_flops(net, batch, data.channels, data.image_size)
    peak = matmul_peak_gflops()
    achieved = {k: flops * rate / batch / 1e9 for k, rate in (("selftrain", ours_student), ("plain", plain_student))}
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "precision": runtime.precision},
        "label": {"images_per_s": round(ours_label), "plain_images_per_s": round(plain_label), "ratio": round(ours_label / plain_label, 3), "pool": len(data.pool_idx)},
        "student": {"images_per_s": round(ours_student), "plain_images_per_s": round(plain_student), "ratio": round(ours_student / plain_student, 3),
                    "steps": steps, "batch": batch, "augment": s.augment},
        "flops": {"model": cfg.model.backbone, "gflop_per_step": round(flops / 1e9, 3), "matmul_peak_gflops": round(peak, 1),
                  "student_gflops": round(achieved["selftrain"], 2), "plain_gflops": round(achieved["plain"], 2),
                  "student_share_of_peak": round(achieved["selftrain"] / peak, 4), "plain_share_of_peak": round(achieved["plain"] / peak, 4)},
        "peak_rss_mib": {"before_label": round(rss_before_label), "end": round(peak_rss_mib())},
    }  # fmt: skip


def report(result: dict, out: str) -> None:
    print(f"{'':10} {'selftrain':>12} {'plain loop':>12} {'ratio':>7}")
    for stage in ("label", "student"):
        r = result[stage]
        print(f"{stage:10} {r['images_per_s']:>10} /s {r['plain_images_per_s']:>10} /s {r['ratio']:>7.2f}")
    m = result["label_memory"]
    print(f"label peak RSS: {m['1x']['pool']} images {m['1x']['peak_rss_mib']} MiB, {m['10x']['pool']} images "
          f"{m['10x']['peak_rss_mib']} MiB: growth {m['growth']:.2f}x (target <= 1.2x)")  # fmt: skip
    sc = result["scaling"]
    print(f"teach, global batch {sc['global_batch']}: 1 process {sc['one']['images_per_s']} /s, "
          f"2 processes {sc['two']['images_per_s']} /s: {sc['speedup']:.2f}x")  # fmt: skip
    f = result["flops"]
    print(f"student: {f['gflop_per_step']} GFLOP/step, {f['student_gflops']} GFLOP/s = {100 * f['student_share_of_peak']:.1f}% "
          f"of the {f['matmul_peak_gflops']} GFLOP/s fp32 matmul peak (plain loop {100 * f['plain_share_of_peak']:.1f}%)")  # fmt: skip
    print(f"peak RSS: {result['peak_rss_mib']['end']} MiB   ({out})")


if __name__ == "__main__":
    main()
