"""Run the sidecar in a background thread on a free loopback port (tests, benchmarks, notebooks).

Example::

    with BackgroundServer(create_app(settings)) as server:
        server.wait_ready()
        httpx.post(server.url + "/v1/audit", json={"text": "hello"})
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

__all__ = ["BackgroundServer", "AuditorServer"]


class AuditorServer(uvicorn.Server):
    """uvicorn's server for the sidecar's app: it tells the app when it shuts down
    (:func:`~auditor.server.app.begin_shutdown`) before it waits for the open connections, so
    open alert event streams end (a plain ``uvicorn.Server`` waits for them for ever)."""

    async def shutdown(self, sockets: Any = None) -> None:
        from auditor.server.app import begin_shutdown

        begin_shutdown(self.config.app)
        await super().shutdown(sockets=sockets)


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread; ``url`` is known once started."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
        self.server = AuditorServer(config)
        self.thread = threading.Thread(target=self.server.run, name="auditor-uvicorn", daemon=True)
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        """Start serving and wait until the socket listens (not until the model is loaded)."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during startup (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout_s} s")
            time.sleep(0.02)
        sockets = [s for server in self.server.servers for s in server.sockets]
        host, port = sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll ``/readyz`` until it answers 200; raises with the load error when loading failed."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                resp = httpx.get(self.url + "/readyz", timeout=5.0)
            except httpx.HTTPError:
                resp = None
            if resp is not None and resp.status_code == 200:
                return
            if resp is not None and resp.json().get("status") == "failed":
                raise RuntimeError(f"the server failed to load: {resp.json().get('error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout_s} s")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask uvicorn to exit (the lifespan closes the runtime) and join the thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
