"""The audit log: every alert, durably, in one SQLite file.

The log is the source of truth for alerts. :meth:`AuditLog.append` returns only
after the transaction is on disk (WAL journal, ``synchronous=FULL``), so an
alert acknowledged to a caller survives a crash of the process or the host.
The same transaction records, per configured sink, that the alert is still to
be delivered; the dispatcher marks it delivered once the sink accepted it, so
undelivered alerts are found again after a restart.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Literal

from auditor.alerts.config import TextMode
from auditor.alerts.model import SEVERITIES, Alert, severity_rank
from auditor.errors import AuditLogError

__all__ = ["AuditLog", "DeliveryState", "SCHEMA_VERSION", "apply_text_mode", "check_time_range", "parse_time"]

DeliveryState = Literal["pending", "delivered", "dropped"]

# Each entry upgrades the schema from version i to i + 1; the file's version is
# kept in `PRAGMA user_version`. Append new migrations; never edit old ones.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE alerts (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        created_us   INTEGER NOT NULL,
        rule_id      TEXT NOT NULL,
        severity     TEXT NOT NULL,
        severity_rank INTEGER NOT NULL,
        category     TEXT NOT NULL,
        policy_name  TEXT NOT NULL,
        request_id   TEXT,
        text         TEXT,
        text_sha256  TEXT,
        body         TEXT NOT NULL
    );
    CREATE INDEX alerts_time ON alerts (created_us, seq);
    CREATE INDEX alerts_rule_time ON alerts (rule_id, created_us);
    CREATE TABLE deliveries (
        sink        TEXT NOT NULL,
        alert_seq   INTEGER NOT NULL REFERENCES alerts (seq) ON DELETE CASCADE,
        state       TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dropped')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        updated_us  INTEGER NOT NULL,
        last_error  TEXT,
        PRIMARY KEY (sink, alert_seq)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_pending ON deliveries (sink, alert_seq) WHERE state = 'pending';
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

# Fields kept in their own columns (text) or recomputed (nothing else): the JSON
# body holds the rest of the alert.
_BODY_EXCLUDE = {"text"}
_EXPORT_PAGE = 500


def apply_text_mode(alert: Alert, mode: TextMode) -> Alert:
    """The alert as the log keeps it: ``store`` as is, ``hash`` without text, ``drop`` without text or hash."""
    if mode == "store":
        return alert
    if mode == "hash":
        return alert.model_copy(update={"text": None}) if alert.text is not None else alert
    if mode == "drop":
        if alert.text is None and alert.text_sha256 is None:
            return alert
        return alert.model_copy(update={"text": None, "text_sha256": None})
    raise AuditLogError(f"text_mode must be one of store, hash, drop; got {mode!r}")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """A time filter as users write it: an ISO time (``2026-11-26T04:00:00Z``; without a zone,
    UTC), a date, Unix seconds, or a duration back from ``now`` (``90s``, ``15m``, ``2h``, ``7d``).
    Raises ValueError saying what is accepted."""
    text = value.strip()
    unit = _DURATION_UNITS.get(text[-1:])
    try:
        if unit is not None and _is_number(text[:-1]):
            return (now or datetime.now(timezone.utc)) - timedelta(seconds=float(text[:-1]) * unit)
        try:
            # A trailing Z is UTC; Python 3.10's fromisoformat does not read it.
            parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            if not _is_number(text):
                raise
            parsed = datetime.fromtimestamp(float(text), timezone.utc)
    except (ValueError, OverflowError, OSError):  # not a time, or one past the calendar
        raise ValueError(f"{value!r}: expected an ISO time (2026-11-26T04:00:00Z), Unix seconds (1795665600) or a duration like 15m, 2h, 7d") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def check_time_range(
    since: datetime | None, until: datetime | None, *, names: tuple[str, str] = ("since", "until")
) -> None:
    """Raise :class:`AuditLogError` when ``since`` is after ``until`` (``names`` say what each is called
    where the user wrote it). Such a range matches nothing, and a query would answer it as silently
    as a range with no alerts in it; two durations the wrong way round (``since 1h``, ``until 2h``)
    are the usual cause."""
    if since is None or until is None or _to_us(since) <= _to_us(until):
        return
    first, second = names
    raise AuditLogError(
        f"{first} ({_iso(since)}) is after {second} ({_iso(until)}), so no alert can match; {first} is where the "
        f"range starts and {second} where it ends (a duration counts back from now: 2h is earlier than 1h)"
    )


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_number(text: str) -> bool:
    """Digits with at most one decimal point."""
    return text.replace(".", "", 1).isdigit()


def _to_us(value: datetime) -> int:
    if value.tzinfo is None:
        raise AuditLogError(f"time filter {value.isoformat()} must be timezone-aware")
    delta = value.astimezone(timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _now_us() -> int:
    return _to_us(datetime.now(timezone.utc))


@dataclass(frozen=True)
class _Filters:
    since: datetime | None = None
    until: datetime | None = None
    rule_id: str | Sequence[str] | None = None
    severity: str | Sequence[str] | None = None
    min_severity: str | None = None
    category: str | Sequence[str] | None = None
    request_id: str | None = None

    def where(self) -> tuple[list[str], list[object]]:
        check_time_range(self.since, self.until)
        clauses: list[str] = []
        params: list[object] = []
        if self.since is not None:
            clauses.append("created_us >= ?")
            params.append(_to_us(self.since))
        if self.until is not None:
            clauses.append("created_us < ?")
            params.append(_to_us(self.until))
        for column, value in (("rule_id", self.rule_id), ("severity", self.severity), ("category", self.category)):
            if value is None:
                continue
            values = [value] if isinstance(value, str) else list(value)
            if column == "severity":
                for v in values:
                    _check_severity(v, "severity")
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "0")
            params.extend(values)
        if self.min_severity is not None:
            _check_severity(self.min_severity, "min_severity")
            clauses.append("severity_rank >= ?")
            params.append(severity_rank(self.min_severity))
        if self.request_id is not None:
            clauses.append("request_id = ?")
            params.append(self.request_id)
        return clauses, params


def _check_severity(value: str, name: str) -> None:
    if value not in SEVERITIES:
        raise AuditLogError(f"{name} must be one of {', '.join(SEVERITIES)}; got {value!r}")


class AuditLog:
    """Durable, queryable store of alerts (SQLite, WAL mode).

    Thread-safe: one connection guarded by a lock (alert volumes are small; the
    lock keeps transactions from interleaving). Other processes may read the
    file concurrently.

    Example::

        with AuditLog("alerts.sqlite3", text_mode="hash") as log:
            log.append([alert], sinks=["alertmanager"])
            recent = log.query(min_severity="high", limit=50)
    """

    def __init__(self, path: str | Path, *, text_mode: TextMode = "hash") -> None:
        self.path = Path(path)
        if text_mode not in ("store", "hash", "drop"):
            raise AuditLogError(f"text_mode must be one of store, hash, drop; got {text_mode!r}")
        self.text_mode: TextMode = text_mode
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise AuditLogError(f"cannot open audit log {self.path}: {exc}") from exc
        try:
            self._configure()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise AuditLogError(f"{self.path} is not a usable audit log: {exc}") from exc
        except AuditLogError:
            self._conn.close()
            raise

    # -- setup ---------------------------------------------------------------

    def _configure(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AuditLogError(f"{self.path}: cannot switch the journal to WAL mode (got {mode!r})")
        # FULL fsyncs the WAL on every commit: an acknowledged alert survives power loss too.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AuditLogError(
                f"{self.path} has audit log schema version {version}, newer than this auditor "
                f"supports ({SCHEMA_VERSION}); upgrade the auditor or use another log_path"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # executescript commits any open transaction first, so run each step's
            # statements inside one explicit transaction with the version bump.
            self._conn.executescript(
                f"BEGIN IMMEDIATE; {_MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;"
            )

    @property
    def schema_version(self) -> int:
        """The file's schema version (equals :data:`SCHEMA_VERSION` once open)."""
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @property
    def journal_mode(self) -> str:
        """SQLite journal mode of the open file (``wal``)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    # -- writing -------------------------------------------------------------

    def append(self, alerts: Iterable[Alert], *, sinks: Sequence[str] = ()) -> list[Alert]:
        """Store ``alerts`` (after ``text_mode``) and mark them pending for each of ``sinks``.

        Returns the alerts as stored, once the transaction is committed to disk.
        An id already in the log is an error (nothing of the batch is stored).
        """
        stored = [apply_text_mode(a, self.text_mode) for a in alerts]
        sinks = list(dict.fromkeys(sinks))
        if not stored:
            return stored
        now = _now_us()
        rows = [
            (
                a.id,
                _to_us(a.created_at),
                a.rule_id,
                a.severity,
                severity_rank(a.severity),
                a.category,
                a.policy_name,
                a.request_id,
                a.text,
                a.text_sha256,
                a.model_dump_json(exclude=_BODY_EXCLUDE),
            )
            for a in stored
        ]
        with self._lock, self._transaction():
            try:
                self._conn.executemany(
                    "INSERT INTO alerts (id, created_us, rule_id, severity, severity_rank, category,"
                    " policy_name, request_id, text, text_sha256, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
            except sqlite3.IntegrityError as exc:
                raise AuditLogError(f"alert id already in the audit log: {exc}") from exc
            if sinks:
                self._conn.executemany(
                    "INSERT INTO deliveries (sink, alert_seq, state, updated_us)"
                    " SELECT ?, seq, 'pending', ? FROM alerts WHERE id = ?",
                    [(sink, now, a.id) for a in stored for sink in sinks],
                )
        return stored

    def mark_delivered(self, sink: str, ids: Sequence[str]) -> None:
        """Record that ``sink`` accepted the alerts ``ids``."""
        self._set_state(sink, ids, "delivered", None)

    def mark_failed(self, sink: str, ids: Sequence[str], error: str) -> None:
        """Record a failed attempt (the alerts stay pending)."""
        self._set_state(sink, ids, "pending", error)

    def mark_dropped(self, sink: str, ids: Sequence[str], error: str) -> None:
        """Give up on delivering ``ids`` to ``sink`` (the receiver rejected them for good).

        The alerts stay in the log; :meth:`requeue` makes them pending again.
        """
        self._set_state(sink, ids, "dropped", error)

    def requeue(self, sink: str, ids: Sequence[str] | None = None) -> int:
        """Make dropped alerts (all, or ``ids``) pending again for ``sink``; returns how many."""
        with self._lock, self._transaction():
            if ids is None:
                cur = self._conn.execute(
                    "UPDATE deliveries SET state = 'pending', updated_us = ? WHERE sink = ? AND state = 'dropped'",
                    (_now_us(), sink),
                )
                return cur.rowcount
            total = 0
            for chunk in _chunks(list(ids)):
                cur = self._conn.execute(
                    "UPDATE deliveries SET state = 'pending', updated_us = ? WHERE sink = ? AND state = 'dropped'"
                    f" AND alert_seq IN (SELECT seq FROM alerts WHERE id IN ({', '.join('?' * len(chunk))}))",
                    (_now_us(), sink, *chunk),
                )
                total += cur.rowcount
            return total

    def _set_state(
        self, sink: str, ids: Sequence[str], state: DeliveryState, error: str | None
    ) -> None:
        if not ids:
            return
        now = _now_us()
        with self._lock, self._transaction():
            for chunk in _chunks(list(ids)):
                self._conn.execute(
                    "UPDATE deliveries SET state = ?, updated_us = ?, last_error = ?, attempts = attempts + 1"
                    f" WHERE sink = ? AND alert_seq IN (SELECT seq FROM alerts WHERE id IN ({', '.join('?' * len(chunk))}))",
                    (state, now, error, sink, *chunk),
                )

    # -- delivery bookkeeping -------------------------------------------------

    def pending(self, sink: str, *, limit: int = 100) -> list[Alert]:
        """The oldest ``limit`` alerts (in append order) still to be delivered to ``sink``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT a.body, a.text FROM deliveries d JOIN alerts a ON a.seq = d.alert_seq"
                " WHERE d.sink = ? AND d.state = 'pending' ORDER BY d.alert_seq LIMIT ?",
                (sink, limit),
            ).fetchall()
        return [_row_alert(row) for row in rows]

    def pending_ids(self, sink: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are still pending for ``sink``."""
        found: set[str] = set()
        with self._lock:
            for chunk in _chunks(list(ids)):
                rows = self._conn.execute(
                    "SELECT a.id FROM deliveries d JOIN alerts a ON a.seq = d.alert_seq"
                    f" WHERE d.sink = ? AND d.state = 'pending' AND a.id IN ({', '.join('?' * len(chunk))})",
                    (sink, *chunk),
                ).fetchall()
                found.update(r[0] for r in rows)
        return found

    def pending_count(self, sink: str) -> int:
        """How many alerts wait for ``sink``."""
        with self._lock:
            return int(
                self._conn.execute(
                    "SELECT count(*) FROM deliveries WHERE sink = ? AND state = 'pending'", (sink,)
                ).fetchone()[0]
            )

    def delivery_state(self, alert_id: str, sink: str) -> DeliveryState | None:
        """Delivery state of one alert at one sink (None when the sink was not configured for it)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT d.state FROM deliveries d JOIN alerts a ON a.seq = d.alert_seq WHERE a.id = ? AND d.sink = ?",
                (alert_id, sink),
            ).fetchone()
        return None if row is None else row[0]

    def delivered_since(self, sink: str, since: datetime) -> list[Alert]:
        """Alerts created at or after ``since`` that ``sink`` accepted (to restore its active set)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT a.body, a.text FROM deliveries d JOIN alerts a ON a.seq = d.alert_seq"
                " WHERE d.sink = ? AND d.state = 'delivered' AND a.created_us >= ? ORDER BY a.created_us, a.seq",
                (sink, _to_us(since)),
            ).fetchall()
        return [_row_alert(row) for row in rows]

    # -- reading -------------------------------------------------------------

    def get(self, alert_id: str) -> Alert | None:
        """The alert with this id, or None."""
        with self._lock:
            row = self._conn.execute("SELECT body, text FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else _row_alert(row)

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        rule_id: str | Sequence[str] | None = None,
        severity: str | Sequence[str] | None = None,
        min_severity: str | None = None,
        category: str | Sequence[str] | None = None,
        request_id: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
        after: str | None = None,
        descending: bool = False,
    ) -> list[Alert]:
        """Alerts matching every given filter, ordered by ``created_at`` (then append order).

        ``since`` is inclusive, ``until`` exclusive. ``rule_id``, ``severity`` and
        ``category`` take one value or several. ``after`` is a cursor: the id of
        the last alert of the previous page (keyset paging, stable while new
        alerts arrive); ``offset`` skips rows instead. ``limit=None`` returns all.
        """
        if limit is not None and limit < 0:
            raise AuditLogError(f"limit must be >= 0; got {limit}")
        if offset < 0:
            raise AuditLogError(f"offset must be >= 0; got {offset}")
        filters = _Filters(since, until, rule_id, severity, min_severity, category, request_id)
        clauses, params = filters.where()
        order = "DESC" if descending else "ASC"
        with self._lock:
            if after is not None:
                row = self._conn.execute("SELECT created_us, seq FROM alerts WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise AuditLogError(f"cursor {after!r} is not the id of an alert in the log")
                op = "<" if descending else ">"
                clauses.append(f"(created_us, seq) {op} (?, ?)")
                params.extend(row)
            sql = "SELECT body, text FROM alerts"
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += f" ORDER BY created_us {order}, seq {order} LIMIT ? OFFSET ?"
            rows = self._conn.execute(sql, (*params, -1 if limit is None else limit, offset)).fetchall()
        return [_row_alert(row) for row in rows]

    def count(self, **filters: object) -> int:
        """How many alerts match the filters of :meth:`query` (``since``, ``rule_id``, ...)."""
        clauses, params = _Filters(**filters).where()  # type: ignore[arg-type]
        sql = "SELECT count(*) FROM alerts" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        with self._lock:
            return int(self._conn.execute(sql, params).fetchone()[0])

    def iter_alerts(self, **filters: object) -> Iterator[Alert]:
        """All alerts matching the filters of :meth:`query`, in pages (bounded memory)."""
        after: str | None = None
        while True:
            page = self.query(limit=_EXPORT_PAGE, after=after, **filters)  # type: ignore[arg-type]
            yield from page
            if len(page) < _EXPORT_PAGE:
                return
            after = page[-1].id

    def export_jsonl(self, dest: str | Path | IO[str], **filters: object) -> int:
        """Write matching alerts as JSON lines (one alert object per line); returns how many.

        ``dest`` is a path (overwritten) or an open text file. Filters as :meth:`query`.
        """
        if isinstance(dest, (str, Path)):
            _Filters(**filters).where()  # type: ignore[arg-type]  # a bad filter fails before the file is made
            with open(dest, "w", encoding="utf-8") as fh:
                return self._export(fh, filters)
        return self._export(dest, filters)

    def _export(self, fh: IO[str], filters: dict[str, object]) -> int:
        n = 0
        for alert in self.iter_alerts(**filters):
            fh.write(alert.model_dump_json())
            fh.write("\n")
            n += 1
        return n

    # -- lifecycle -----------------------------------------------------------

    def prune(self, *, older_than: datetime | None = None, keep_last: int | None = None) -> int:
        """Delete alerts created before ``older_than`` and/or all but the newest ``keep_last``.

        An alert still pending delivery to some sink is never deleted: the log is that
        sink's queue, and pruning must not lose an alert nobody has received. Delivery
        records go with their alerts. Returns how many alerts were deleted.
        """
        if older_than is None and keep_last is None:
            return 0
        if keep_last is not None and keep_last < 0:
            raise AuditLogError(f"keep_last must be >= 0, got {keep_last}")
        where: list[str] = []
        params: list[object] = []
        if older_than is not None:
            where.append("created_us < ?")
            params.append(_to_us(older_than))
        if keep_last is not None:
            where.append("seq <= (SELECT COALESCE(MAX(seq), 0) FROM alerts) - ?")
            params.append(keep_last)
        sql = (
            "DELETE FROM alerts WHERE (" + " OR ".join(where) + ") AND NOT EXISTS "
            "(SELECT 1 FROM deliveries d WHERE d.alert_seq = alerts.seq AND d.state = 'pending')"
        )
        with self._lock, self._transaction():
            return int(self._conn.execute(sql, params).rowcount)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    def close(self) -> None:
        """Close the file (checkpoints the WAL)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error); the commit is durable on return."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")


def _row_alert(row: tuple[str, str | None]) -> Alert:
    body, text = row
    data = json.loads(body)
    data["text"] = text
    return Alert.model_validate(data)


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    # SQLite caps bound parameters per statement (32766 on recent builds, 999 on old ones).
    for i in range(0, len(items), size):
        yield items[i : i + size]
