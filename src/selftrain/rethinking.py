"""The report of a study: the table, plots and findings of Zoph et al. (2020).

*Rethinking Pre-training and Self-training* compares initializations (random, supervised and
self-supervised pre-training) across augmentation strength and labeled-data size, with and
without self-training. This module turns a study's ``results.csv`` into

* the **Rethinking table**: per method, rows = init, columns = augmentation × label fraction,
  each cell the mean ± std over seeds and the difference to the random-init supervised
  baseline at the same augmentation and label fraction (paired over seeds); the linear probes
  of the inits (``linear-probe`` cells: frozen backbone, no training) are a table of their own,
  each cell against the random init's probe;
* **plots**: accuracy against label fraction per method and init, pseudo-label accuracy and
  confidence, training curves averaged over the seeds of a grid point;
* **findings**: each claim of the paper, and whether this run supports it, with the margin,
  its spread over seeds and every comparison behind it, or "not measured" when the grid lacks
  the cells the claim needs.

Every comparison is ``gain = better-direction difference`` over the seeds both sides have, so
a positive gain is an improvement for errors (AbsRel, NME) as for accuracies.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.report import _CURVES, _Cell, _Curve, _Grid, _Labels, _num, _panels, _png
from selftrain.results import (
    BASELINE_METHOD, HEADLINE_METRICS, PROBE_METHOD, SETTING, ResultRow, format_fraction, higher_is_better,
)  # fmt: skip

#: The method column of a study's rows, in table order (``supervised`` is the finetune cells' teacher).
STUDY_METHODS = (BASELINE_METHOD, "self-training", "pretrain+self-training")
STRONG_AUGMENT = ("S3", "S4")
_AUGMENT_ORDER = ("none", "S1", "S2", "S3", "S4")

Key = tuple[str, str, str, float]  # (method, init, augment, label fraction)


def read_study(out: Path) -> dict[str, Any] | None:
    """The ``study.json`` of a study folder, or None for any other folder."""
    try:
        record = json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("cells"), list) else None


def _init_order(init: str) -> tuple:
    return (init != "random", init != "supervised", not init.startswith("ssl:"), init)


@dataclass
class Setting:
    """The rows of one (stage, task, dataset) and its headline metric, by grid point and seed.

    ``probe``: the linear probes of the inits (method ``linear-probe``), a setting of their own
    whose baseline is the random init's probe rather than the random-init supervised line.
    """

    stage: str
    task: str
    dataset: str
    metric: str
    values: dict[Key, dict[int, float]]
    probe: bool = False

    @property
    def caption(self) -> str:
        shown = self.metric if higher_is_better(self.metric) else f"{self.metric} (lower is better)"
        if self.probe:
            return f"{self.dataset}: {self.task}, linear probe of each init's frozen backbone (no training), {shown}"
        return f"{self.dataset}: {self.task}, {self.stage} stage, {shown}"

    def baseline(self, augment: str, fraction: float) -> Key:
        """What a grid point is compared with: the random init's probe, or the random-init supervised line."""
        return (PROBE_METHOD if self.probe else BASELINE_METHOD, "random", augment, fraction)

    def axis(self, i: int) -> list:
        """The sorted values of one key column that appear (1 init, 2 augment, 3 label fraction)."""
        found = {k[i] for k in self.values}
        order = {1: _init_order, 2: lambda a: _AUGMENT_ORDER.index(a) if a in _AUGMENT_ORDER else 9, 3: float}[i]
        return sorted(found, key=order)

    def gain(self, better: Key, base: Key) -> dict[int, float] | None:
        """Per seed, how much ``better`` improves on ``base`` (seeds both have); None if either is missing."""
        a, b = self.values.get(better), self.values.get(base)
        if not a or not b:
            return None
        sign = 1.0 if higher_is_better(self.metric) else -1.0
        return {s: sign * (a[s] - b[s]) for s in sorted(set(a) & set(b))} or None


def settings(rows: Sequence[ResultRow]) -> list[Setting]:
    """One :class:`Setting` per (stage, task, dataset), on its headline metric; the linear probes
    of the inits (``linear-probe`` rows, metrics ``linear.*``) one more, after it."""
    by: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        by.setdefault((*(getattr(row, c) for c in SETTING), row.method == PROBE_METHOD), []).append(row)
    out = []
    for key in sorted(by):
        probe = key[-1]
        metrics = [r.metric for r in by[key]]
        headline = [f"linear.{m}" for m in HEADLINE_METRICS] if probe else HEADLINE_METRICS
        metric = next((m for m in headline if m in metrics), metrics[0])
        values: dict[Key, dict[int, float]] = {}
        for r in by[key]:
            if r.metric == metric:
                values.setdefault((r.method, r.init, r.augment, r.label_fraction), {})[r.seed] = r.value
        out.append(Setting(*key[:-1], metric, values, probe=probe))
    return out


def _stats(values: dict[int, float]) -> tuple[float, float, int]:
    v = list(values.values())
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


# ----------------------------------------------------------------------------- table


def _cell(s: Setting, key: Key) -> _Cell:
    values = s.values.get(key)
    method, init, augment, fraction = key
    attrs = {"data-method": method, "data-init": init, "data-augment": augment, "data-fraction": repr(fraction)}
    if not values:
        return _Cell("—", "", attrs)
    mean, std, n = _stats(values)
    attrs.update({"data-mean": repr(mean), "data-std": repr(std), "data-n": str(n)})
    text, note = f"{_num(mean, s.metric)} ± {_num(std, s.metric)}", f"n={n}"
    base = s.baseline(augment, fraction)
    gain = None if key == base else s.gain(key, base)
    if gain:
        delta = statistics.fmean(s.values[key][k] - s.values[base][k] for k in gain)
        spread = statistics.stdev(gain.values()) if len(gain) > 1 else 0.0
        attrs.update({"data-delta": repr(delta), "data-delta-std": repr(spread)})
        note += f"; Δ {_num(delta, s.metric, '+')} ± {_num(spread, s.metric)}"
    return _Cell(text, note, attrs)


def rethinking_grids(all_settings: list[Setting]) -> list[_Grid]:
    """Per setting and method: rows = init, columns = augmentation × label fraction."""
    grids = []
    for s in all_settings:
        columns = [(a, f) for a in s.axis(2) for f in s.axis(3)]
        header = ["Init", *[f"{a} {format_fraction(f)}" for a, f in columns]]
        for method in sorted({k[0] for k in s.values}, key=lambda m: (m not in STUDY_METHODS, STUDY_METHODS.index(m) if m in STUDY_METHODS else 0, m)):
            inits = [i for i in s.axis(1) if any(k[:2] == (method, i) for k in s.values)]
            rows = [[_Cell(init), *[_cell(s, (method, init, a, f)) for a, f in columns]] for init in inits]
            name = "supervised (finetune)" if method == BASELINE_METHOD else method
            versus = "random init's linear probe" if s.probe else "random-init supervised"
            caption = f"Rethinking table, {name}: {s.caption}; mean ± std over seeds, Δ vs {versus}"
            grids.append(_Grid(caption, header, rows))
    return grids


# ----------------------------------------------------------------------------- findings


@dataclass
class Finding:
    """One claim of the paper and what this run says about it."""

    claim: str
    verdict: str  # "supported", "supported within noise" (smallest margin <= its spread), "not supported", "not measured"
    summary: str
    details: list[str]


def _margin(gain: dict[int, float], metric: str) -> str:
    mean, std, n = _stats(gain)
    if n < 2:
        return f"{_num(mean, metric, '+')} (1 seed: no spread)"
    weak = ", within the seed spread" if abs(mean) <= std else ""
    return f"{_num(mean, metric, '+')} ± {_num(std, metric)} (n={n} seeds, paired{weak})"


def _where(key: Key) -> str:
    return f"{key[1]} init, {key[2]}, {format_fraction(key[3])} labels"


def _verdict(claim: str, what: str, comparisons: list[tuple[str, dict[int, float]]], metric: str, missing: str) -> Finding:
    """Supported when every comparison's mean gain is positive; the margin is the smallest one."""
    if not comparisons:
        return Finding(claim, "not measured", missing, [])
    details = [f"{label}: {_margin(g, metric)}" for label, g in comparisons]
    worst_label, worst = min(comparisons, key=lambda c: _stats(c[1])[0])
    ok = all(_stats(g)[0] > 0 for _, g in comparisons)
    mean, std, n = _stats(worst)
    verdict = "not supported" if not ok else "supported within noise" if n > 1 and mean <= std else "supported"
    count = f"{sum(_stats(g)[0] > 0 for _, g in comparisons)} of {len(comparisons)} comparisons"
    summary = f"{what}: {count} positive; smallest margin {_margin(worst, metric)} at {worst_label}."
    return Finding(claim, verdict, summary, details)


def _over_supervised(s: Setting, method: str, inits: list[str], augments: list[str]) -> list[tuple[str, dict[int, float]]]:
    """``method`` against the supervised line of the same init, at every grid point both have."""
    comparisons = []
    for augment in augments:
        for init in inits:
            for f in s.axis(3):
                key = (method, init, augment, f)
                gain = s.gain(key, (BASELINE_METHOD, init, augment, f))
                if gain:
                    comparisons.append((_where(key), gain))
    return comparisons


def _self_training_helps(s: Setting) -> Finding:
    claim = "Self-training helps at every label fraction under strong augmentation (S3/S4)."
    comparisons = _over_supervised(s, "self-training", s.axis(1), [a for a in s.axis(2) if a in STRONG_AUGMENT])
    missing = ("the grid needs self-training and finetune cells with S3 or S4 "
               f"(it has {', '.join(s.axis(2))})")  # fmt: skip
    return _verdict(claim, "self-training minus supervised, same init", comparisons, s.metric, missing)


def _value_of_pretraining(s: Setting, init: str, augment: str, f: float) -> dict[int, float] | None:
    return s.gain((BASELINE_METHOD, init, augment, f), (BASELINE_METHOD, "random", augment, f))


def _pretraining_fades(s: Setting) -> Finding:
    claim = "The value of pre-training falls as labels and augmentation grow."
    comparisons = []
    for init in [i for i in s.axis(1) if i != "random"]:
        fractions, augments = s.axis(3), s.axis(2)
        steps = [((a, fractions[0]), (a, fractions[-1]), "labels") for a in augments if len(fractions) > 1]
        steps += [((augments[0], f), (augments[-1], f), "augmentation") for f in fractions if len(augments) > 1]
        for (a0, f0), (a1, f1), axis in steps:
            low, high = _value_of_pretraining(s, init, a0, f0), _value_of_pretraining(s, init, a1, f1)
            if low and high and (drop := {k: low[k] - high[k] for k in sorted(set(low) & set(high))}):
                where = f"{a0} {format_fraction(f0)} → {a1} {format_fraction(f1)}"
                values = f"{_num(_stats(low)[0], s.metric, '+')} → {_num(_stats(high)[0], s.metric, '+')}"
                comparisons.append((f"{init} init, more {axis} ({where}); value of pre-training {values}", drop))
    missing = ("the grid needs finetune cells of random and a pre-trained init at two or more "
               "label fractions or augmentation strengths")  # fmt: skip
    return _verdict(claim, "fall of (pre-trained minus random init, supervised)", comparisons, s.metric, missing)


def _pretraining_hurts(s: Setting) -> Finding:
    claim = "With the strongest augmentation and the most labels, pre-training hurts."
    comparisons = []
    augment, f = s.axis(2)[-1], s.axis(3)[-1]
    for init in [i for i in s.axis(1) if i != "random"]:
        value = _value_of_pretraining(s, init, augment, f)
        if value:
            comparisons.append((_where((BASELINE_METHOD, init, augment, f)), {k: -v for k, v in value.items()}))
    missing = "the grid needs finetune cells of random and a pre-trained init"
    return _verdict(claim, "random minus pre-trained init, supervised", comparisons, s.metric, missing)


def _self_training_on_pretraining(s: Setting) -> Finding:
    claim = "Self-training improves a pre-trained init."
    comparisons = _over_supervised(s, "pretrain+self-training", [i for i in s.axis(1) if i != "random"], s.axis(2))
    missing = "the grid needs pretrain+self-training and finetune cells with a pre-trained init"
    return _verdict(claim, "pretrain+self-training minus supervised, same init", comparisons, s.metric, missing)


def _ssl_raises_linear_probe(s: Setting) -> Finding:
    claim = "Self-supervised pre-training raises linear-probe accuracy over random init."
    comparisons = []
    for init in [i for i in s.axis(1) if i.startswith("ssl:")]:
        for augment in s.axis(2):
            for f in s.axis(3):
                gain = s.gain((PROBE_METHOD, init, augment, f), (PROBE_METHOD, "random", augment, f))
                if gain:
                    comparisons.append((f"{init} init, {format_fraction(f)} labels", gain))
    missing = ("the grid needs linear-probe cells (grid.method: linear-probe) of random and an ssl:<method> init, "
               "which probe each init's frozen backbone on the labeled split")  # fmt: skip
    return _verdict(claim, "self-supervised minus random init, linear probe of the frozen backbone", comparisons, s.metric, missing)


def findings(all_settings: list[Setting]) -> list[tuple[Setting, list[Finding]]]:
    """The paper's claims, judged on each setting's headline metric; the linear-probe claim on the
    probes' setting (or, where the grid has no probes, "not measured" under the headline setting)."""
    checks = (_self_training_helps, _pretraining_fades, _pretraining_hurts, _self_training_on_pretraining)
    probed = {(s.stage, s.task, s.dataset) for s in all_settings if s.probe}
    out = []
    for s in all_settings:
        if s.probe:
            out.append((s, [_ssl_raises_linear_probe(s)]))
        else:
            unprobed = [_ssl_raises_linear_probe(s)] if (s.stage, s.task, s.dataset) not in probed else []
            out.append((s, [check(s) for check in checks] + unprobed))
    return out


def findings_markup(found: list[tuple[Setting, list[Finding]]], markdown: bool) -> list[str]:
    import html

    out = []
    for s, items in found:
        intro = f"On {s.caption}, gains are in the better direction (positive = improvement)."
        out.append(intro if markdown else f"<p>{html.escape(intro)}</p>")
        for f in items:
            if markdown:
                out.append(f"- **{f.claim}** — *{f.verdict}*. {f.summary}" + "".join(f"\n  - {d}" for d in f.details))
            else:
                details = "".join(f"<li>{html.escape(d)}</li>" for d in f.details)
                out.append(f'<div class="finding" data-verdict="{html.escape(f.verdict)}"><p><b>{html.escape(f.claim)}</b> '
                           f"<i>{html.escape(f.verdict)}</i>. {html.escape(f.summary)}</p>"
                           + (f"<ul>{details}</ul>" if details else "") + "</div>")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- plots


def _fraction_axis(ax: Any, fractions: list[float], label: str) -> None:
    """Label fractions as percentages, on a log axis when they span 5x or more."""
    if len(fractions) > 1 and fractions[-1] / fractions[0] >= 5:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(fractions, [format_fraction(f) for f in fractions])
    ax.set_xlabel(label)


def plot_accuracy(all_settings: list[Setting]) -> bytes | None:
    """Accuracy against label fraction, one line per (method, init), one panel per augmentation."""
    panels = [(s, a) for s in all_settings for a in s.axis(2)]
    if not panels:
        return None
    fig, axes = _panels(len(panels), 5.5, 4.2)
    for ax, (s, augment) in zip(axes, panels):
        lines = sorted({k[:2] for k in s.values if k[2] == augment},
                       key=lambda l: (STUDY_METHODS.index(l[0]) if l[0] in STUDY_METHODS else 9, _init_order(l[1])))  # fmt: skip
        for method, init in lines:
            points = [(f, _stats(s.values[(method, init, augment, f)])) for f in s.axis(3) if (method, init, augment, f) in s.values]
            xs = [p[0] for p in points]
            dash = ("-", "--", ":")[STUDY_METHODS.index(method)] if method in STUDY_METHODS else "-."
            style = {"color": f"C{s.axis(1).index(init) % 10}", "ls": dash}  # colour: init; dashes: method
            ax.errorbar(xs, [p[1][0] for p in points], [p[1][1] for p in points], marker="o", capsize=3, label=f"{method}, {init}", **style)
        _fraction_axis(ax, s.axis(3), "label fraction")
        ax.set_ylabel(f"{s.metric} (mean ± std over seeds)")
        ax.set_title(f"linear probe of the init: {s.dataset}" if s.probe else f"{augment}: {s.dataset} ({s.stage})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def _cells_by_run(study: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"cells/{c['id']}": c for c in study["cells"]}


def plot_pseudo_labels(labels: list[_Labels], study: dict[str, Any]) -> bytes | None:
    """Pseudo-label accuracy and mean confidence against label fraction, per (init, augment)."""
    cells = _cells_by_run(study)
    points: dict[tuple[str, str], dict[float, dict[str, list[float]]]] = {}
    for m in labels:
        cell = cells.get(m.run)
        if cell is None or cell["method"] != "self-training" or m.round != 1:
            continue  # the other methods' stores are the same teacher's labels, or none
        slot = points.setdefault((cell["init"], cell["augment"]), {}).setdefault(cell["label_fraction"], {})
        for name in ("accuracy_all", "mean_confidence"):
            if isinstance(m.stats.get(name), (int, float)):
                slot.setdefault(name, []).append(float(m.stats[name]))
    if not points:
        return None
    fig, axes = _panels(2, 5.5, 4.2)
    for ax, (name, label) in zip(axes, (("accuracy_all", "pseudo-label accuracy (%)"), ("mean_confidence", "mean teacher confidence"))):
        for i, ((init, augment), by_fraction) in enumerate(sorted(points.items())):
            xs = sorted(f for f in by_fraction if by_fraction[f].get(name))
            ys = [np.mean(by_fraction[f][name]) * (100 if name == "accuracy_all" else 1) for f in xs]
            if xs:
                ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=f"{init}, {augment}")
        _fraction_axis(ax, sorted({f for by in points.values() for f in by}), "label fraction (teacher's labels)")
        ax.set_ylabel(f"{label}, mean over seeds")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def study_labels(labels: list[_Labels], study: dict[str, Any]) -> list[_Labels]:
    """The self-training cells' label manifests, named by grid point so that seeds sum in one panel."""
    cells = _cells_by_run(study)
    out = []
    for m in labels:
        cell = cells.get(m.run)
        if cell is not None and cell["method"] == "self-training":
            point = f"{cell['init']}, {cell['augment']}, {format_fraction(cell['label_fraction'])} labels"
            out.append(_Labels(m.seed, m.round, point, m.stats))
    return out


def study_curves(curves: list[_Curve], study: dict[str, Any]) -> list[_Curve]:
    """Training curves averaged over the seeds and label fractions of (stage, method, init, augment)."""
    cells = _cells_by_run(study)
    groups: dict[str, list[_Curve]] = {}
    for c in curves:
        parts = c.label.split("/")
        cell = cells.get("/".join(parts[:2]))
        if cell is None or len(parts) < 3 or parts[2] not in ("teach", "student"):
            continue
        if parts[2] == "teach" and cell["method"] != "finetune":
            continue  # the same teacher as the finetune cell's
        who = "supervised" if parts[2] == "teach" else cell["method"]
        groups.setdefault(f"{who}, {cell['init']}, {cell['augment']}", []).append(c)
    out = []
    for label, members in sorted(groups.items()):
        mean = _Curve(f"{label} (mean of {len(members)})")
        for name in _CURVES:
            series = [dict(zip(*m.series[name])) for m in members if name in m.series]
            steps = sorted(set.intersection(*(set(d) for d in series))) if series else []
            if steps:
                mean.series[name] = (steps, [float(np.mean([d[x] for d in series])) for x in steps])
        if mean.series:
            out.append(mean)
    return out
