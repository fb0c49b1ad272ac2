"""The ``report`` stage: a Markdown and a self-contained HTML report of an output folder.

It reads every ``results.csv`` below the folder, the pseudo-label manifests
(``**/label/**/manifest.json``) and the training curves (``**/metrics.jsonl``), draws three
plots into ``plots/`` and writes ``report.md`` and ``report.html``, every file atomically.
Missing or damaged optional inputs never fail the report: it says what is absent instead.

Example:
    >>> summary = build_report("runs/demo")
    >>> print(format_table(summary))
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from selftrain.atomic import atomic_write_bytes
from selftrain.results import (
    BASELINE_METHOD, LINE, LOWER_IS_BETTER, SETTING, describe, format_fraction, higher_is_better, main_table,
    read_results,
)  # fmt: skip

_TABLE = (*SETTING, "metric")
_CURVES = {"loss": "training loss", "eval_top1": "eval top1"}  # metrics.jsonl key -> axis label
_DELTA_NOTE = (
    f"Δ: difference of means against the {BASELINE_METHOD} line at the same label fraction; "
    "± is the sample std of the per-seed paired differences (only when both have the same seeds)."
)
_LOWER_NOTE = (
    f"For a metric where lower is better ({', '.join(sorted(LOWER_IS_BETTER - {'loss'}))}), "
    "a negative Δ is the improvement."
)
_STUDY_NOTE = (
    "Each cell: mean ± std over seeds (n seeds); Δ: difference of means against the random-init supervised "
    "(finetune) line at the same augmentation and label fraction, over the seeds both have, ± the sample std "
    "of the per-seed differences. Methods: supervised = the teacher alone (finetune cells); self-training = "
    "teacher from the init, student from random weights; pretrain+self-training = both from the init; "
    "linear-probe = no training: a linear classifier on the init's frozen backbone features of the labeled split, "
    "its Δ against the random init's probe."
)
#: Metrics stored in percent, shown with two decimals.
_PERCENT = ("top", "acc", "miou", "ap", "delta1", "pixel_acc", "coverage", "nme")
_CSS = """body{font-family:system-ui,sans-serif;max-width:75rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}caption{text-align:left;font-weight:600;padding:.3rem 0}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.n{color:#888;font-size:.8em}
figure{margin:1rem 0}img{max-width:100%;border:1px solid #eee}.finding{margin:.6rem 0}"""


@dataclass
class _Cell:
    text: str
    note: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    bold: bool = False

    def plain(self) -> str:
        return f"{self.text} ({self.note})" if self.note else self.text

    def markdown(self) -> str:
        text = f"**{self.text}**" if self.bold else self.text
        return f"{text} ({self.note})" if self.note else text


@dataclass
class _Grid:
    caption: str
    header: list[str]
    rows: list[list[_Cell]]


@dataclass
class _Labels:
    seed: int
    round: int
    run: str  # the folder holding label/, relative to the report folder
    stats: dict[str, Any]


@dataclass
class _Curve:
    label: str  # the run/stage folder, e.g. seed-0/student/round-1
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # name -> (steps, values)


@dataclass
class _Plot:
    caption: str
    png: bytes | None
    reason: str


def _num(x: float, metric: str, sign: str = "") -> str:
    # Accuracies are stored in percent, where two decimals is the precision that matters.
    return f"{x:{sign}.2f}" if metric.rsplit(".", 1)[-1].startswith(_PERCENT) else f"{x:{sign}.4g}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _by(entries: Iterable[dict[str, Any]], cols: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(tuple(entry[c] for c in cols), []).append(entry)
    return groups


# ----------------------------------------------------------------------------- tables


def _value_cell(group: dict[str, Any] | None, metric: str) -> _Cell:
    if group is None:
        return _Cell("—")
    attrs = {"data-mean": repr(group["mean"]), "data-std": repr(group["std"]), "data-n": str(group["n"])}
    return _Cell(f"{_num(group['mean'], metric)} ± {_num(group['std'], metric)}", f"n={group['n']}", attrs)


def _delta_cell(delta: dict[str, Any] | None, metric: str) -> _Cell:
    if delta is None:
        return _Cell("")
    text, attrs = _num(delta["delta"], metric, "+"), {"data-delta": repr(delta["delta"])}
    # Where lower is better the sign alone misleads a reader used to accuracies: say which way it went.
    verdict = "" if higher_is_better(metric) or delta["delta"] == 0 else ", better" if delta["delta"] < 0 else ", worse"
    if delta["std"] is None:
        return _Cell(text, f"unpaired seeds{verdict}", attrs)
    attrs["data-delta-std"] = repr(delta["std"])
    return _Cell(f"{text} ± {_num(delta['std'], metric)}", f"n={delta['n']} paired{verdict}", attrs)


def _grids(summary: dict[str, Any]) -> list[_Grid]:
    """One pivoted table per setting: lines = (method, round), columns = label fractions."""
    deltas = {tuple(d[c] for c in (*_TABLE, *LINE, "label_fraction")): d for d in summary["deltas"]}
    grids = []
    for setting, groups in _by(summary["table"], _TABLE).items():
        stage, task, dataset, metric = setting
        fractions = sorted({g["label_fraction"] for g in groups})
        varying = [c for c in ("init", "augment") if len({g[c] for g in groups}) > 1]
        with_delta = any(k[: len(_TABLE)] == setting for k in deltas)
        header = ["Method", *[c.capitalize() for c in varying], "Round"]
        for f in fractions:
            header += [format_fraction(f), f"Δ {format_fraction(f)}"] if with_delta else [format_fraction(f)]
        rows = []
        for line, members in _by(groups, LINE).items():
            cells = {g["label_fraction"]: g for g in members}
            row = [_Cell(line[0]), *[_Cell(str(members[0][c])) for c in varying], _Cell(str(line[3]))]
            for f in fractions:
                row.append(_value_cell(cells.get(f), metric))
                if with_delta:
                    row.append(_delta_cell(deltas.get((*setting, *line, f)), metric))
            rows.append(row)
        shown = metric if higher_is_better(metric) else f"{metric} (lower is better)"
        grids.append(_Grid(f"{dataset}: {task}, {stage} stage, {shown}, mean ± std over seeds", header, rows))
    return grids


def _as_pct(x: Any) -> str:
    # The label stage stores accuracies as fractions; a value above 1 is taken as percent already.
    return f"{x * 100 if abs(x) <= 1 else x:.2f}%" if _finite(x) else "—"


def _count(x: Any) -> str:
    return "—" if not _finite(x) else f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def _quality(stats: dict[str, Any]) -> str:
    """A dense task's pseudo-label quality against the pool's hidden targets, e.g. ``miou 61.2, coverage 88``."""
    quality = stats.get("quality")
    if not isinstance(quality, dict):
        return "—"
    return ", ".join(f"{k} {_num(v, k)}" for k, v in quality.items() if _finite(v)) or "—"


def _labels_grid(labels: list[_Labels]) -> _Grid:
    header = ["Run", "Seed", "Round", "Kept", "Unique", "Mean confidence", "Accuracy (all)", "Accuracy (kept)",
              "Kept per class"]  # fmt: skip
    dense = any("quality" in m.stats for m in labels)
    if dense:
        header.append("Quality (all records)")
    rows = []
    for m in labels:
        s = m.stats
        per = s.get("per_class")  # kept records per class (a list; a {class: count} map also works)
        per = list(per.values()) if isinstance(per, dict) else per if isinstance(per, list) else []
        per = [v for v in per if _finite(v)]
        texts = [
            m.run, str(m.seed), str(m.round), _count(s.get("kept")), _count(s.get("unique")),
            f"{s['mean_confidence']:.3f}" if _finite(s.get("mean_confidence")) else "—",
            _as_pct(s.get("accuracy_all")), _as_pct(s.get("accuracy_kept")),
            f"{min(per):g}–{max(per):g} over {len(per)} classes" if per else "—",
        ]  # fmt: skip
        if dense:
            texts.append(_quality(s))
        rows.append([_Cell(t) for t in texts])
    return _Grid("Pseudo labels per run and round (accuracies against the pool's hidden labels)", header, rows)


# ----------------------------------------------------------------------------- inputs


def _load_manifests(out: Path, notes: list[str]) -> list[_Labels]:
    found = []
    for path in sorted(set(out.glob("**/label/**/manifest.json"))):
        rel = path.relative_to(out)
        parts = rel.parts
        run = "/".join(parts[: parts.index("label")]) or "."
        task = "classification"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            task = str(manifest.get("task", task))
            stats = manifest["stats"][task]
            if not isinstance(stats, dict):
                raise TypeError(f"stats.{task} is not an object")
            seed, rnd = manifest.get("seed"), manifest.get("round")
            found.append(_Labels(int(0 if seed is None else seed), int(1 if rnd is None else rnd), run, stats))
        except (OSError, ValueError, KeyError, TypeError) as err:
            why = f"{type(err).__name__}: {err}"
            notes.append(f"{rel.as_posix()} has no usable {task} statistics ({why}).")
    return sorted(found, key=lambda m: (m.run, m.round, m.seed))


def _read_curve(path: Path, label: str) -> tuple[_Curve, int]:
    """One metrics.jsonl as a curve, and how many lines could not be used."""
    curve, bad = _Curve(label), 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a run killed mid-write can leave a torn last line
            bad += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not _finite(step):
            bad += 1
            continue
        for name in _CURVES:
            if _finite(record.get(name)):
                steps, values = curve.series.setdefault(name, ([], []))
                steps.append(step)
                values.append(record[name])
    return curve, bad


def _load_curves(out: Path, notes: list[str]) -> list[_Curve]:
    curves = []
    for path in sorted(out.rglob("metrics.jsonl")):
        rel = path.relative_to(out)
        try:
            curve, bad = _read_curve(path, rel.parent.as_posix() or ".")
        except OSError as err:
            notes.append(f"{rel.as_posix()} is unreadable ({err}).")
            continue
        if bad:
            notes.append(f"{rel.as_posix()}: skipped {bad} unusable line(s).")
        if curve.series:
            curves.append(curve)
    return curves


# ----------------------------------------------------------------------------- plots


def _png(fig: Figure) -> bytes:
    # A bare Figure renders with Agg and touches no pyplot global state, so a report can be
    # built from any thread, or next to an interactive session, without switching its backend.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _panels(n: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _plot_accuracy(summary: dict[str, Any]) -> bytes | None:
    settings = _by(summary["table"], _TABLE)
    if not settings:
        return None
    fig, axes = _panels(len(settings), 5.5, 4.2)
    for ax, ((stage, _task, dataset, metric), groups) in zip(axes, settings.items()):
        fractions = sorted({g["label_fraction"] for g in groups})
        lines = _by(groups, LINE)
        variants = len({k[1:3] for k in lines}) > 1
        names = [f"{k[0]} r{k[3]}" + (f" ({k[1]}, {k[2]})" if variants else "") for k in lines]
        for i, members in enumerate(lines.values()):
            offset = (i - (len(lines) - 1) / 2) * 0.8 / len(lines)
            for j, g in enumerate(members):
                x = fractions.index(g["label_fraction"]) + offset if len(fractions) > 1 else i
                color, name = f"C{i % 10}", names[i] if j == 0 else None
                ax.scatter([x] * g["n"], g["values"], s=14, color=color, alpha=0.45, zorder=2)
                ax.errorbar([x], [g["mean"]], [g["std"]], fmt="o", color=color, capsize=4, zorder=3, label=name)
        if len(fractions) > 1:
            ax.set_xticks(range(len(fractions)), [format_fraction(f) for f in fractions])
            ax.set_xlabel("label fraction")
            ax.legend(fontsize=7)
        else:
            ax.set_xticks(range(len(lines)), names, rotation=20, ha="right")
            ax.set_xlabel(f"label fraction {format_fraction(fractions[0])}")
        lower = "" if higher_is_better(metric) else ", lower is better"
        ax.set_ylabel(f"{metric} (dots: seeds; bars: mean ± std{lower})")
        ax.set_title(f"{dataset} ({stage})", fontsize=9)
        ax.grid(alpha=0.3)
    return _png(fig)


def _hist(stats: dict[str, Any], key: str, edges: np.ndarray | None = None) -> tuple[np.ndarray, ...] | None:
    """``(edges, counts)`` of a well-formed histogram; given ``edges``, only one on those bins.

    The correct/wrong histograms may omit their edges, or be bare count lists (as
    :func:`selftrain.selection.selection_stats` writes them): they share the main one's edges.
    """
    hist = stats.get(key)
    if isinstance(hist, list):
        hist = {"counts": hist}
    try:
        own = np.asarray(hist.get("edges", edges), float)
        counts = np.asarray(hist["counts"], float)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if own.ndim != 1 or len(own) < 2 or counts.shape != (len(own) - 1,):
        return None
    if edges is not None and (own.shape != edges.shape or not np.allclose(own, edges)):
        return None
    return own, counts


def _summed(stats: list[dict[str, Any]], key: str, edges: np.ndarray) -> np.ndarray | None:
    """One histogram summed over seeds; None unless every seed has it on ``edges``."""
    hists = [_hist(s, key, edges) for s in stats]
    return sum(h[1] for h in hists) if all(h is not None for h in hists) else None


def _plot_confidence(labels: list[_Labels]) -> bytes | None:
    # Seeds of one configuration are summed per round; folders named seed-N are seeds, so
    # their parent folder (e.g. fraction-0.01) names the configuration.
    panels: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in labels:
        if _hist(m.stats, "confidence_histogram") is not None:
            config = "/".join(p for p in m.run.split("/") if not re.fullmatch(r"seed[-_]?\d+", p)) or "."
            panels.setdefault((config, m.round), []).append(m.stats)
    if not panels:
        return None
    fig, axes = _panels(len(panels), 5.0, 3.8)
    for ax, ((config, rnd), stats) in zip(axes, sorted(panels.items())):
        edges, _ = _hist(stats[0], "confidence_histogram")
        alike = [s for s in stats if _hist(s, "confidence_histogram", edges) is not None]  # on the same bins
        total = {kind: _summed(alike, f"confidence_histogram{kind}", edges) for kind in ("", "_correct", "_wrong")}
        left, widths = edges[:-1], np.diff(edges)
        if total["_correct"] is not None and total["_wrong"] is not None:
            ax.bar(left, total["_correct"], widths, align="edge", color="C2", label="correct")
            ax.bar(left, total["_wrong"], widths, total["_correct"], align="edge", color="C3", label="wrong")
            ax.legend(fontsize=8)
        else:
            ax.bar(left, total[""], widths, align="edge")
        where = "" if config == "." else f"{config}, "
        ax.set_title(f"{where}round {rnd}: {len(alike)} seed(s)", fontsize=9)
        ax.set_xlabel("teacher confidence")
        ax.set_ylabel("pool images")
    return _png(fig)


def _plot_curves(curves: list[_Curve]) -> bytes | None:
    panels = [(name, [c for c in curves if name in c.series]) for name in _CURVES]
    panels = [(name, items) for name, items in panels if items]
    if not panels:
        return None
    fig, axes = _panels(len(panels), 6.5, 4.2)
    for ax, (name, items) in zip(axes, panels):
        for c in items:
            xs, ys = c.series[name]
            marker = "o" if len(xs) < 5 else None
            i = curves.index(c)  # the same run keeps its colour across panels; styles beyond 10 runs
            style = {"color": f"C{i % 10}", "ls": ("-", "--", ":")[i // 10 % 3], "marker": marker}
            ax.plot(xs, ys, lw=1.2, label=c.label, **style)
        losses = [y for c in items for y in c.series[name][1]] if name == "loss" else []
        # A loss that falls by an order of magnitude or more is unreadable on a linear axis.
        if losses and min(losses) > 0 and max(losses) / min(losses) >= 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(_CURVES[name])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


# ----------------------------------------------------------------------------- rendering


def _md_table(grid: _Grid) -> str:
    lines = [f"**{grid.caption}**", "", "| " + " | ".join(grid.header) + " |", "|" + "---|" * len(grid.header)]
    lines += ["| " + " | ".join(c.markdown().replace("|", "\\|") for c in row) + " |" for row in grid.rows]
    return "\n".join(lines)


def _html_table(grid: _Grid) -> str:
    def cell(c: _Cell) -> str:
        attrs = "".join(f' {k}="{html.escape(v)}"' for k, v in c.attrs.items())
        note = f' <span class="n">({html.escape(c.note)})</span>' if c.note else ""
        text = f"<b>{html.escape(c.text)}</b>" if c.bold else html.escape(c.text)
        return f"<td{attrs}>{text}{note}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in grid.header)
    body = "\n".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in grid.rows)
    return (f"<table><caption>{html.escape(grid.caption)}</caption>\n<thead><tr>{head}</tr></thead>\n"
            f"<tbody>\n{body}\n</tbody></table>")  # fmt: skip


def format_table(summary: dict[str, Any]) -> str:
    """The main tables of a :func:`build_report` summary as aligned plain text."""
    blocks = []
    for grid in [*summary.get("must_transfer", []), *(summary.get("rethinking") or _grids(summary))]:
        texts = [grid.header] + [[c.plain() for c in row] for row in grid.rows]
        widths = [max(len(r[i]) for r in texts) for i in range(len(grid.header))]
        lines = ["  ".join(t.ljust(w) for t, w in zip(r, widths)).rstrip() for r in texts]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join([grid.caption, *lines]))
    return "\n\n".join(blocks) if blocks else "No results."


def _sections(doc: dict[str, Any], markdown: bool) -> list[str]:
    """The report body in Markdown or HTML; both share every decision but the markup."""

    def h2(s: str) -> str:
        return f"## {s}" if markdown else f"<h2>{html.escape(s)}</h2>"

    def para(s: str) -> str:
        return s if markdown else f"<p>{html.escape(s)}</p>"

    from selftrain.must.benchmark_report import section

    table = _md_table if markdown else _html_table
    from selftrain.face_pools import pools_section
    from selftrain.faces import frl_section

    first = section(doc["rows"], markdown, table)  # the MuST transfer benchmark, when the folder has one
    first += frl_section(doc["rows"], markdown, table, _Grid, _Cell)  # the face benchmark, when it has one
    first += pools_section(doc["rows"], doc.get("pools", {}), markdown, table, _Grid, _Cell)  # and its pre-training pools
    note = _DELTA_NOTE if doc["grids"] else "No results."
    if any("(lower is better)" in g.caption for g in doc["grids"]):
        note += " " + _LOWER_NOTE
    if "findings" in doc:
        from selftrain.rethinking import findings_markup

        note = _STUDY_NOTE if doc["grids"] else "No results."
        out = [h2("Rethinking table"), *[table(g) for g in doc["grids"]], para(note)]
        out += [h2("Findings"), *(findings_markup(doc["findings"], markdown) or [para("No results.")])]
    else:
        out = [h2("Results"), *[table(g) for g in doc["grids"]], para(note)]
    out = first + out
    out.append(h2("Pseudo-label statistics"))
    no_labels = "No pseudo-label manifest with statistics was found."
    out.append(table(doc["labels"]) if doc["labels"].rows else para(no_labels))
    out.append(h2("Plots"))
    for name, plot in doc["plots"].items():
        if plot.png is None:
            out.append(para(f"Plot skipped: {name}.png ({plot.caption}): {plot.reason}."))
        elif markdown:
            out.append(f"![{plot.caption}](plots/{name}.png)")
        else:
            src = "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")
            caption = html.escape(plot.caption)
            out.append(f'<figure><img alt="{caption}" src="{src}"><figcaption>{caption}</figcaption></figure>')
    if doc["notes"]:
        items = [f"- {n}" if markdown else f"<li>{html.escape(n)}</li>" for n in doc["notes"]]
        out += [h2("Notes"), "\n".join(items) if markdown else "<ul>" + "".join(items) + "</ul>"]
    return out


def _write_plots(out: Path, plots: dict[str, _Plot]) -> dict[str, str | None]:
    paths: dict[str, str | None] = {}
    for name, plot in plots.items():
        target = out / "plots" / f"{name}.png"
        if plot.png is None:
            target.unlink(missing_ok=True)  # a stale plot of an earlier build would contradict the report
            paths[name] = None
        else:
            atomic_write_bytes(target, plot.png)
            paths[name] = str(target)
    return paths


def build_report(out_dir: str | Path, *, title: str | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``out_dir``.

    Args:
        out_dir: An output folder; results, manifests and curves are found recursively.
        title: The report title; default ``"selftrain report: <folder name>"``.

    Returns:
        ``table``: one entry per (stage, task, dataset, method, init, augment, round, label
        fraction) with ``metric``, ``mean``, ``std``, ``n``, ``seeds``, ``values``;
        ``deltas``: each line against the supervised line (see :func:`selftrain.results.main_table`);
        ``paths``: ``md``, ``html`` and one per plot (None when skipped); ``skipped_plots``:
        {plot: reason}; ``pseudo_labels``: the numeric statistics per manifest; ``notes``:
        inputs that were present but unusable.

    Raises:
        FileNotFoundError: ``out_dir`` is not a folder.
        ValueError: A results.csv is malformed (the message names the file and line).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no such output folder: {out}")
    from selftrain import rethinking

    notes: list[str] = []
    study = rethinking.read_study(out)
    # A study's results.csv is built from its cells' rows relabeled in study terms: it alone counts.
    # So is a face benchmark's (selftrain.faces): its cells' own results.csv carry the runs' raw labels.
    own = study is not None or (out / "benchmark.json").exists()
    rows = read_results(out) if not own else read_results(out / "results.csv") if (out / "results.csv").exists() else []
    labels, curves = _load_manifests(out, notes), _load_curves(out, notes)
    table, deltas = main_table(rows)
    summary: dict[str, Any] = {"table": table, "deltas": deltas}
    doc = {"grids": _grids(summary), "labels": _labels_grid(labels), "notes": notes, "rows": rows}
    from selftrain import face_pools
    from selftrain.must import benchmark_report

    if cols := benchmark_report.columns(rows):
        summary["must_transfer"] = [benchmark_report.transfer_grid(cols)]
        summary["must_verdict"] = vars(benchmark_report.verdict(cols))
    if study is None:
        plots = {
            "accuracy": _Plot("accuracy per method", _plot_accuracy(summary), "no rows in any results.csv"),
            "confidence": _Plot("pseudo-label confidence", _plot_confidence(labels),
                                "no label manifest with a confidence histogram"),
            # A MuST benchmark's cells are dozens of short fine-tunings: their curves would bury the rest.
            "curves": _Plot("training curves", _plot_curves([c for c in curves if not c.label.startswith("must/benchmark/cells/")]),
                            "no metrics.jsonl with loss or eval_top1 values"),
        }  # fmt: skip
        if (pools := face_pools.read_pools(out)) and (out / "benchmark.json").exists():
            doc["pools"] = pools
            plots["pool_size"] = _Plot("downstream metric against pre-training pool size (nested subsets)",
                                       face_pools.plot_pool_sizes(rows, pools), "no pool with sizes")  # fmt: skip
    else:
        settings = rethinking.settings(rows)
        found = rethinking.findings(settings)
        doc.update(grids=rethinking.rethinking_grids(settings), findings=found)
        summary["rethinking"] = doc["grids"]
        summary["findings"] = [{"setting": s.caption, **vars(f)} for s, items in found for f in items]
        plots = {
            "accuracy": _Plot("accuracy against label fraction per method and init",
                              rethinking.plot_accuracy(settings), "no rows in results.csv"),
            "pseudo_labels": _Plot("pseudo-label accuracy and confidence (self-training cells)",
                                   rethinking.plot_pseudo_labels(labels, study), "no self-training cell with a label manifest"),
            "confidence": _Plot("teacher confidence of the pseudo labels, correct and wrong, seeds summed",
                                _plot_confidence(rethinking.study_labels(labels, study)),
                                "no self-training cell with a confidence histogram"),
            "curves": _Plot("training curves, mean over seeds and label fractions",
                            _plot_curves(rethinking.study_curves(curves, study)), "no finished cell with metrics.jsonl"),
        }  # fmt: skip
    doc["plots"] = plots
    paths = {"md": str(out / "report.md"), "html": str(out / "report.html"), **_write_plots(out, plots)}
    title = title or f"selftrain report: {out.resolve().name}"
    intro = describe(rows)
    md = "\n\n".join([f"# {title}", intro, *_sections(doc, markdown=True)]) + "\n"
    body = "\n".join([f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", *_sections(doc, False)])
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")  # fmt: skip
    atomic_write_bytes(out / "report.md", md.encode("utf-8"))
    atomic_write_bytes(out / "report.html", page.encode("utf-8"))
    pseudo = [{"run": m.run, "seed": m.seed, "round": m.round, **{k: v for k, v in m.stats.items() if _finite(v)}}
              for m in labels]  # fmt: skip
    skipped = {name: plot.reason for name, plot in plots.items() if plot.png is None}
    return {**summary, "paths": paths, "skipped_plots": skipped, "pseudo_labels": pseudo, "notes": notes}
