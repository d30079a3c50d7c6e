"""``auditor serve`` as a process: flags and environment, readiness, clean shutdown, load failures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_random_sae

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The `serve` sub-command through the module's own register(), as auditor.cli wires it.
LAUNCH = (
    "import argparse, sys\n"
    "from auditor.server import cli\n"
    "p = argparse.ArgumentParser(prog='auditor'); s = p.add_subparsers(); cli.register(s)\n"
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
)


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "serve", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_starts_answers_and_stops_cleanly(tmp_path: Path) -> None:
    sae = make_random_sae(tmp_path / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    policy = REPO / "policies" / "examples" / "deception.yaml"
    proc = _serve(
        ["--port", "0", "--sae", str(sae), "--policy", str(policy), "--log-level", "info"],
        {"AUDITOR_DATA_DIR": str(tmp_path / "data"), "AUDITOR_QUEUE_SIZE": "7"},
    )
    assert proc.stdout is not None
    try:
        url = None
        deadline = time.monotonic() + 120
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url is not None, "".join(lines)
        while time.monotonic() < deadline:
            if httpx.get(url + "/readyz").status_code == 200:
                break
            time.sleep(0.2)
        ready = httpx.get(url + "/readyz").json()
        assert ready["policies"] == ["example-deception"]
        metrics = httpx.get(url + "/metrics").text
        assert "auditor_queue_capacity 7.0" in metrics  # from the environment
        # The process froze what loading left alive (the model's objects among it): full garbage
        # collections skip it from then on.
        frozen = re.search(r"^auditor_gc_frozen_objects (\S+)$", metrics, re.M)
        assert frozen is not None and float(frozen.group(1)) > 100_000, frozen
        audit = httpx.post(url + "/v1/audit", json={"text": "hello"}, timeout=60).json()
        assert audit["policy"] == "example-deception"
        # A reload replaces the policies frozen with the rest; they hold no reference cycle, so
        # they go without a collection, and the heap stays frozen (tests/unit/server/test_cli.py).
        assert httpx.post(url + "/v1/policies/reload", timeout=60).status_code == 200
        metrics = httpx.get(url + "/metrics").text
        frozen = re.search(r"^auditor_gc_frozen_objects (\S+)$", metrics, re.M)
        assert frozen is not None and float(frozen.group(1)) > 100_000, frozen
        audit = httpx.post(url + "/v1/audit", json={"text": "hello"}, timeout=60).json()
        assert audit["policy"] == "example-deception"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn re-raises the signal it handled after a graceful shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert (tmp_path / "data" / "auditor-alerts.sqlite3").exists()


def test_serve_exits_with_the_load_error(tmp_path: Path) -> None:
    proc = _serve(["--port", "0", "--policy", str(tmp_path / "missing.yaml")], {"AUDITOR_DATA_DIR": str(tmp_path)})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "error:" in out and "missing.yaml" in out


def test_sigterm_ends_open_alert_streams_and_the_server_exits(tmp_path: Path) -> None:
    # An open /v1/alerts/stream (the /ui/alerts page, a dashboard) never ends by itself, and
    # uvicorn waits for open responses before it shuts the app down: SIGTERM left the server
    # running, sending keepalives, until the subscriber went away.
    import threading

    sae = make_random_sae(tmp_path / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    policy = REPO / "policies" / "examples" / "deception.yaml"
    proc = _serve(["--port", "0", "--sae", str(sae), "--policy", str(policy)], {"AUDITOR_DATA_DIR": str(tmp_path / "data")})
    assert proc.stdout is not None
    ended = threading.Event()
    received: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url is not None
        while time.monotonic() < deadline and httpx.get(url + "/readyz").status_code != 200:
            time.sleep(0.2)
        subscribed = threading.Event()

        def subscribe() -> None:
            try:
                with httpx.stream("GET", url + "/v1/alerts/stream", timeout=60) as resp:
                    for line in resp.iter_lines():
                        received.append(line)
                        subscribed.set()
            except httpx.HTTPError as exc:
                received.append(f"error: {exc!r}")
            finally:
                ended.set()

        threading.Thread(target=subscribe, daemon=True).start()
        assert subscribed.wait(30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert ended.wait(5) and not any(r.startswith("error") for r in received), received  # the stream ended cleanly
