"""Settings precedence (flags > env > YAML > defaults) and located error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor.errors import ConfigError
from auditor.server.settings import Settings, default_data_dir


def test_defaults_serve_the_embedded_model_on_loopback() -> None:
    s = Settings.load(env={})
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.model is None and s.sae is None and s.policies == [] and s.upstream is None
    assert s.fail_mode == "closed" and s.stream_mode == "hold" and s.api_token is None


def test_precedence_flags_over_env_over_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text("port: 7000\nqueue_size: 9\nfail-mode: open\nalerts:\n  text_mode: store\n  cooldown_s: 5\n")
    env = {"AUDITOR_PORT": "7100", "AUDITOR_QUEUE_SIZE": "11", "AUDITOR_ALERTS__COOLDOWN_S": "7", "OTHER": "x"}
    s = Settings.load(flags={"port": 7200, "queue_size": None}, env=env, config_file=cfg)
    assert s.port == 7200  # flag
    assert s.queue_size == 11  # env beats YAML; a None flag is "not given"
    assert s.fail_mode == "open"  # YAML (dashes accepted)
    assert s.alerts.text_mode == "store" and s.alerts.cooldown_s == 7  # nested: YAML merged with env


def test_config_file_from_env_and_json_lists(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream: http://127.0.0.1:9\n")
    s = Settings.load(env={"AUDITOR_CONFIG": str(cfg), "AUDITOR_POLICIES": '["a.yaml", "dir/"]'})
    assert s.upstream == "http://127.0.0.1:9" and s.policies == ["a.yaml", "dir/"]


def test_token_is_secret() -> None:
    s = Settings.load(env={"AUDITOR_API_TOKEN": "hunter2-secret"})
    assert s.api_token is not None and s.api_token.get_secret_value() == "hunter2-secret"
    assert "hunter2-secret" not in repr(s) and "hunter2-secret" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("flags", "env", "yaml_text", "needles"),
    [
        ({"port": 70000}, {}, None, ["setting port", "flag --port"]),
        ({}, {"AUDITOR_QUEUE_SIZE": "lots"}, None, ["setting queue_size", "AUDITOR_QUEUE_SIZE"]),
        ({}, {}, "port: 8081\nfail_mode: sometimes\n", ["setting fail_mode", "bad.yaml:2:12"]),
        ({}, {}, "prot: 1\n", ["setting prot", "unknown setting; did you mean 'port'?", "bad.yaml:1:1"]),
        ({}, {}, "alerts:\n  cooldown_s: -1\n", ["setting alerts.cooldown_s", "bad.yaml:2:15"]),
        ({}, {}, "port: 1\nport: 2\n", ["bad.yaml:2:1", "duplicate key 'port'"]),
        ({"auth_all_routes": True}, {}, None, ["auth_all_routes needs api_token"]),
        ({"upstream": "localhost:8000"}, {}, None, ["setting upstream: must be an http:// or https:// URL", "(from flag --upstream)"]),
        ({}, {}, "- just\n- a list\n", ["must be a mapping"]),
        ({}, {}, "port: [unclosed\n", ["bad.yaml:2:1", "YAML syntax error"]),
        # An empty secret let "Authorization: Bearer " through and signed sessions with an empty key.
        ({}, {"AUDITOR_API_TOKEN": ""}, None, ["api_token (AUDITOR_API_TOKEN) is empty"]),
        ({}, {"AUDITOR_API_TOKEN": "   "}, None, ["api_token (AUDITOR_API_TOKEN) is empty"]),
        ({}, {"AUDITOR_API_TOKEN": "secret\n"}, None, ["starts or ends with whitespace", "strip it"]),
        ({}, {"AUDITOR_POLICIES": "policies/"}, None,
         ["invalid AUDITOR_POLICIES='policies/': setting policies is a list", "AUDITOR_POLICIES='[\"first\", \"second\"]'"]),
        ({}, {"AUDITOR_ALERTS": '{"cooldown_s": 1'}, None,
         ["setting alerts is a mapping", "AUDITOR_ALERTS__KEY=value"]),
    ],
)
def test_errors_name_the_setting_and_its_source(
    tmp_path: Path, flags: dict[str, object], env: dict[str, str], yaml_text: str | None, needles: list[str]
) -> None:
    cfg = None
    if yaml_text is not None:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        Settings.load(flags=flags, env=env, config_file=cfg)
    for needle in needles:
        assert needle in info.value.message, info.value.message


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        Settings.load(env={}, config_file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder; --config .* takes a YAML file"):
        Settings.load(env={}, config_file=tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe port: 1\n")
    with pytest.raises(ConfigError, match="bin.yaml: not UTF-8 text .* save the config file as UTF-8"):
        Settings.load(env={}, config_file=binary)


def test_alert_log_lives_under_the_data_dir(tmp_path: Path) -> None:
    s = Settings.load(flags={"data_dir": str(tmp_path)}, env={})
    assert s.alerts_config().log_path == tmp_path / "auditor-alerts.sqlite3"
    absolute = Settings.load(env={"AUDITOR_ALERTS__LOG_PATH": str(tmp_path / "x.db")})
    assert absolute.alerts_config().log_path == tmp_path / "x.db"
    assert default_data_dir({"XDG_DATA_HOME": "/data"}) == Path("/data/sae-auditor")


@pytest.mark.parametrize(("name", "default"), [("compile", False), ("cuda_graphs", True), ("gc_freeze", True)])
def test_switches_come_from_the_flag_env_or_yaml(tmp_path: Path, name: str, default: bool) -> None:
    import argparse

    from auditor.server.cli import _SERVE_FLAGS, register

    env_key, flag = f"AUDITOR_{name.upper()}", "--" + name.replace("_", "-")
    assert getattr(Settings.load(env={}), name) is default
    assert getattr(Settings.load(env={env_key: str(not default).lower()}), name) is (not default)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{name}: {str(not default).lower()}\n")
    assert getattr(Settings.load(env={}, config_file=cfg), name) is (not default)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def from_flags(*argv: str, env: dict[str, str]) -> bool:
        args = parser.parse_args(["serve", *argv])
        return bool(getattr(Settings.load(flags={n: getattr(args, n, None) for n in _SERVE_FLAGS}, env=env), name))

    assert from_flags(flag, env={env_key: "false"}) is True  # the flag beats the environment
    assert from_flags(env={env_key: "1"}) is True  # no flag: the environment's value stands
    if default:  # a switch that is on by default can be turned off on the command line
        assert from_flags(f"--no-{flag[2:]}", env={}) is False
    cfg.write_text(f"port: 8081\n{name}: maybe\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(env={}, config_file=cfg)
    assert f"setting {name}" in str(info.value) and "c.yaml:2" in str(info.value)  # the file and line to fix


def test_dtype_is_checked_where_it_is_given(tmp_path: Path) -> None:
    assert Settings.load(env={}).dtype is None
    assert Settings.load(env={"AUDITOR_DTYPE": "bfloat16"}).dtype == "bfloat16"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 8081\ndtype: int8\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(env={}, config_file=cfg)
    assert "c.yaml:2:8" in str(info.value) and "dtype" in str(info.value) and "bfloat16" in str(info.value)


def test_model_workers_from_the_flag_env_or_yaml_and_checked(tmp_path: Path) -> None:
    import argparse

    from auditor.workers import auto_workers
    from auditor.server.cli import _SERVE_FLAGS, register

    assert Settings.load(env={}).model_workers is None  # chosen at load: auto_workers
    assert (auto_workers("cpu", 2), auto_workers("cpu", 1), auto_workers("cuda", 16)) == (2, 1, 1)
    assert Settings.load(env={"AUDITOR_MODEL_WORKERS": "3"}).model_workers == 3
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model-workers", "1"])
    assert Settings.load(flags={name: getattr(args, name, None) for name in _SERVE_FLAGS}, env={}).model_workers == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 8081\nmodel_workers: 0\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(env={}, config_file=cfg)
    assert "c.yaml:2:16" in str(info.value) and "model_workers" in str(info.value)


def test_errors_name_flags_as_the_command_line_spells_them(capsys: pytest.CaptureFixture[str]) -> None:
    from auditor.cli import main

    assert main(["serve", "--policy-watch", "-1", "--request-timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert "(from flag --policy-watch)" in err and "(from flag --request-timeout)" in err and "Value error" not in err


def test_a_nested_setting_names_the_variable_or_the_file_that_set_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"setting alerts.cooldown_s: .* \(from environment AUDITOR_ALERTS__COOLDOWN_S\)"):
        Settings.load(env={"AUDITOR_ALERTS__COOLDOWN_S": "-1"})
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text("alerts:\n  cooldown_s: -5\n  text_mode: hash\n")
    # The environment set another key of the same mapping; the bad value is the file's.
    with pytest.raises(ConfigError, match=r"setting alerts.cooldown_s: .* \(from config file .*auditor.yaml:2:15\)"):
        Settings.load(env={"AUDITOR_ALERTS__TEXT_MODE": "store"}, config_file=cfg)


def test_a_misspelt_environment_variable_is_named_not_ignored_in_silence(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="auditor.server")
    env = {"AUDITOR_PROT": "1", "AUDITOR_PORT": "9001", "AUDITOR_CONFIG_X": "y", "AUDITOR_CACHE_DIR": "/c",
           "AUDITOR_ALERTS__COOLDOWN_S": "5", "HOME": "/root"}
    assert Settings.load(env=env).port == 9001
    warned = [r.getMessage() for r in caplog.records]
    assert "environment variable AUDITOR_PROT is not a setting and is ignored; did you mean AUDITOR_PORT?" in warned
    assert any(m.startswith("environment variable AUDITOR_CONFIG_X is not a setting") for m in warned)
    assert len(warned) == 2  # the cache folder, a nested setting and other variables are fine
