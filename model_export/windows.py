"""Recorded feature windows as CSV: what `otel-ebpf-lab record` (and `record-host`) writes and `train` reads.

    timestamp,label,syscalls.rate_log1p,syscalls.error_ratio,...
    1764090857.25,normal,8.41,0.012,...

One row per window. ``timestamp`` is Unix seconds, ``label`` the scenario the operator says was running
(``normal``, ``network_flood``...; empty = unlabelled: clustered but not voting). The other columns are the
feature names of ``otel_ebpf_receiver.features`` in the order of the header; values are written with
``repr(float)`` so they read back bit-for-bit. A file always has one fixed set of columns: appending with
different features is refused, record into a new file instead.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

TIMESTAMP_COLUMN = "timestamp"
LABEL_COLUMN = "label"
LABEL_PATTERN = re.compile(r"[A-Za-z0-9_.-]*")  # becomes the system.state attribute value: keep it plain


class WindowsFormatError(ValueError):
    """A CSV file that is not a recording, or rows that do not fit it. The message names file and line."""


@dataclass(frozen=True)
class LabelledWindow:
    timestamp: float
    label: str
    values: Mapping[str, float]


@dataclass
class WindowTable:
    """Windows read from one or more files, as arrays ready for training."""

    names: tuple[str, ...]
    timestamps: np.ndarray          # (N,) float64
    labels: np.ndarray              # (N,) object (str), "" = unlabelled
    values: np.ndarray              # (N, n) float64
    sources: list[tuple[str, int]] = field(default_factory=list)  # (file, rows) in read order

    def __len__(self) -> int:
        return len(self.timestamps)


def header(names: Sequence[str]) -> list[str]:
    _check_names(names, "<features>")
    return [TIMESTAMP_COLUMN, LABEL_COLUMN, *names]


def _check_names(names: Sequence[str], where: str) -> None:
    if not names:
        raise WindowsFormatError(f"{where}: no feature columns")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise WindowsFormatError(f"{where}: duplicate feature column {', '.join(dupes)}")
    bad = [n for n in names if not n or n in (TIMESTAMP_COLUMN, LABEL_COLUMN)]
    if bad:
        raise WindowsFormatError(f"{where}: invalid feature column name {bad[0]!r}")


def check_label(label: str) -> str:
    if not LABEL_PATTERN.fullmatch(label):
        raise WindowsFormatError(f"label {label!r} may only use letters, digits, '_', '.', '-'")
    return label


def _row_cells(timestamp: float, label: str, values: Mapping[str, float], names: Sequence[str]) -> list[str]:
    check_label(label)
    cells = [repr(float(timestamp)), label]
    for name in names:
        v = float(values.get(name, 0.0))  # absent = the probe saw nothing this window, as FeatureWindow.vector
        if not math.isfinite(v):
            raise WindowsFormatError(f"feature {name} is {v} at timestamp {timestamp}: a probe produced a "
                                     "non-finite value; fix the probe (not written)")
        cells.append(repr(v))
    return cells


def _as_row(row: Any, label: str | None) -> tuple[float, str, Mapping[str, float]]:
    if isinstance(row, LabelledWindow):
        return row.timestamp, row.label, row.values
    if isinstance(row, tuple) and len(row) == 3:
        return row
    if hasattr(row, "timestamp") and hasattr(row, "values"):  # otel_ebpf_receiver.features.FeatureWindow
        return row.timestamp, label or "", row.values
    raise TypeError(f"cannot write {type(row).__name__} as a window (want LabelledWindow, "
                    "(timestamp, label, values) or FeatureWindow)")


class WindowWriter:
    """Append windows one at a time (what the lab's Recorder does every interval). Each row is flushed, so a
    recorder that is killed loses at most the window in progress. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], names: Sequence[str], *, append: bool = True) -> None:
        self.path = Path(path)
        self.names = tuple(names)
        want = header(self.names)
        existing = self.path.exists() and self.path.stat().st_size > 0
        if existing and append:
            have = read_header(self.path)
            if have != want:
                raise WindowsFormatError(
                    f"{self.path}: has columns {','.join(have[2:])}, recording {','.join(want[2:])}; "
                    "record into a new file")
            self._fh = open(self.path, "a", newline="")
            self._csv = csv.writer(self._fh)
        else:
            self._fh = open(self.path, "w", newline="")
            self._csv = csv.writer(self._fh)
            self._csv.writerow(want)
            self._fh.flush()
        self.rows = 0

    def write(self, timestamp: float, label: str, values: Mapping[str, float]) -> None:
        self._csv.writerow(_row_cells(timestamp, label, values, self.names))
        self._fh.flush()
        self.rows += 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "WindowWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_windows(path: str | os.PathLike[str], names: Sequence[str], rows: Iterable[Any], *,
                  label: str | None = None, append: bool = False) -> int:
    """Write ``rows`` (LabelledWindow, (timestamp, label, values) tuples, or FeatureWindow objects labelled
    with ``label``) to ``path``; with ``append`` add to an existing file of the same columns. Returns rows
    written."""
    with WindowWriter(path, names, append=append) as writer:
        for row in rows:
            writer.write(*_as_row(row, label))
        return writer.rows


def _open_text(path: str | os.PathLike[str]) -> Any:
    """A recording, plain or gzip-compressed (``.csv.gz``: the recording shipped with the bundled models)."""
    if str(path).endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", newline="")
    return open(path, newline="")


def read_header(path: str | os.PathLike[str]) -> list[str]:
    with _open_text(path) as fh:
        first = next(csv.reader(fh), None)
    if not first:
        raise WindowsFormatError(f"{path}: empty file, no header")
    return first


def read_windows(path: str | os.PathLike[str], names: Sequence[str] | None = None) -> WindowTable:
    """Read one recording. ``names``: the feature columns wanted, in this order (default: all, file order)."""
    path = Path(path)
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        head = next(reader, None)
        if not head:
            raise WindowsFormatError(f"{path}: empty file, no header")
        if head[:2] != [TIMESTAMP_COLUMN, LABEL_COLUMN]:
            raise WindowsFormatError(f"{path}:1: header must start with {TIMESTAMP_COLUMN},{LABEL_COLUMN}, "
                                     f"found {','.join(head[:2])}")
        columns = head[2:]
        _check_names(columns, f"{path}:1")
        wanted = list(columns) if names is None else list(names)
        missing = [n for n in wanted if n not in columns]
        if missing:
            raise WindowsFormatError(f"{path}: no column {', '.join(missing)} (it has {', '.join(columns)})")
        index = [2 + columns.index(n) for n in wanted]
        timestamps: list[float] = []
        labels: list[str] = []
        rows: list[list[float]] = []
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(head):
                raise WindowsFormatError(f"{path}:{line}: {len(row)} cells, header has {len(head)}")
            try:
                timestamps.append(float(row[0]))
                values = [float(row[i]) for i in index]
            except ValueError as exc:
                raise WindowsFormatError(f"{path}:{line}: {exc}") from None
            bad = [wanted[j] for j, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                raise WindowsFormatError(f"{path}:{line}: non-finite value in {', '.join(bad)}")
            labels.append(row[1])
            rows.append(values)
    for label in set(labels):
        try:
            check_label(label)
        except WindowsFormatError as exc:
            raise WindowsFormatError(f"{path}: {exc}") from None
    return WindowTable(
        names=tuple(wanted),
        timestamps=np.asarray(timestamps, dtype=np.float64),
        labels=np.asarray(labels, dtype=object),
        values=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(wanted)),
        sources=[(str(path), len(rows))],
    )


def read_many(paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None, *,
              progress: bool = False) -> WindowTable:
    """Read and concatenate recordings. Without ``names`` every file must have the same feature columns
    (in any order); the first file's order wins."""
    if not paths:
        raise WindowsFormatError("no input files")
    from tqdm import tqdm

    tables: list[WindowTable] = []
    for path in tqdm(paths, desc="read", unit="file", disable=None if progress else True):
        if names is None and tables:
            columns = read_header(path)[2:]
            first = tables[0].names
            if set(columns) != set(first):
                extra = sorted(set(columns) - set(first))
                lack = sorted(set(first) - set(columns))
                raise WindowsFormatError(
                    f"{path}: feature columns differ from {tables[0].sources[0][0]} "
                    f"(extra: {', '.join(extra) or '-'}; missing: {', '.join(lack) or '-'}); "
                    "pick common ones with --features")
            tables.append(read_windows(path, first))
        else:
            tables.append(read_windows(path, names))
    return WindowTable(
        names=tables[0].names,
        timestamps=np.concatenate([t.timestamps for t in tables]),
        labels=np.concatenate([t.labels for t in tables]),
        values=np.concatenate([t.values for t in tables]),
        sources=[s for t in tables for s in t.sources],
    )
