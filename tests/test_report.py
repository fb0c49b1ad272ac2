"""The report stage on a synthetic output folder: files, numbers in the HTML, missing inputs."""

from __future__ import annotations

import base64
import json
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from selftrain.report import build_report, format_table
from selftrain.results import ResultRow, ResultsTable

PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
FRACTIONS = (0.01, 0.1)
# top1 (percent) per (method, fraction) for seeds 0, 1, 2; the means are computed by hand below.
TOP1 = {
    ("supervised", 0.01): (71.0, 72.5, 70.0),
    ("supervised", 0.1): (84.0, 84.5, 85.5),
    ("self-training", 0.01): (75.0, 75.5, 76.0),
    ("self-training", 0.1): (85.0, 86.5, 86.0),
}
MEANS = {
    ("supervised", 0.01): 213.5 / 3,
    ("supervised", 0.1): 254.0 / 3,
    ("self-training", 0.01): 75.5,
    ("self-training", 0.1): 257.5 / 3,
}


def _rows(seed: int) -> list[ResultRow]:
    rows = []
    for (method, fraction), values in TOP1.items():
        rnd, augment = (0, "S1") if method == "supervised" else (1, "S4")
        for metric, value in (("top1", values[seed]), ("top5", 99.0), ("loss", 0.4)):
            rows.append(ResultRow("transfer", method, "random", augment, "classification", "fashion-mnist:test",
                                  fraction, seed, rnd, metric, value, 30.0 + seed))  # fmt: skip
    return rows


def _manifest(seed: int) -> dict:
    edges = [i / 20 for i in range(21)]
    correct = [0] * 10 + [1, 2, 3, 4, 5, 6, 8, 10, 20, 40]
    wrong = [0] * 10 + [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    stats = {
        "kept": 140, "unique": 140, "per_class": [10, 20, 30, 80], "mean_confidence": 0.83,
        "accuracy_all": 0.7, "accuracy_kept": 0.75,
        "confidence_histogram": {"edges": edges, "counts": [c + w for c, w in zip(correct, wrong)]},
        "confidence_histogram_correct": {"edges": edges, "counts": correct},
        "confidence_histogram_wrong": {"edges": edges, "counts": wrong},
    }  # fmt: skip
    return {"stage": "label", "round": 1, "seed": seed, "task": "classification",
            "stats": {"classification": stats}}  # fmt: skip


def _curve(path: Path, start: float, torn: bool = False) -> None:
    lines = [json.dumps({"step": s, "loss": start / s, "lr": 0.1, "eval_top1": 50 + s}) for s in range(1, 40, 3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n{\"step\": 4" if torn else "\n"))


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    for seed in SEEDS:
        run = tmp_path / f"seed-{seed}"
        ResultsTable(run / "results.csv").add(_rows(seed))
        (run / "label" / "round-1").mkdir(parents=True)
        (run / "label" / "round-1" / "manifest.json").write_text(json.dumps(_manifest(seed)))
    _curve(tmp_path / "seed-0" / "teach" / "metrics.jsonl", 2.0)
    _curve(tmp_path / "seed-0" / "student" / "round-1" / "metrics.jsonl", 3.0, torn=True)
    return tmp_path


class _Tables(HTMLParser):
    """Every <table> as a header and rows of (attrs, text) cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.cell: tuple[dict, list[str]] | None = None
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.cell = (dict(attrs), [])
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            table, (attrs, text) = self.tables[-1], self.cell
            (table["header"] if tag == "th" else table["rows"][-1]).append((attrs, "".join(text).strip()))
            self.cell = None


def _parse(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_numbers_match_the_csv(out_dir: Path) -> None:
    summary = build_report(out_dir, title="Synthetic <run>")
    assert summary["paths"]["html"] == str(out_dir / "report.html")
    assert "<h1>Synthetic &lt;run&gt;</h1>" in (out_dir / "report.html").read_text()
    parser = _parse(out_dir / "report.html")
    main = parser.tables[0]
    header = [text for _, text in main["header"]]
    assert header == ["Method", "Augment", "Round", "1%", "Δ 1%", "10%", "Δ 10%"]
    body = [row for row in main["rows"] if row]
    assert [(row[0][1], row[2][1]) for row in body] == [("supervised", "0"), ("self-training", "1")]
    seen = 0
    for row in body:
        method = row[0][1]
        for fraction, label in zip(FRACTIONS, ("1%", "10%")):
            attrs, text = row[header.index(label)]
            expected = MEANS[method, fraction]
            assert float(attrs["data-mean"]) == pytest.approx(expected, abs=1e-12)
            assert float(attrs["data-std"]) == pytest.approx(statistics.stdev(TOP1[method, fraction]))
            assert text.startswith(f"{expected:.2f} ± ") and "n=3" in text
            seen += 1
    assert seen == 4
    # Deltas: difference of means, spread from the per-seed paired differences.
    for fraction, label in zip(FRACTIONS, ("1%", "10%")):
        diffs = [s - b for s, b in zip(TOP1["self-training", fraction], TOP1["supervised", fraction])]
        (delta,) = [d for d in summary["deltas"] if d["label_fraction"] == fraction]
        assert delta["delta"] == pytest.approx(MEANS["self-training", fraction] - MEANS["supervised", fraction])
        assert delta["std"] == pytest.approx(statistics.stdev(diffs)) and delta["paired"]
        attrs, _ = body[1][header.index(f"Δ {label}")]
        assert float(attrs["data-delta"]) == pytest.approx(delta["delta"])
    assert {(e["method"], e["label_fraction"]): e["mean"] for e in summary["table"]} == pytest.approx(MEANS)
    assert all(e["metric"] == "top1" and e["n"] == 3 for e in summary["table"])


def test_report_files_plots_and_text(out_dir: Path) -> None:
    summary = build_report(out_dir)
    assert summary["skipped_plots"] == {}
    for name in ("accuracy", "confidence", "curves"):
        png = Path(summary["paths"][name])
        assert png == out_dir / "plots" / f"{name}.png" and png.read_bytes().startswith(PNG)
        assert len(png.read_bytes()) > 5000  # something was drawn
    parser = _parse(out_dir / "report.html")
    assert len(parser.images) == 3  # self-contained: no file links
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(PNG) for src in parser.images)
    labels = parser.tables[1]
    assert [t for _, t in labels["rows"][1]][:3] == ["seed-0", "0", "1"]
    assert "70.00%" in [t for _, t in labels["rows"][1]]
    md = (out_dir / "report.md").read_text()
    assert "label fractions 1%, 10%" in md and "seeds 0, 1, 2" in md and "augment S1, S4" in md
    assert "plots/accuracy.png" in md and "plots/confidence.png" in md and "plots/curves.png" in md
    assert f"| {MEANS['self-training', 0.01]:.2f} ± 0.50 (n=3) |" in md
    assert "seed-0/student/round-1/metrics.jsonl: skipped 1 unusable line(s)." in md
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith(".")) == []  # no temp files
    text = format_table(summary)
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["Method", "Augment", "Round"]
    assert any(line.startswith("self-training") and "75.50 ± 0.50 (n=3)" in line for line in lines)
    column = lines[1].index("1%")  # aligned: every row's 1% cell starts under its header
    assert [line[column:].split(" ")[0] for line in lines[3:]] == ["71.17", "75.50"]


def test_missing_inputs_still_render_and_say_which_plot_is_absent(out_dir: Path) -> None:
    build_report(out_dir)
    for path in out_dir.glob("seed-*/label"):
        for f in sorted(path.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        path.rmdir()
    for f in out_dir.rglob("metrics.jsonl"):
        f.unlink()
    summary = build_report(out_dir)
    assert set(summary["skipped_plots"]) == {"confidence", "curves"}
    assert summary["paths"]["confidence"] is None and not (out_dir / "plots" / "confidence.png").exists()
    md = (out_dir / "report.md").read_text()
    assert "Plot skipped: confidence.png" in md and "Plot skipped: curves.png" in md
    assert "No pseudo-label manifest" in md
    assert "Plot skipped: curves.png" in (out_dir / "report.html").read_text()


def test_empty_folder_renders_an_empty_report(tmp_path: Path) -> None:
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "manifest.json").write_text("{broken")
    summary = build_report(tmp_path)
    assert summary["table"] == [] and summary["deltas"] == [] and len(summary["skipped_plots"]) == 3
    md = (tmp_path / "report.md").read_text()
    assert "No results.csv was found" in md and "Plot skipped: accuracy.png" in md
    assert "label/manifest.json has no usable classification statistics" in md
    assert format_table(summary) == "No results."
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "missing")


def test_histograms_from_selection_stats_are_read_with_their_split():
    """The store writes correct/wrong histograms as bare count lists sharing the main edges."""
    import numpy as np

    from selftrain.report import _hist
    from selftrain.selection import select_records, selection_stats

    label = np.array([0, 1, 1, 0])
    conf = np.array([0.95, 0.4, 0.8, 0.99], dtype=np.float32)
    rows, repeat = select_records(label, conf)
    stats = selection_stats(label, conf, rows, repeat, 2, truth=np.array([0, 0, 1, 0]))
    edges, total = _hist(stats, "confidence_histogram")
    _, correct = _hist(stats, "confidence_histogram_correct", edges)
    _, wrong = _hist(stats, "confidence_histogram_wrong", edges)
    assert correct.sum() == 3 and wrong.sum() == 1 and np.array_equal(correct + wrong, total)
