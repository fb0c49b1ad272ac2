"""The pseudo-label store: the contract between the ``label`` and ``student`` stages.

A store is a folder of Parquet shards, one output shard per input shard of the pool::

    STORE/
      header.json          written first: format, fingerprint, n_shards, shard_size, tasks
      shard-00000.parquet  one per input shard, each written atomically
      selection.parquet    optional: rows kept by filtering/balancing (shard, row, repeat)
      manifest.json        written last; its presence means the store is complete

Every file is written to a temporary name, fsynced, renamed over its final name and the
folder fsynced, so a writer killed at any moment leaves either a whole file or a
``*.tmp*`` leftover that the next :meth:`PseudoLabelStore.create` removes. Together with
:meth:`PseudoLabelStore.pending_shards` this makes a killed ``label`` run resumable with
no record lost or duplicated.

Each file has one writer. A single process writes them all; ``world_size`` processes
(ranks) split the shards statically with :func:`shards_of_rank` -- rank ``r`` writes the
shards ``i`` with ``i % world_size == r``, and rank 0 also writes the header, the selection
and the manifest -- so no shard is written twice and none is padded in.

Example:
    >>> store = PseudoLabelStore.create(out, fingerprint=fp, n_shards=4, shard_size=1000,
    ...                                 tasks=["classification"])
    >>> for i in store.pending_shards():
    ...     store.write_shard(i, label_shard(i))
    >>> store.write_manifest({"teacher": "run-3"})
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selftrain.atomic import atomic_write, fsync_dir

FORMAT = "selftrain-store/1"
HEADER = "header.json"
MANIFEST = "manifest.json"
SELECTION = "selection.parquet"
_TMP_GLOB = "*.tmp*"
_SELECTION_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int32()), ("repeat", pa.int32())])


class StoreError(RuntimeError):
    """A problem with a pseudo-label store; the message names the file and the problem."""


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    try:
        data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise StoreError(f"{path}: not written, the content is not JSON-serializable: {e}") from e
    atomic_write(path, lambda f: f.write(data))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable JSON ({e}); the store folder is damaged") from e
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _json_normal(obj: Any, path: Path) -> Any:
    # Compare values the way they will read back from header.json (tuples become lists...).
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{path}: the header is not JSON-serializable: {e}") from e


def shards_of_rank(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank ``rank`` of ``world_size`` writes: ``i % world_size == rank``, ascending.

    A static, disjoint split that covers every shard once -- unlike a DistributedSampler,
    which pads the last ranks with duplicates. Ranks beyond ``n_shards`` get none.

    Raises:
        ValueError: If ``world_size < 1`` or ``rank`` is not in ``0..world_size-1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
    return list(range(rank, n_shards, world_size))


def _owner(name: str, world_size: int) -> int:
    """The rank that writes file ``name`` (a shard's or a store-level file's, temporary or not)."""
    if name.startswith("shard-"):
        digits = name[len("shard-") :].split(".", 1)[0]
        if digits.isdigit():
            return int(digits) % world_size
    return 0


def remove_temporaries(root: Path, rank: int = 0, world_size: int = 1) -> None:
    """Removes the ``*.tmp*`` leftovers in ``root`` of the files rank ``rank`` writes (``shard-N...``: rank
    ``N % world_size``; any other name: rank 0), as a killed writer leaves them."""
    # Safe only because each file has one writer: leftovers of this rank's files belong to a
    # killed run, while another rank's may be in the middle of being written.
    if not root.is_dir():
        return
    removed = [tmp for tmp in root.glob(_TMP_GLOB) if tmp.is_file() and _owner(tmp.name, world_size) == rank]
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    if removed:
        fsync_dir(root)


def _diff_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted paths at which two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [prefix]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PseudoLabelStore:
    """An existing store folder (with ``header.json``); :meth:`create` starts or resumes one.

    Raises:
        StoreError: If ``root`` holds no readable store header.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / HEADER
        if not path.is_file():
            raise StoreError(f"{path}: missing; {self.root} is not a pseudo-label store")
        header = _read_json(path)
        if header.get("format") != FORMAT:
            raise StoreError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        missing = {"fingerprint", "n_shards", "shard_size", "tasks"} - set(header)
        if missing:
            raise StoreError(f"{path}: damaged header, missing {sorted(missing)}")
        self._header = header
        self._n_shards = int(header["n_shards"])

    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        fingerprint: dict[str, Any],
        n_shards: int,
        shard_size: int,
        tasks: list[str],
        resume: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> PseudoLabelStore:
        """Start a new store in ``root`` or resume the one already there.

        Args:
            root: The store folder; created with its parents when missing.
            fingerprint: What the labels depend on (teacher, pool, config); JSON-serializable.
            n_shards: Number of input (and output) shards.
            shard_size: Rows per input shard (the last one may hold fewer).
            tasks: Task names whose columns the shards carry.
            resume: Reuse an existing store with an equal header (else that is an error).
            rank: This writer's rank; only rank 0 starts a store, the others open it once
                the header exists. Each rank removes only the leftovers of its own files.
            world_size: How many ranks write the store (:func:`shards_of_rank`).

        Raises:
            StoreError: If the folder holds a store with another header, any store while
                ``resume`` is False, shard files without a header, or no store yet for a
                rank other than 0.
        """
        root = Path(root)
        shards_of_rank(0, rank, world_size)  # checks rank and world_size
        if n_shards < 1 or shard_size < 1:
            raise StoreError(f"{root}: n_shards and shard_size must be >= 1, "
                             f"got {n_shards} and {shard_size}")
        wanted = _json_normal({"fingerprint": fingerprint, "n_shards": n_shards,
                               "shard_size": shard_size, "tasks": list(tasks)}, root / HEADER)
        if (root / HEADER).exists():
            if not resume:
                raise StoreError(f"{root / HEADER}: the folder already holds a pseudo-label "
                                 "store and resume is off; use a new output folder or delete it")
            store = cls(root)
            store._check_same(wanted)
            remove_temporaries(root, rank, world_size)
            return store
        if rank != 0:
            raise StoreError(f"{root / HEADER}: missing; rank 0 starts the store, rank {rank} only opens it")
        leftovers = sorted(p.name for p in root.glob("shard-*.parquet")) if root.exists() else []
        if leftovers or (root / MANIFEST).exists():
            raise StoreError(f"{root}: holds {leftovers[:3] or [MANIFEST]} but no {HEADER}; "
                             "it is not a complete store folder, use a new output folder")
        root.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent)
        remove_temporaries(root)
        header = {"format": FORMAT, **wanted,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_json(root / HEADER, header)
        return cls(root)

    def _check_same(self, wanted: dict[str, Any]) -> None:
        path = self.root / HEADER
        for field in ("fingerprint", "n_shards", "shard_size", "tasks"):
            old, new = self._header.get(field), wanted[field]
            if old == new:
                continue
            where = ", ".join(_diff_keys(old, new, field)[:5]) or field
            raise StoreError(
                f"{path}: {where} differs (stored {_short(old)}, now {_short(new)}); this "
                "folder holds labels from another teacher/pool/config. Use a new output "
                "folder or delete it."
            )

    @property
    def header(self) -> dict[str, Any]:
        """The parsed ``header.json`` (a copy)."""
        return json.loads(json.dumps(self._header))

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The parsed ``manifest.json``, or None while the store is incomplete."""
        path = self.root / MANIFEST
        return _read_json(path) if path.exists() else None

    @property
    def complete(self) -> bool:
        """Whether the manifest exists, i.e. every shard is written and final."""
        return (self.root / MANIFEST).exists()

    def shard_path(self, shard_id: int) -> Path:
        """Final path of shard ``shard_id`` (which need not exist yet)."""
        if not 0 <= shard_id < self._n_shards:
            raise StoreError(f"{self.root}: shard {shard_id} is out of range "
                             f"0..{self._n_shards - 1}")
        return self.root / f"shard-{shard_id:05d}.parquet"

    def _metadata(self, shard_id: int) -> pq.FileMetaData | None:
        path = self.shard_path(shard_id)
        if not path.exists():
            return None
        try:
            return pq.read_metadata(path)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(
                f"{path}: unreadable Parquet footer, the file is truncated or corrupt ({e}); "
                "delete it and rerun the label stage to recompute that shard"
            ) from e

    def _done_metadata(self) -> dict[int, pq.FileMetaData]:
        found = {i: self._metadata(i) for i in range(self._n_shards)}
        return {i: md for i, md in found.items() if md is not None}

    def done_shards(self) -> set[int]:
        """Shards whose final file exists and has a readable footer.

        Raises:
            StoreError: Naming a final shard file that is truncated or corrupt.
        """
        return set(self._done_metadata())

    def pending_shards(self) -> list[int]:
        """Shards still to write, in ascending order."""
        done = self.done_shards()
        return [i for i in range(self._n_shards) if i not in done]

    def count(self) -> int:
        """Total records over the done shards, from the Parquet footers only."""
        return sum(md.num_rows for md in self._done_metadata().values())

    def schema(self) -> pa.Schema | None:
        """Schema shared by all shards; None before the first one is written."""
        for i in range(self._n_shards):
            if self._metadata(i) is not None:
                return pq.read_schema(self.shard_path(i))
        return None

    def write_shard(self, shard_id: int, table: pa.Table) -> None:
        """Write one output shard atomically.

        Args:
            shard_id: Which input shard these rows label.
            table: ``key`` (string), ``index`` (int64) and task columns, at most
                ``shard_size`` rows, with the schema of every other shard.

        Raises:
            StoreError: If the shard is out of range or already written, the store is
                complete, or the table does not fit.
        """
        path = self.shard_path(shard_id)
        if self.complete:
            raise StoreError(f"{self.root / MANIFEST}: the store is complete; "
                             f"shard {shard_id} cannot be rewritten")
        if self._metadata(shard_id) is not None:
            raise StoreError(f"{path}: already written; write only pending_shards()")
        self._check_table(path, table)
        atomic_write(path, lambda f: pq.write_table(table, f))

    def _check_table(self, path: Path, table: pa.Table) -> None:
        if not isinstance(table, pa.Table):
            raise StoreError(f"{path}: expected a pyarrow.Table, got {type(table).__name__}")
        schema = table.schema
        key = schema.field("key").type if "key" in schema.names else None
        index = schema.field("index").type if "index" in schema.names else None
        if key not in (pa.string(), pa.large_string()) or index != pa.int64():
            raise StoreError(f"{path}: a shard needs columns key (string) and index (int64), "
                             f"got key={key}, index={index}")
        if table.num_rows > self._header["shard_size"]:
            raise StoreError(f"{path}: {table.num_rows} rows exceed shard_size "
                             f"{self._header['shard_size']}")
        existing = self.schema()
        if existing is not None and not existing.equals(schema, check_metadata=False):
            raise StoreError(f"{path}: schema differs from the shards already written\n"
                             f"written: {existing}\nnew: {schema}")

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Mark the store complete by writing ``manifest.json`` (atomically, last).

        Args:
            manifest: Caller's summary (JSON-serializable); ``n_records`` (total rows) and
                ``shards`` (n_shards) are added over it.

        Raises:
            StoreError: If any shard is missing or the store is already complete.
        """
        path = self.root / MANIFEST
        if self.complete:
            raise StoreError(f"{path}: already written; the store is complete")
        done = self._done_metadata()
        if len(done) != self._n_shards:
            missing = [i for i in range(self._n_shards) if i not in done]
            raise StoreError(f"{path}: cannot mark the store complete, {len(missing)} shards "
                             f"are missing (first: {missing[:5]})")
        total = sum(md.num_rows for md in done.values())
        _write_json(path, {**manifest, "n_records": total, "shards": self._n_shards})

    def _readable(self, allow_partial: bool) -> list[int]:
        if not allow_partial and not self.complete:
            raise StoreError(f"{self.root}: incomplete store (no {MANIFEST}); finish the "
                             "label stage or pass allow_partial=True")
        return sorted(self.done_shards())

    def _read_one(self, shard_id: int, columns: list[str] | None) -> pa.Table:
        path = self.shard_path(shard_id)
        try:
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: cannot read columns {columns} ({e})") from e

    def iter_shards(
        self, columns: list[str] | None = None, *, allow_partial: bool = False
    ) -> Iterator[tuple[int, pa.Table]]:
        """Yield ``(shard_id, table)`` in shard order, one shard in memory at a time.

        Raises:
            StoreError: If the store is incomplete and ``allow_partial`` is False.
        """
        for shard_id in self._readable(allow_partial):
            yield shard_id, self._read_one(shard_id, columns)

    def read(self, columns: list[str] | None = None, *, allow_partial: bool = False) -> pa.Table:
        """All (done) shards concatenated in shard order; no shard yet -> empty table.

        Raises:
            StoreError: If the store is incomplete and ``allow_partial`` is False.
        """
        tables = [t for _, t in self.iter_shards(columns, allow_partial=allow_partial)]
        return pa.concat_tables(tables) if tables else pa.table({})

    def shard_offsets(self) -> np.ndarray:
        """Start row of each shard in :meth:`read` plus the total (needs all shards)."""
        done = self._done_metadata()
        if len(done) != self._n_shards:
            raise StoreError(f"{self.root}: shard offsets need every shard written, "
                             f"{self._n_shards - len(done)} missing")
        sizes = [done[i].num_rows for i in range(self._n_shards)]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def make_selection(self, rows: np.ndarray, repeat: np.ndarray) -> pa.Table:
        """Turn global rows (as from :func:`select_records`) into a selection table."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = self.shard_offsets()
        if rows.size and (rows.min() < 0 or rows.max() >= offsets[-1]):
            raise StoreError(f"{self.root}: selected rows must lie in 0..{offsets[-1] - 1}")
        shard = np.searchsorted(offsets, rows, side="right") - 1
        return pa.table({"shard": pa.array(shard, pa.int32()),
                         "row": pa.array(rows - offsets[shard], pa.int32()),
                         "repeat": pa.array(np.asarray(repeat), pa.int32())})

    def write_selection(self, table: pa.Table) -> None:
        """Write ``selection.parquet`` atomically (replacing one left by a killed run).

        Raises:
            StoreError: If the store is complete, the schema is not (shard, row, repeat)
                int32, or a row does not exist.
        """
        path = self.root / SELECTION
        if self.complete:
            raise StoreError(f"{path}: the store is complete; its selection cannot change")
        if not isinstance(table, pa.Table) or not table.schema.equals(
            _SELECTION_SCHEMA, check_metadata=False
        ) or any(col.null_count for col in table.columns):
            got = table.schema if isinstance(table, pa.Table) else type(table).__name__
            raise StoreError(f"{path}: expected columns {_SELECTION_SCHEMA} without nulls, "
                             f"got {got}")
        sizes = np.diff(self.shard_offsets())
        cols = _SELECTION_SCHEMA.names
        shard, row, repeat = (table[c].to_numpy(zero_copy_only=False) for c in cols)
        ok = (shard >= 0) & (shard < self._n_shards) & (row >= 0) & (repeat >= 1)
        ok[ok] = row[ok] < sizes[shard[ok]]
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise StoreError(f"{path}: entry {i} (shard {shard[i]}, row {row[i]}, repeat "
                             f"{repeat[i]}) does not name a stored record with repeat >= 1")
        atomic_write(path, lambda f: pq.write_table(table, f))

    def selection(self) -> pa.Table | None:
        """The selection table (shard, row, repeat), or None if none was written."""
        path = self.root / SELECTION
        if not path.exists():
            return None
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: unreadable selection ({e})") from e

    def selection_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The selection as global rows (int64) into :meth:`read` and repeats (int32)."""
        table = self.selection()
        if table is None:
            return None
        offsets = self.shard_offsets()
        shard = table["shard"].to_numpy(zero_copy_only=False)
        rows = offsets[shard] + table["row"].to_numpy(zero_copy_only=False)
        return rows.astype(np.int64), table["repeat"].to_numpy(zero_copy_only=False)
