"""The ``selftrain`` command line: one verb per stage, plus ``run``, ``demo``, ``report`` and ``curate``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from selftrain import __version__
from selftrain.config import ConfigError, dump_config, load_config
from selftrain.distributed import env_rank

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pre-training and self-training of visual backbones: pretrain -> teach -> label -> student -> transfer -> report.",
)
console = Console(stderr=True)

ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML config; omitted: the built-in defaults (the demo recipe)")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output folder")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="dotted override, e.g. student.steps=5 (repeatable)")]
ResumeOpt = Annotated[str, typer.Option("--resume", help="auto: continue a run in --out; never: require an empty --out")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="a bad image is an error naming the file, not a counted skip")]


def _setup_logging(verbose: bool) -> None:
    # Under torchrun every rank would print the same lines: the others keep warnings and errors.
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if env_rank() == 0 else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True,
    )  # fmt: skip


def _config(path: Path | None, overrides: list[str] | None, strict: bool):
    overrides = list(overrides or [])
    if strict:
        overrides.append("data.strict=true")
    return load_config(path, overrides)


def _stage(stages: list[str] | None, config: Path | None, out: Path, overrides: list[str] | None, resume: str, strict: bool) -> None:
    from selftrain.pipeline import run_pipeline

    if resume not in ("auto", "never"):
        raise typer.BadParameter("--resume must be auto or never")
    cfg = _config(config, overrides, strict)
    folder = run_pipeline(cfg, out, stages=stages, resume=resume)
    if env_rank() == 0:
        console.print(f"[green]done[/green]: {folder}")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    _setup_logging(verbose)


@app.command()
def run(config: ConfigArg = None, out: OutOpt = Path("runs/run"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Run the stages the config lists, in order; --resume auto continues an interrupted run."""
    _stage(None, config, out, set, resume, strict)


@app.command()
def pretrain(config: ConfigArg = None, out: OutOpt = Path("runs/run"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Pre-train the backbone (supervised or SSL); model.weights: pretrain starts teach/student from it."""
    _stage(["pretrain"], config, out, set, resume, strict)


@app.command()
def teach(config: ConfigArg = None, out: OutOpt = Path("runs/run"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Train the teacher on the labeled split."""
    _stage(["teach"], config, out, set, resume, strict)


@app.command()
def label(config: ConfigArg = None, out: OutOpt = Path("runs/run"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Pseudo-label the unlabeled pool with the teacher in --out (round 1)."""
    _stage(["label"], config, out, set, resume, strict)


@app.command()
def student(config: ConfigArg = None, out: OutOpt = Path("runs/run"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Train the student on human + pseudo labels (all rounds: label and student alternate)."""
    _stage(["label", "student"], config, out, set, resume, strict)


@app.command()
def transfer(config: ConfigArg = None, out: OutOpt = Path("runs/run"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Measure every model of --out on the held-out set (and linear-probe / fine-tune them)."""
    _stage(["transfer"], config, out, set, resume, strict)


def _must(stages: list[str] | None, config: Path | None, out: Path, overrides: list[str] | None, resume: str, strict: bool) -> None:
    from selftrain.must.pipeline import run_must

    if resume not in ("auto", "never"):
        raise typer.BadParameter("--resume must be auto or never")
    folder = run_must(_config(config, overrides, strict), out, stages=stages, resume=resume)
    console.print(f"[green]done[/green]: {folder}")


@app.command()
def must(config: ConfigArg = None, out: OutOpt = Path("runs/must"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Multi-task self-training: teachers label the pool, one student learns every task, then the transfer benchmark (when must.transfer declares downstream tasks)."""
    _must(None, config, out, set, resume, strict)


@app.command("must-label")
def must_label(config: ConfigArg = None, out: OutOpt = Path("runs/must"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Train the teachers that need it and label the pool into the multi-task store (OUT/must/label)."""
    _must(["label"], config, out, set, resume, strict)


@app.command("must-student")
def must_student(config: ConfigArg = None, out: OutOpt = Path("runs/must"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """Train the multi-task student on the store of --out and measure it on the teachers' test sets."""
    _must(["student"], config, out, set, resume, strict)


@app.command("must-transfer")
def must_transfer(config: ConfigArg = None, out: OutOpt = Path("runs/must"), set: SetOpt = None, resume: ResumeOpt = "auto", strict: StrictOpt = False) -> None:
    """The MuST transfer benchmark (must.transfer): every init fine-tuned or probed on the downstream tasks; writes the report."""
    _must(["transfer"], config, out, set, resume, strict)


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="an output folder (searched recursively for results.csv)")]) -> None:
    """Write report.md and report.html (table, plots) for an output folder, and print the table."""
    from selftrain.report import build_report, format_table

    summary = build_report(folder)
    typer.echo(format_table(summary))
    console.print(f"report: {summary['paths'].get('html', folder / 'report.html')}")


@app.command()
def demo(
    out: OutOpt = Path("runs/demo"),
    seeds: Annotated[str, typer.Option(help="comma-separated seeds, e.g. 0,1,2")] = "0",
    fractions: Annotated[str, typer.Option("--label-fractions", help="comma-separated label fractions, e.g. 0.01,0.1")] = "0.01",
    config: Annotated[Optional[Path], typer.Option("--config", help="start from this config instead of the defaults")] = None,
    set: SetOpt = None,
) -> None:
    """Fashion-MNIST, 1% labels: supervised baseline vs self-training, on the official test set."""
    from selftrain.demo import run_demo

    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    fraction_list = [float(f) for f in fractions.split(",") if f.strip()]
    run_demo(out, seeds=seed_list, fractions=fraction_list, config=config, overrides=list(set or []))


@app.command()
def curate(
    pool: Annotated[str, typer.Argument(help="the pool's source URI, e.g. imagefolder:/data/pool")],
    out: OutOpt = Path("runs/curate"),
    method: Annotated[str, typer.Option(help="phash (perceptual hash) or embedding (backbone features)")] = "phash",
    threshold: Annotated[Optional[float], typer.Option(help="phash: max Hamming distance (default 10 of 64); embedding: min cosine (default 0.9)")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="embedding: a selftrain model.safetensors (better than the random-init default)")] = None,
    backbone: Annotated[str, typer.Option(help="embedding without --weights: the random-init backbone")] = "cnn-small",
    strict: StrictOpt = False,
) -> None:
    """Find near-duplicates in a pool, report its redundancy and write a de-duplicated pool to --out."""
    from selftrain.curate import find_duplicates, write_curated
    from selftrain.data import build_source

    source = build_source(pool, strict=strict)
    result = find_duplicates(source, method=method, threshold=threshold, weights=weights, backbone=backbone, strict=strict)
    report = write_curated(result, source, out)
    typer.echo(f"{report['images']} images ({report['unreadable']} unreadable), {report['unique']} unique, "
               f"{report['groups']} near-duplicate groups, redundancy {100 * report['redundancy']:.1f}%")  # fmt: skip
    console.print(f"de-duplicated pool: {report['kept_pool']} ({out / 'curate.json'})")


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="study YAML: base (a run config or its path), grid, jobs")],
    out: OutOpt = Path("runs/study"),
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="cells run in parallel processes (default: the study's jobs)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells with a cost estimate from a short timing probe; train nothing")] = False,
    set: SetOpt = None,
) -> None:
    """Run a grid of init x augmentation x label fraction x method x seed (Zoph et al. 2020), resumably."""
    from selftrain.dryrun import dry_run as plan_study, format_plan
    from selftrain.study import load_study, run_study

    spec, base = load_study(config, list(set or []))
    if dry_run:
        typer.echo(format_plan(plan_study(spec, base, out, jobs=jobs)))
        return
    result = run_study(spec, base, out, jobs=jobs)
    console.print(f"[green]done[/green]: {len(result['ran'])} cell(s) run, {len(result['cells'])} in all; "
                  f"{result['rows']} rows in {out / 'results.csv'}; report: {out / 'report.html'}")  # fmt: skip


@app.command()
def faces(
    config: Annotated[Path, typer.Argument(help="face benchmark YAML: base, data, pretrain_data, pretrain_pools, tasks, inits, splits, protocols, seeds")],
    out: OutOpt = Path("runs/faces"),
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="cells run in parallel processes")] = None,
    set: SetOpt = None,
) -> None:
    """Run the face benchmark (Bulat et al. 2021): every face task x init x label fraction / k-shot x protocol x seed."""
    from selftrain.faces import load_benchmark, run_benchmark

    result = run_benchmark(load_benchmark(config, list(set or [])), out, jobs=jobs)
    console.print(f"[green]done[/green]: {len(result['ran'])} cell(s) run, {len(result['cells'])} in all; "
                  f"{result['rows']} rows in {out / 'results.csv'}; report: {out / 'report.html'}")  # fmt: skip


@app.command("config")
def show_config(config: ConfigArg = None, set: SetOpt = None) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    typer.echo(dump_config(_config(config, set, False)), nl=False)


@app.command()
def version() -> None:
    """Print the selftrain version."""
    typer.echo(__version__)


def main() -> None:
    if not sys.stderr.isatty():
        # Progress bars redrawn ten times a second flood CI logs and files; once every 30 s is plenty.
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    try:
        app()
    except ConfigError as err:
        console.print(f"[red]config error[/red]: {escape(str(err))}")
        sys.exit(2)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        # escape: messages quote brackets (gloo's "[.../pair.cc:545]", "stages=[teach]") that rich would read as markup
        console.print(f"[red]error[/red]: {escape(str(err))}")
        sys.exit(1)
