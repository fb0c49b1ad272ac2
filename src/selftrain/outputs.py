"""The output folder of a run: one sub-folder per stage, plus the provenance of every artifact.

::

    OUT/
      config.yaml        resolved config (every default written out)
      run.json           package version, git commit, command line, start time
      splits/            the labeled split's image keys (repeatable runs)
      data.json          sources, sizes, skipped images (processed + skipped = total), dropped annotations
      pretrain/          backbone.safetensors (+ .json: method, steps, probe accuracy), metrics.jsonl, checkpoints/, done.json
      teach/             model.safetensors (+ .json), metrics.jsonl, checkpoints/, done.json
      label/round-1/     the pseudo-label store: shard-*.parquet, selection.parquet, manifest.json
      student/round-1/   like teach/
      transfer/          metrics of each model on the held-out set
      results.csv        tidy results, one row per measured value
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from selftrain import __version__
from selftrain.atomic import atomic_write_text
from selftrain.config import Config, dump_config


def git_commit() -> str | None:
    """The commit of the selftrain checkout, when it runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_done(folder: Path) -> dict | None:
    """The ``done.json`` a finished stage left in ``folder``, or None."""
    done = folder / "done.json"
    return json.loads(done.read_text()) if done.exists() else None


class RunFolder:
    """Paths inside one run's output folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage(self, name: str, round_: int | None = None) -> Path:
        path = self.root / name if round_ is None else self.root / name / f"round-{round_}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    def write_provenance(self, cfg: Config, command: list[str] | None = None) -> None:
        """Saves the resolved config, version and commit; refuses to mix two configs in one folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = dump_config(cfg)
        saved = self.root / "config.yaml"
        if saved.exists() and saved.read_text() != text:
            raise ValueError(
                f"{self.root} already holds a run with a different config (see {saved}); "
                "use another --out folder, or the same config to resume"
            )
        atomic_write_text(saved, text)
        info = {
            "selftrain": __version__,
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "command": command or sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.root / "run.json", json.dumps(info, indent=2))
