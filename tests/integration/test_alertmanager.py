"""The dispatcher against a real Prometheus Alertmanager (Debian's prometheus-alertmanager).

Run ``scripts/install_test_deps.sh`` first. Without the binary the test skips,
except under CI (``CI`` set), where a missing binary is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from auditor.alerts import Alert, AlertDispatcher, AlertmanagerSink, AuditLog

pytestmark = pytest.mark.integration

_CONFIG = """\
route:
  receiver: "null"
  group_by: ["alertname"]
receivers:
  - name: "null"
"""


def _binary() -> str:
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if path is None:
        message = (
            "Alertmanager binary not found (looked for prometheus-alertmanager and alertmanager on PATH); "
            "install it with scripts/install_test_deps.sh"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Alertmanager:
    """One Alertmanager process on 127.0.0.1:<port>, stoppable and restartable on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.config = workdir / "alertmanager.yml"
        self.config.write_text(_CONFIG, encoding="utf-8")
        self.storage = workdir / "data"
        self.storage.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        output = open(self.workdir / f"alertmanager-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        _wait(self._ready, 30, f"Alertmanager ready on {self.url} (log: {self.workdir})")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.workdir / f"alertmanager-{self.starts}.log").read_text(errors="replace")
            raise AssertionError(f"Alertmanager exited with {self.proc.returncode}:\n{log[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alerts(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=5.0)
        response.raise_for_status()
        return list(response.json())

    def alert_ids(self) -> set[str]:
        try:
            return {a["labels"].get("alert_id", "") for a in self.alerts()}
        except httpx.HTTPError:
            return set()


@pytest.fixture
def alertmanager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Alertmanager]:
    # httpx honours proxy variables; Alertmanager runs on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    am = Alertmanager(_binary(), tmp_path)
    am.start()
    try:
        yield am
    finally:
        am.stop()


def _alert(rule: str, severity: str, **extra: Any) -> Alert:
    return Alert(
        rule_id=rule,
        severity=severity,  # type: ignore[arg-type]
        category="deception",
        policy_name="default",
        policy_hash="f00d",
        action="alert",
        score=1.25,
        labels={"team": "trust-safety"},
        annotations={"summary": f"{rule} fired"},
        text="some audited text",
        source="completion",
        **extra,
    )


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_alerts_reach_alertmanager_and_survive_its_restart(alertmanager: Alertmanager, tmp_path: Path) -> None:
    sink = AlertmanagerSink(alertmanager.url, resolve_timeout_s=600, resend_interval_s=1.0, timeout=2.0)
    log = AuditLog(tmp_path / "alerts.sqlite3", text_mode="hash")
    dispatcher = AlertDispatcher(log, [sink], retry_initial_s=0.05, retry_max_s=0.5, max_attempts=2)
    dispatcher.start()
    try:
        first = dispatcher.submit(
            [_alert("fraud-completion", "high", request_id="r1"), _alert("weapons-prompt", "critical")]
        )
        _wait(lambda: alertmanager.alert_ids() >= {a.id for a in first}, 20, "first alerts in Alertmanager")

        by_id = {a["labels"]["alert_id"]: a for a in alertmanager.alerts()}
        for alert in first:
            got = by_id[alert.id]
            assert got["labels"] == {
                "alertname": alert.rule_id,
                "severity": alert.severity,
                "category": "deception",
                "policy": "default",
                "team": "trust-safety",
                "alert_id": alert.id,
            }
            assert got["annotations"]["summary"] == f"{alert.rule_id} fired"
            assert got["annotations"]["text_sha256"] == alert.text_sha256
            assert abs((_parse(got["startsAt"]) - alert.created_at).total_seconds()) < 0.002
            assert (_parse(got["endsAt"]) - _parse(got["startsAt"])).total_seconds() == pytest.approx(600, abs=0.01)
            assert got["status"]["state"] in ("active", "unprocessed")
        assert by_id[first[0].id]["annotations"]["request_id"] == "r1"

        # Outage: Alertmanager goes away (and forgets its alerts: it keeps them in memory only).
        alertmanager.stop()
        second = dispatcher.submit([_alert("fraud-completion", "medium", request_id=f"r{i}") for i in range(2, 6)])
        _wait(lambda: dispatcher.stats().sinks["alertmanager"].down, 20, "the sink to notice the outage")
        assert log.pending_count("alertmanager") == len(second)

        alertmanager.start()
        everything = {a.id for a in first + second}
        # New alerts come from the log's backlog; the earlier ones from the periodic re-send.
        _wait(lambda: alertmanager.alert_ids() >= everything, 30, "every alert after the restart")
        _wait(lambda: log.pending_count("alertmanager") == 0, 10, "all deliveries recorded")
        stats = dispatcher.stats().sinks["alertmanager"]
        assert stats.delivered == len(everything)
        assert not stats.down
    finally:
        dispatcher.close(timeout=5)
        log.close()
