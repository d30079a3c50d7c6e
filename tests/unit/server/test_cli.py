"""``auditor alerts list|export|prune`` on a real audit log; ``auditor serve`` refuses bad settings."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from auditor.alerts import Alert, AuditLog
from auditor.errors import ConfigError
from auditor.server import cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="auditor")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "alerts.sqlite3"
    now = datetime.now(timezone.utc)
    rows = [
        ("fraud", "high", now - timedelta(hours=3)),
        ("fraud", "critical", now - timedelta(minutes=5)),
        ("bias", "low", now - timedelta(minutes=1)),
    ]
    with AuditLog(path) as log:
        log.append(
            [
                Alert(
                    rule_id=rule,
                    severity=sev,  # type: ignore[arg-type]
                    category="x",
                    policy_name="p",
                    policy_hash="h",
                    action="alert",
                    score=1.5,
                    created_at=when,
                    request_id=f"r-{i}",
                )
                for i, (rule, sev, when) in enumerate(rows)
            ]
        )
    return path


def test_list_filters_by_time_rule_and_severity(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["alerts", "list", "--log", str(log_path), "--json"]) == 0
    ids = [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()]
    assert ids == ["r-2", "r-1", "r-0"]  # newest first
    assert _run(["alerts", "list", "--log", str(log_path), "--json", "--since", "1h", "--rule", "fraud"]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["r-1"]
    assert _run(["alerts", "list", "--log", str(log_path), "--min-severity", "high"]) == 0
    human = capsys.readouterr().out.splitlines()
    assert len(human) == 2 and all("fraud" in line for line in human)


def test_export_jsonl(log_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    assert _run(["alerts", "export", "--log", str(log_path), "-o", str(out), "--severity", "low"]) == 0
    [line] = out.read_text().splitlines()
    assert json.loads(line)["rule_id"] == "bias"
    assert "exported 1 alert(s)" in capsys.readouterr().err


def test_export_to_a_folder_is_refused(log_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="it is a directory; give a file path"):
        _run(["alerts", "export", "--log", str(log_path), "-o", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"alerts.sqlite3 is a file, not a folder"):
        _run(["alerts", "export", "--log", str(log_path), "-o", str(log_path / "out.jsonl")])


def test_prune_by_age_then_by_count(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["alerts", "prune", "--log", str(log_path), "--older-than", "1h"]) == 0
    assert capsys.readouterr().out.startswith("deleted 1 of 3 alert(s)")
    assert _run(["alerts", "list", "--log", str(log_path), "--json"]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["r-2", "r-1"]
    assert _run(["alerts", "prune", "--log", str(log_path), "--keep-last", "1"]) == 0
    assert capsys.readouterr().out.startswith("deleted 1 of 2 alert(s)")
    with AuditLog(log_path) as log:
        assert [a.request_id for a in log.query(limit=5)] == ["r-2"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["alerts", "list", "--since", "yesterday-ish"], "--since"),
        (["alerts", "list"], "no audit log there"),
        (["alerts", "prune"], "needs --older-than"),
        (["alerts", "prune", "--older-than", "a while"], "--older-than 'a while'"),
        (["alerts", "prune", "--keep-last", "-2"], "--keep-last must be >= 0"),
    ],
)
def test_alerts_errors(tmp_path: Path, log_path: Path, argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDITOR_DATA_DIR", str(tmp_path / "empty"))
    if "--since" in argv or "prune" in argv:
        argv = [*argv, "--log", str(log_path)]
    with pytest.raises(ConfigError, match=needle):
        _run(argv)


@pytest.mark.parametrize("command", ["list", "export"])
def test_a_reversed_time_range_is_refused(log_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from auditor.cli import main

    assert main(["alerts", command, "--log", str(log_path), "--since", "1h", "--until", "2h"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --since (") and ") is after --until (" in err and "so no alert can match" in err
    # The right way round, the range holds the alert of 3 hours ago only.
    assert main(["alerts", "list", "--log", str(log_path), "--json", "--since", "4h", "--until", "2h"]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["r-0"]


def test_serve_rejects_bad_settings_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDITOR_FAIL_MODE", "sideways")
    with pytest.raises(ConfigError, match="AUDITOR_FAIL_MODE"):
        _run(["serve", "--port", "0"])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-programs"])
def test_a_reload_frees_the_policies_frozen_with_the_heap(tmp_path: Path, compiled: bool) -> None:
    # auditor serve freezes what loading left alive, the policy engines among it; frozen objects
    # are never collected as cycles. An engine holds no cycle (its graph cache refers back to it
    # weakly), so the reload that replaces it frees it at once, and the heap stays frozen. A
    # compiled program (--compile) refers back to its engine: then the first successful reload
    # unfreezes the heap, and the next collection frees the engine. A failed reload keeps both.
    import gc
    import shutil
    import weakref
    from types import SimpleNamespace

    from auditor.pipeline import default_policy_path
    from auditor.policy import PolicyStore

    path = tmp_path / "policy.yaml"
    shutil.copy(default_policy_path(), path)
    store = PolicyStore([str(path)])
    first = weakref.ref(store.current())
    assert gc.get_freeze_count() == 0
    try:
        cli._freeze_loaded(SimpleNamespace(store=store), thaw_on_reload=compiled)
        assert gc.get_freeze_count() > 0
        text = path.read_text()
        path.write_text("not: [a policy")
        assert not store.reload().ok
        assert gc.get_freeze_count() > 0 and first() is store.current()
        path.write_text(text)
        assert store.reload().ok
        if compiled:
            assert gc.get_freeze_count() == 0
            gc.collect()
        else:
            assert gc.get_freeze_count() > 0  # still frozen: no collection needed
        assert first() is None
    finally:
        gc.unfreeze()
