"""AlertsConfig validation and sink construction from configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from auditor.alerts import AlertmanagerSink, AlertsConfig, WebhookSink, build_sink, load_alerts_config
from auditor.errors import ConfigError


def test_defaults() -> None:
    config = AlertsConfig()
    assert config.text_mode == "hash"
    assert config.sinks == [] and config.sink_names() == []


def test_sinks_parse_by_type_and_build() -> None:
    config = AlertsConfig.model_validate(
        {
            "log_path": "/tmp/x.sqlite3",
            "sinks": [
                {"type": "webhook", "url": "http://127.0.0.1:9/hook", "headers": {"Authorization": "Bearer t"}},
                {"type": "alertmanager", "url": "http://am:9093", "resolve_timeout_s": 120, "resend_interval_s": 30},
                {"type": "webhook", "name": "siem", "url": "https://siem.example/in", "batch": False},
            ],
        }
    )
    assert config.sink_names() == ["webhook", "alertmanager", "siem"]
    sinks = [build_sink(s) for s in config.sinks]
    try:
        assert isinstance(sinks[0], WebhookSink) and sinks[0].batch
        assert isinstance(sinks[1], AlertmanagerSink)
        assert sinks[1].endpoint == "http://am:9093/api/v2/alerts"
        assert sinks[1].tick_interval_s == 30 and sinks[1].active_window_s == 120
        assert isinstance(sinks[2], WebhookSink) and not sinks[2].batch and sinks[2].name == "siem"
    finally:
        for sink in sinks:
            sink.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"text_mode": "keep"}, "text_mode"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_initial_s": 5, "retry_max_s": 1}, "retry_initial_s .* must not exceed retry_max_s"),
        ({"dedup_by": ["text"]}, "dedup_by"),
        ({"sinks": [{"type": "pager", "url": "http://x"}]}, "type"),
        ({"sinks": [{"type": "webhook", "url": "ftp://x/y"}]}, "http:// or https://"),
        ({"sinks": [{"type": "webhook", "url": "not a url"}]}, "url"),
        ({"sinks": [{"type": "webhook", "url": "http://x", "batch": True, "resend_interval_s": 3}]}, "resend"),
        (
            {"sinks": [{"type": "webhook", "url": "http://a"}, {"type": "webhook", "url": "http://b"}]},
            "both named 'webhook'",
        ),
        (
            {"sinks": [{"type": "alertmanager", "url": "http://a", "resolve_timeout_s": 10, "resend_interval_s": 10}]},
            "resend_interval_s .* must be below resolve_timeout_s",
        ),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_configs(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AlertsConfig.model_validate(data)


def test_a_file_holds_the_settings_under_alerts_or_at_the_top(tmp_path: Path) -> None:
    wrapped = tmp_path / "alerts.yaml"  # the README's layout, which is also the sidecar's
    wrapped.write_text("alerts:\n  log_path: a.sqlite3\n  cooldown_s: 0\n  sinks:\n    - {type: webhook, url: 'http://h:9/x'}\n")
    config = load_alerts_config(wrapped)
    assert config.log_path == Path("a.sqlite3") and config.cooldown_s == 0 and config.sink_names() == ["webhook"]
    flat = tmp_path / "flat.yaml"
    flat.write_text("log_path: b.sqlite3\ntext_mode: store\n")
    assert load_alerts_config(flat).text_mode == "store"
    for empty in ("", "alerts:\n"):
        (tmp_path / "empty.yaml").write_text(empty)
        assert load_alerts_config(tmp_path / "empty.yaml") == AlertsConfig()


# Six levels of ten aliases: a million nodes from a few hundred bytes.
_BOMB = "l0: &l0 [" + ", ".join(["x"] * 10) + "]\n" + "".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 7)
)


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (
            "alerts:\n  log_path: x.db\n  cooldown_s: -5\nsinks: []\n",
            ["{f}:3:15: alerts.cooldown_s: Input should be greater than or equal to 0", "{f}:4:1: unknown key 'sinks'"],
        ),
        ("log_path: x.db\ncooldwn_s: 5\n", ["{f}:2:1: unknown key 'cooldwn_s'; did you mean 'cooldown_s'?"]),
        ("alerts:\n  text_mode: shred\n", ["{f}:2:14: alerts.text_mode: Input should be 'store', 'hash' or 'drop' (got 'shred')"]),
        ("- log_path: x.db\n", ["{f}:1:1: expected a mapping of alert settings (log_path, sinks, ...), or 'alerts:' holding them"]),
        ("alerts:\n  log_path: x.db\n  log_path: y.db\n", ["{f}:3:3: "]),
        ("alerts: {log_path: \x07}\n", ["{f}:1:20: control character U+0007 is not allowed in YAML"]),
        (_BOMB, ["{f}:"]),  # refused while reading, before its aliases multiply
    ],
)
def test_every_problem_in_a_file_is_located(tmp_path: Path, text: str, messages: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_alerts_config(path)
    lines = info.value.message.splitlines()
    assert len(lines) == len(messages)
    for line, expected in zip(lines, messages):
        assert line.startswith(expected.format(f=path)), line


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"none\.yaml: no such file \(an alerts configuration is a YAML file\)"):
        load_alerts_config(tmp_path / "none.yaml")


def test_audit_reads_its_alerts_config_with_the_same_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from auditor.cli import main

    bad = tmp_path / "bad2.yaml"
    bad.write_text("alerts:\n  log_path: x.db\n  cooldown_s: -5\nunknown_top: 1\n")
    # Checked before the policy, the SAE or the model load (neither path exists).
    argv = ["audit", "Hi", "--policy", str(tmp_path / "p.yaml"), "--sae", str(tmp_path / "sae"), "--alerts-config", str(bad)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {bad}:3:15: alerts.cooldown_s: Input should be greater than or equal to 0\n{bad}:4:1: unknown key 'unknown_top'\n"
    )


def test_a_relative_log_path_is_where_alerts_list_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auditor audit --alerts-config F` writes the log where `auditor alerts list --config F` reads it."""
    import argparse

    from auditor._cli_audit import _alerts_config
    from auditor.server.settings import Settings

    monkeypatch.setenv("AUDITOR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "alerts.yaml"
    cfg.write_text("alerts:\n  log_path: alerts.sqlite3\n")
    args = argparse.Namespace(audit_log=None, alerts_config=str(cfg), policy="p.yaml")
    written = _alerts_config(args).log_path
    read = Settings.load(env={"AUDITOR_DATA_DIR": str(tmp_path / "data")}, config_file=cfg).alerts_config(
        {"AUDITOR_DATA_DIR": str(tmp_path / "data")}
    ).log_path
    assert written == read == tmp_path / "data" / "alerts.sqlite3"
    # --audit-log is a path from the current folder, like any path on the command line.
    flagged = argparse.Namespace(audit_log="mine.db", alerts_config=str(cfg), policy="p.yaml")
    assert _alerts_config(flagged).log_path == Path("mine.db")
