"""The benchmark store: every run of a suite in one SQLite file, `DIR/results.sqlite`.

One row per trial key (`Trial.key()`, the primary key: a trial is stored at most once): the trial's JSON, its
status ("ok" or "failed" with the error), the final metrics, the metric curves, wall time, peak memory, trainable
parameters and the library versions. Each run is written in its own transaction, begun IMMEDIATE so that the check
"not finished yet" and the write are one step even with a second process on the same file; an interrupted suite
(Ctrl-C or kill -9, even in the middle of a write) loses at most the run in flight, which the next call runs
again. A finished ("ok") run is never written again (`record` refuses it), a failed one may be retried and
replaced. Reports are rendered from this file alone. SQLite's WAL journal with synchronous=FULL keeps the file
consistent and every committed run on disk if the process or the machine dies mid-write.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .trial import Trial

__all__ = ["SCHEMA_VERSION", "AlreadyFinished", "Run", "Store", "finite_or_none"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    trial TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    metrics TEXT NOT NULL,
    curves TEXT NOT NULL,
    wall_seconds REAL NOT NULL,
    peak_memory_bytes INTEGER,
    trainable_parameters INTEGER,
    versions TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_suite ON runs (suite);
"""


@dataclass(frozen=True)
class Run:
    """One stored run.

    Attributes:
        trial: its configuration.
        status: "ok" or "failed".
        metrics: final metrics by name.
        curves: metric name -> values over the run (e.g. a loss every few steps).
        wall_seconds: the run's wall time.
        versions: library versions it ran with.
        error: the failure's message (status "failed").
        peak_memory_bytes: peak memory of the run, where measured.
        trainable_parameters: the adapter's trainable parameters.
        finished_at: Unix time it was written.
    """

    trial: Trial
    status: str
    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)
    wall_seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    peak_memory_bytes: int | None = None
    trainable_parameters: int | None = None
    finished_at: float = 0.0


class AlreadyFinished(ValueError):
    """`Store.record` of a trial whose run already finished ("ok") in the store; nothing was written."""


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except ValueError:
        raise ValueError(
            f"{what} must be finite JSON numbers; use None for a missing value, got {value!r}"
        ) from None


class Store:
    """The SQLite store of one benchmark directory.

    Args:
        path: the database file (created with its parent folder if missing).

    Raises:
        ValueError: the file exists but is not a loraredux store (not SQLite, or another schema version).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.executescript(_SCHEMA)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                    )
                elif row[0] != str(SCHEMA_VERSION):
                    raise ValueError(
                        f"{self.path}: a results store of schema {row[0]}; this loraredux reads schema "
                        f"{SCHEMA_VERSION}"
                    )
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a loraredux results store ({err})") from None

    @contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection whose block is one transaction (committed on success, rolled back on an error; a process
        killed inside it leaves nothing of it). `immediate` takes the write lock at the start, so what the block
        reads cannot change before it writes."""
        with closing(sqlite3.connect(self.path, timeout=30.0)) as db:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a committed run survives a power cut too
            with db:
                if immediate:
                    db.execute("BEGIN IMMEDIATE")
                yield db

    def finished(self, suite: str | None = None) -> set[str]:
        """The keys of the runs that finished ("ok"), of one suite or all."""
        query, args = "SELECT key FROM runs WHERE status = 'ok'", ()
        if suite is not None:
            query, args = query + " AND suite = ?", (suite,)
        with self._connect() as db:
            return {row[0] for row in db.execute(query, args)}

    def record(self, run: Run) -> None:
        """Write one run in its own transaction.

        Raises:
            AlreadyFinished: the trial already finished ("ok") in this store (a finished run is never replaced).
            ValueError: a status other than "ok"/"failed", or a non-finite metric.
        """
        if run.status not in ("ok", "failed"):
            raise ValueError(f"a run's status is 'ok' or 'failed', got {run.status!r}")
        key = run.trial.key()
        values = (
            key,
            run.trial.suite,
            run.trial.to_json(),
            run.status,
            run.error,
            _json(run.metrics, "metrics"),
            _json(run.curves, "curves"),
            float(run.wall_seconds),
            run.peak_memory_bytes,
            run.trainable_parameters,
            _json(run.versions, "versions"),
            run.finished_at or time.time(),
        )
        with self._connect(immediate=True) as db:
            row = db.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] == "ok":
                raise AlreadyFinished(
                    f"run {key} ({run.trial.problem}, {run.trial.method}, {run.trial.optimizer}, lr "
                    f"{run.trial.lr:g}, seed {run.trial.seed}) already finished in {self.path}; a finished run "
                    "is never replaced"
                )
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values
            )

    def runs(self, suite: str | None = None, status: str | None = "ok") -> list[Run]:
        """The stored runs (of one suite, of one status; None for all), in the order they finished."""
        query, args = "SELECT * FROM runs WHERE 1 = 1", []
        if suite is not None:
            query += " AND suite = ?"
            args.append(suite)
        if status is not None:
            query += " AND status = ?"
            args.append(status)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY finished_at, key", args).fetchall()
        return [
            Run(
                trial=Trial.from_json(r[2]),
                status=r[3],
                error=r[4],
                metrics=json.loads(r[5]),
                curves=json.loads(r[6]),
                wall_seconds=r[7],
                peak_memory_bytes=r[8],
                trainable_parameters=r[9],
                versions=json.loads(r[10]),
                finished_at=r[11],
            )
            for r in rows
        ]


def finite_or_none(x: float) -> float | None:
    """x, or None where it is not finite (a diverged run's loss): the store holds JSON numbers only."""
    return x if math.isfinite(x) else None
