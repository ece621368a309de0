"""SQLite persistence for a host: VM definitions and runstates, jobs and their statistics.

A job row is written at every step of a migration (its status, step and ``progress``: the
engine's bookkeeping -- the destination's job id, whether COMMIT was sent), so a daemon
that restarts knows how far each migration got and which peer to ask about it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.errors import HostError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    runstate TEXT NOT NULL,
    updated REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    role TEXT NOT NULL,
    peer TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    stats TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    step TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class JobRow:
    id: str
    vm: str
    role: str
    peer: str
    status: str
    params: dict[str, Any]
    stats: dict[str, Any]
    error: str
    step: str
    created: float
    updated: float
    #: engine bookkeeping: ``peer_job`` (the other side's job id), ``commit_sent``
    progress: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vm": self.vm,
            "role": self.role,
            "peer": self.peer,
            "status": self.status,
            "params": self.params,
            "stats": self.stats,
            "error": self.error,
            "step": self.step,
            "created": self.created,
            "updated": self.updated,
            "progress": self.progress,
        }


class Store:
    """One SQLite file; safe to use from the daemon's threads."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            _add_column(self._db, "vms", "note", "TEXT NOT NULL DEFAULT ''")
            _add_column(self._db, "jobs", "progress", "TEXT NOT NULL DEFAULT '{}'")
        except sqlite3.Error as exc:
            raise HostError(f"open store {path}: {exc}") from exc
        self._lock = threading.Lock()
        #: called after a VM's runstate is written (name, runstate; "undefined" on delete)
        self.on_vm_change: Callable[[str, str], None] | None = None
        #: called after an event is logged (kind, message)
        self.on_log: Callable[[str, str], None] | None = None

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise HostError(f"store: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- VMs -------------------------------------------------------------------------

    def put_vm(self, name: str, definition: dict[str, Any], runstate: str,
               note: str = "") -> None:
        self._run(
            "INSERT OR REPLACE INTO vms (name, definition, runstate, updated, note) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, json.dumps(definition), runstate, time.time(), note),
        )
        self._vm_changed(name, runstate)

    def _vm_changed(self, name: str, runstate: str) -> None:
        if self.on_vm_change is not None:
            self.on_vm_change(name, runstate)

    def set_runstate(self, name: str, runstate: str, note: str = "") -> None:
        """The VM's runstate and the note that explains it (cleared when not given)."""
        self._run(
            "UPDATE vms SET runstate=?, note=?, updated=? WHERE name=?",
            (runstate, note, time.time(), name),
        )
        self._vm_changed(name, runstate)

    def delete_vm(self, name: str) -> None:
        self._run("DELETE FROM vms WHERE name=?", (name,))
        self._vm_changed(name, "undefined")

    def vms(self) -> list[tuple[str, dict[str, Any], str]]:
        rows = self._run("SELECT name, definition, runstate FROM vms ORDER BY name")
        return [(n, json.loads(d), r) for n, d, r in rows]

    def notes(self) -> dict[str, str]:
        """VM name -> the note that explains its runstate (only VMs that have one)."""
        return {n: t for n, t in self._run("SELECT name, note FROM vms WHERE note != ''")}

    # --- jobs ------------------------------------------------------------------------

    def put_job(self, job: JobRow) -> None:
        self._run(
            "INSERT OR REPLACE INTO jobs (id, vm, role, peer, status, params, stats, error, "
            "step, created, updated, progress) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                job.id,
                job.vm,
                job.role,
                job.peer,
                job.status,
                json.dumps(job.params),
                json.dumps(job.stats),
                job.error,
                job.step,
                job.created,
                job.updated,
                json.dumps(job.progress),
            ),
        )

    def delete_job(self, job_id: str) -> None:
        self._run("DELETE FROM jobs WHERE id=?", (job_id,))

    def jobs(self, job_id: str | None = None) -> list[JobRow]:
        sql = ("SELECT id, vm, role, peer, status, params, stats, error, step, created, "
               "updated, progress FROM jobs")
        sql += (" WHERE id=?" if job_id else "") + " ORDER BY created"
        rows = self._run(sql, (job_id,) if job_id else ())
        return [
            JobRow(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                json.loads(r[5]),
                json.loads(r[6]),
                r[7],
                r[8],
                r[9],
                r[10],
                json.loads(r[11]),
            )
            for r in rows
        ]

    # --- events ----------------------------------------------------------------------

    def log(self, kind: str, message: str) -> None:
        self._run(
            "INSERT INTO events (at, kind, message) VALUES (?, ?, ?)", (time.time(), kind, message)
        )
        if self.on_log is not None:
            self.on_log(kind, message)

    def count_events(self, kind: str) -> int:
        """How many events of ``kind`` this store holds (e.g. refused connections)."""
        return int(self._run("SELECT COUNT(*) FROM events WHERE kind=?", (kind,))[0][0])

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._run("SELECT at, kind, message FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [{"at": a, "kind": k, "message": m} for a, k, m in rows]


def _add_column(db: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    """Bring a store written by an older vmferry up to this schema."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    if column not in have:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
