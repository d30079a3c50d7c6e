"""AuditLog: durability, schema, filters, paging, export, text modes, delivery bookkeeping."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from auditor.alerts import SCHEMA_VERSION, AuditLog
from auditor.alerts.log import check_time_range
from auditor.errors import AuditLogError

from .conftest import make_alert

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "alerts.sqlite3", text_mode="store") as opened:
        yield opened


def _seed(log: AuditLog) -> list:
    alerts = [
        make_alert(created_at=T0 + timedelta(minutes=3), rule_id="a", severity="low", category="bias"),
        make_alert(created_at=T0 + timedelta(minutes=1), rule_id="b", severity="critical", category="dangerous"),
        make_alert(created_at=T0 + timedelta(minutes=2), rule_id="a", severity="medium", category="bias"),
        make_alert(created_at=T0 + timedelta(minutes=4), rule_id="c", severity="high", category="deception",
                   request_id="req-7"),
        make_alert(created_at=T0, rule_id="b", severity="info", category="dangerous"),
    ]
    log.append(alerts)
    return alerts


def test_wal_and_schema_on_open(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "alerts.sqlite3"
    with AuditLog(path) as log:
        assert log.journal_mode == "wal"
        assert log.schema_version == SCHEMA_VERSION
    # Another connection sees the same persistent settings.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_round_trip_keeps_every_field(log: AuditLog) -> None:
    alert = make_alert(
        features=[{"name": "deception.fraud", "value": 6.5, "threshold": 4.0, "agg": "max"}],
        token_spans=[(2, 5), (9, 11)],
        request_id="r1",
        description="Completion helps with a scam",
    )
    stored = log.append([alert])
    assert stored == [alert]
    assert log.get(alert.id) == alert
    assert log.query() == [alert]
    assert log.get("nope") is None


def test_reopen_keeps_alerts(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    with AuditLog(path, text_mode="store") as log:
        alerts = _seed(log)
    with AuditLog(path, text_mode="store") as log:
        assert {a.id for a in log.query(limit=None)} == {a.id for a in alerts}


def test_query_orders_by_time(log: AuditLog) -> None:
    alerts = _seed(log)
    expected = sorted(alerts, key=lambda a: a.created_at)
    assert [a.id for a in log.query()] == [a.id for a in expected]
    assert [a.id for a in log.query(descending=True)] == [a.id for a in reversed(expected)]


@pytest.mark.parametrize(
    ("filters", "rules_in_order"),
    [
        ({"rule_id": "a"}, ["a", "a"]),
        ({"rule_id": ["a", "c"]}, ["a", "a", "c"]),
        ({"severity": "critical"}, ["b"]),
        ({"severity": ["info", "low"]}, ["b", "a"]),
        ({"min_severity": "medium"}, ["b", "a", "c"]),
        ({"min_severity": "critical"}, ["b"]),
        ({"category": "bias"}, ["a", "a"]),
        ({"since": T0 + timedelta(minutes=2)}, ["a", "a", "c"]),
        ({"until": T0 + timedelta(minutes=2)}, ["b", "b"]),
        ({"since": T0 + timedelta(minutes=1), "until": T0 + timedelta(minutes=3)}, ["b", "a"]),
        ({"request_id": "req-7"}, ["c"]),
        ({"rule_id": "a", "min_severity": "medium"}, ["a"]),
        ({"rule_id": []}, []),
        ({"limit": 2}, ["b", "b"]),
        ({"limit": 2, "offset": 3}, ["a", "c"]),
        ({"limit": 0}, []),
    ],
)
def test_query_filters(log: AuditLog, filters: dict, rules_in_order: list[str]) -> None:
    alerts = _seed(log)
    got = log.query(**filters)
    assert [a.rule_id for a in got] == rules_in_order
    assert {a.id for a in got} <= {a.id for a in alerts}
    if "limit" not in filters:
        assert log.count(**filters) == len(rules_in_order)


def test_cursor_paging_visits_every_alert_once(log: AuditLog) -> None:
    alerts = [make_alert(created_at=T0 + timedelta(seconds=i % 7)) for i in range(23)]
    log.append(alerts)
    seen: list[str] = []
    after = None
    while True:
        page = log.query(limit=5, after=after)
        seen.extend(a.id for a in page)
        if len(page) < 5:
            break
        after = page[-1].id
    assert sorted(seen) == sorted(a.id for a in alerts)
    assert len(seen) == len(set(seen))
    times = [log.get(i).created_at for i in seen]
    assert times == sorted(times)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_severity": "urgent"}, "min_severity must be one of"),
        ({"severity": "urgent"}, "severity must be one of"),
        ({"limit": -1}, "limit must be >= 0"),
        ({"offset": -2}, "offset must be >= 0"),
        ({"after": "not-an-id"}, "is not the id of an alert"),
        ({"since": datetime(2026, 1, 1)}, "must be timezone-aware"),
        ({"since": T0 + timedelta(minutes=2), "until": T0 + timedelta(minutes=1)}, "is after until"),
    ],
)
def test_query_rejects_bad_arguments(log: AuditLog, kwargs: dict, message: str) -> None:
    with pytest.raises(AuditLogError, match=message):
        log.query(**kwargs)


def test_a_reversed_time_range_is_refused_by_every_reader(log: AuditLog, tmp_path: Path) -> None:
    _seed(log)
    since, until = T0 + timedelta(minutes=3), T0 + timedelta(minutes=1)
    readers = (
        lambda: log.query(since=since, until=until),
        lambda: log.count(since=since, until=until),
        lambda: list(log.iter_alerts(since=since, until=until)),
        lambda: log.export_jsonl(tmp_path / "out.jsonl", since=since, until=until),
    )
    expected = (
        f"since ({since.isoformat(timespec='seconds').replace('+00:00', 'Z')}) is after until "
        f"({until.isoformat(timespec='seconds').replace('+00:00', 'Z')}), so no alert can match; "
    )
    for read in readers:
        with pytest.raises(AuditLogError) as info:
            read()
        assert info.value.message.startswith(expected)
    assert not (tmp_path / "out.jsonl").exists()  # checked before the file is made
    assert log.count(since=since, until=since) == 0  # an empty range is not a reversed one
    check_time_range(None, until)
    check_time_range(since, None)


def test_export_jsonl_to_path_and_file(log: AuditLog, tmp_path: Path) -> None:
    alerts = _seed(log)
    path = tmp_path / "out.jsonl"
    assert log.export_jsonl(path, category="dangerous") == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["rule_id"] for line in lines] == ["b", "b"]
    buffer = io.StringIO()
    assert log.export_jsonl(buffer) == len(alerts)
    exported = [json.loads(line) for line in buffer.getvalue().splitlines()]
    by_id = {a.id: a for a in alerts}
    for row in exported:
        assert by_id[row["id"]].model_dump(mode="json") == row


def test_export_pages_through_large_logs(log: AuditLog) -> None:
    alerts = [make_alert(created_at=T0 + timedelta(microseconds=i)) for i in range(1203)]
    log.append(alerts)
    buffer = io.StringIO()
    assert log.export_jsonl(buffer) == 1203
    assert [json.loads(line)["id"] for line in buffer.getvalue().splitlines()] == [a.id for a in alerts]


@pytest.mark.parametrize(
    ("mode", "keeps_text", "keeps_hash"),
    [("store", True, True), ("hash", False, True), ("drop", False, False)],
)
def test_text_modes(tmp_path: Path, mode: str, keeps_text: bool, keeps_hash: bool) -> None:
    alert = make_alert(text="the secret prompt")
    path = tmp_path / "alerts.sqlite3"
    with AuditLog(path, text_mode=mode) as log:  # type: ignore[arg-type]
        (stored,) = log.append([alert])
        assert log.get(alert.id) == stored
    assert (stored.text == "the secret prompt") is keeps_text
    assert (stored.text_sha256 == alert.text_sha256) is keeps_hash
    if not keeps_hash:
        assert stored.text_sha256 is None
    # Nothing of the text reaches the file when the mode drops it.
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert (b"the secret prompt" in raw) is keeps_text


def test_bad_text_mode(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError, match="text_mode must be one of"):
        AuditLog(tmp_path / "a.sqlite3", text_mode="keep")  # type: ignore[arg-type]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    AuditLog(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(AuditLogError, match="newer than this auditor supports"):
        AuditLog(path)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditLogError, match="not a usable audit log"):
        AuditLog(path)


def test_duplicate_id_stores_nothing(log: AuditLog) -> None:
    first = make_alert()
    log.append([first])
    with pytest.raises(AuditLogError, match="already in the audit log"):
        log.append([make_alert(), first])
    assert log.count() == 1


def test_delivery_bookkeeping(log: AuditLog) -> None:
    alerts = [make_alert(created_at=T0 + timedelta(seconds=i)) for i in range(5)]
    ids = [a.id for a in alerts]
    log.append(alerts, sinks=["hook", "am"])
    assert log.pending_count("hook") == 5
    assert [a.id for a in log.pending("hook", limit=3)] == ids[:3]
    log.mark_delivered("hook", ids[:2])
    log.mark_failed("hook", ids[2:3], "connection refused")
    log.mark_dropped("hook", ids[3:4], "400 bad request")
    assert [log.delivery_state(i, "hook") for i in ids] == ["delivered", "delivered", "pending", "dropped", "pending"]
    assert [log.delivery_state(i, "am") for i in ids] == ["pending"] * 5
    assert log.delivery_state(ids[0], "unknown") is None
    assert log.pending_ids("hook", ids) == {ids[2], ids[4]}
    assert log.requeue("hook") == 1
    assert log.pending_ids("hook", ids) == {ids[2], ids[3], ids[4]}
    assert [a.id for a in log.delivered_since("hook", T0 + timedelta(seconds=1))] == [ids[1]]


def test_concurrent_appends_from_threads(log: AuditLog) -> None:
    per_thread = 40
    made: list[list[str]] = [[] for _ in range(4)]

    def work(slot: int) -> None:
        for _ in range(per_thread):
            alert = make_alert()
            log.append([alert], sinks=["hook"])
            made[slot].append(alert.id)
            log.query(limit=3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.id for a in log.query(limit=None)} == {i for ids in made for i in ids}
    assert log.pending_count("hook") == 4 * per_thread


_CRASH_SCRIPT = """
import sys
from auditor.alerts import Alert, AuditLog
log = AuditLog(sys.argv[1], text_mode="store")
for batch in range(1000):
    alerts = [Alert(rule_id="r", severity="high", category="c", policy_name="p", policy_hash="h",
                    action="alert", score=1.0, text=f"t{batch}-{i}") for i in range(3)]
    log.append(alerts, sinks=["hook"])
    print("ACK", *[a.id for a in alerts], flush=True)
"""


def test_acknowledged_alerts_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    acked: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        assert line.startswith("ACK ")
        acked.extend(line.split()[1:])
        if len(acked) >= 30:
            # Kill right after an acknowledgement, while the writer is mid-way through the next batch.
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with AuditLog(path, text_mode="store") as log:
        stored = {a.id for a in log.query(limit=None)}
        assert set(acked) <= stored
        assert set(acked) <= {a.id for a in log.pending("hook", limit=10_000)}


def test_prune_by_age_and_count_keeps_what_a_sink_still_waits_for(log: AuditLog) -> None:
    old = [make_alert(created_at=T0 + timedelta(days=i)) for i in range(6)]  # days 0..5
    log.append(old[:3], sinks=["hook"])
    log.append(old[3:])
    log.mark_delivered("hook", [old[0].id, old[2].id])  # old[1] stays pending for "hook"
    assert log.prune() == 0  # nothing asked, nothing deleted
    deleted = log.prune(older_than=T0 + timedelta(days=3))
    assert deleted == 2  # days 0 and 2; day 1 is pending and stays
    assert {a.id for a in log.query(limit=10)} == {old[1].id, old[3].id, old[4].id, old[5].id}
    assert log.delivery_state(old[0].id, "hook") is None  # its delivery record went with it
    assert log.delivery_state(old[1].id, "hook") == "pending"
    assert log.prune(keep_last=1) == 2  # days 3 and 4 go; the pending one and the newest stay
    assert {a.id for a in log.query(limit=10)} == {old[1].id, old[5].id}
    log.mark_delivered("hook", [old[1].id])
    assert log.prune(keep_last=0) == 2
    assert log.count() == 0
    with pytest.raises(AuditLogError, match="keep_last must be >= 0"):
        log.prune(keep_last=-1)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2026-01-01T12:00:00Z", T0),
        ("2026-01-01T13:00:00+01:00", T0),
        ("2026-01-01T12:00:00", T0),  # no zone: UTC
        ("2026-01-01", T0 - timedelta(hours=12)),
        (str(T0.timestamp()), T0),
        ("15", datetime(1970, 1, 1, 0, 0, 15, tzinfo=timezone.utc)),  # bare digits: Unix seconds
        ("90s", T0 - timedelta(seconds=90)),
        ("15m", T0 - timedelta(minutes=15)),
        ("2h", T0 - timedelta(hours=2)),
        ("1.5d", T0 - timedelta(hours=36)),
        (" 7d ", T0 - timedelta(days=7)),
    ],
)
def test_parse_time_takes_iso_times_unix_seconds_and_durations(text: str, want: datetime) -> None:
    from auditor.alerts.log import parse_time

    got = parse_time(text, now=T0)
    assert got == want and got.tzinfo is not None


@pytest.mark.parametrize("text", ["yesterday", "", "-2h", "2w", "2026-13-01", "9" * 30, "9" * 30 + "d"])
def test_parse_time_says_what_it_takes(text: str) -> None:
    from auditor.alerts.log import parse_time

    with pytest.raises(ValueError, match=r"expected an ISO time \(2026-11-26T04:00:00Z\), Unix seconds \(1795665600\) or a duration like 15m, 2h, 7d"):
        parse_time(text)
