"""Benchmark: sidecar audit throughput and latency under N concurrent clients, against offline batching.

1. Offline baseline: ``Auditor.run`` over the same texts in chunks of 64 (what
   ``auditor audit --input`` does) and of 8, on this thread and on two model workers
   side by side (``--offline-workers``; what the server runs on a CPU), each timed after an
   untimed pass, before and after the server run; the fastest run is the baseline.
2. Server: starts ``auditor serve`` in a child process on a free loopback port
   (``--in-process`` for a thread here, ``--url`` for a running server), then N asyncio clients each send one ``POST /v1/audit`` at a time
   until every text was audited once per round. The clients are minimal keep-alive HTTP/1.1
   connections (``--client httpx`` for httpx): on a small machine they share the server's cores.

Prints one JSON object (throughputs in texts/s and tokens/s, p50/p99 latency in
ms, mean batch size from the server's metrics) and a summary line with the ratio
of server to offline throughput (the goal is at least 0.8 with 16 clients).

    PYTHONPATH=. python benchmarks/server_load.py [--clients 16] [--texts 256] [--rounds 1]
        [--policy FILE] [--sae PATH] [--batch-max-wait-ms 20] [--offline-chunks 64,8] [--offline-workers 2]
        [--url http://127.0.0.1:8080] [--client raw|httpx] [--model-workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]

_SUBJECTS = ["The committee", "My neighbour", "A small bakery", "The new intern", "Our support team", "The city council"]
_VERBS = ["announced", "postponed", "reviewed", "celebrated", "questioned", "rewrote"]
_OBJECTS = [
    "the quarterly budget for the public library",
    "a plan to repaint every bench in the park before winter",
    "the wire transfer that was supposed to arrive on Friday",
    "an urgent message asking customers to confirm their passwords",
    "the recipe for a lemon cake with far too much sugar",
    "a long report on rainfall in the northern hills",
]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` varied sentences of 10-40 tokens (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."]
        for _ in range(rng.randint(0, 2)):
            parts.append(f"Later, {rng.choice(_SUBJECTS).lower()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.")
        out.append(" ".join(parts))
    return out


def audit_chunks(auditor: Any, chunks: list[list[Any]], workers: Any = None) -> int:
    """``Auditor.run`` over each chunk in turn; content tokens audited. ``workers`` (a configured
    :class:`~auditor.workers.ModelWorkers`): its workers take the chunks as they free up, side by
    side on the one model, as the server's do."""
    if workers is None:
        return sum(r.n_content_tokens for c in chunks for r in auditor.run(c))
    import threading

    pending, lock = list(reversed(chunks)), threading.Lock()

    def take() -> int:
        done = 0
        while True:
            with lock:
                if not pending:
                    return done
                c = pending.pop()
            done += sum(r.n_content_tokens for r in auditor.run(c))

    futures = [workers.executor(i).submit(take) for i in range(workers.n)]
    return sum(f.result() for f in futures)


def offline(auditor: Any, texts: list[str], chunk: int = 64, workers: Any = None) -> dict[str, Any]:
    """Texts/s of :func:`audit_chunks` over ``texts`` in chunks, after one untimed pass.

    The untimed pass matters on CPU: the first forward of each new batch shape is
    several times slower than later ones.
    """
    from auditor.text import AuditInput

    items = [AuditInput(text=t) for t in texts]
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    audit_chunks(auditor, chunks, workers)
    t0 = time.perf_counter()
    tokens = audit_chunks(auditor, chunks, workers)
    elapsed = time.perf_counter() - t0
    return {"chunk": chunk, "workers": workers.n if workers is not None else 1, "seconds": elapsed,
            "texts_per_s": len(items) / elapsed, "tokens_per_s": tokens / elapsed}


def offline_runs(auditor: Any, texts: list[str], chunks: list[int], workers: Any) -> list[dict[str, Any]]:
    """:func:`offline` for each chunk size, on this thread and (``workers``) on the model workers."""
    runs = [offline(auditor, texts, c) for c in chunks]
    if workers is not None:
        runs += [offline(auditor, texts, c, workers) for c in chunks]
    return runs


class _RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: far less client CPU than httpx.

    On a small machine the benchmark's clients share the cores with the server they measure;
    what they spend is taken from the server, so the default client does the minimum.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        self.writer.write(head + data)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return status, json.loads(payload) if status == 200 else {}

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def drive(url: str, texts: list[str], clients: int, policy: str | None, *, client: str = "raw") -> dict[str, Any]:
    """``clients`` concurrent closed-loop clients POST every text once to ``/v1/audit``."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    tokens = 0

    async def worker(post: Any) -> None:
        nonlocal tokens
        while True:
            try:
                text = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body: dict[str, Any] = {"text": text}
            if policy is not None:
                body["policy"] = policy
            t0 = time.perf_counter()
            status, data = await post(body)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                tokens += data["n_tokens"]

    if client == "raw":
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        conns = [_RawConnection(host, int(port)) for _ in range(clients)]
        posts = [lambda body, c=c: c.post("/v1/audit", body) for c in conns]
        try:
            await asyncio.gather(*(post({"text": "warm up"}) for post in posts))
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(post) for post in posts))
            elapsed = time.perf_counter() - t0
        finally:
            for c in conns:
                await c.close()
    else:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

            async def post_httpx(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                resp = await http.post("/v1/audit", json=body)
                return resp.status_code, resp.json() if resp.status_code == 200 else {}

            await asyncio.gather(*(http.post("/v1/audit", json={"text": "warm up"}) for _ in range(clients)))
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(post_httpx) for _ in range(clients)))
            elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "seconds": elapsed,
        "texts_per_s": len(texts) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "statuses": statuses,
        "client": client,
    }


class ServeProcess:
    """``auditor serve`` in a child process on a free port; the context value is its URL."""

    _LAUNCH = (
        "import argparse, sys\n"
        "from auditor.server import cli\n"
        "p = argparse.ArgumentParser(prog='auditor'); s = p.add_subparsers(); cli.register(s)\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )

    def __init__(self, flags: dict[str, Any]) -> None:
        argv = ["serve", "--port", "0", "--log-level", "info"]
        for key, value in flags.items():
            if value is None:
                continue  # not given: the server's own default
            for v in value if isinstance(value, list) else [value]:
                argv += ["--" + ("policy" if key == "policies" else key.replace("_", "-")), str(v)]
        self.argv = argv
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self._LAUNCH, *self.argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        )
        assert self.proc.stdout is not None
        url = None
        for line in self.proc.stdout:
            m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise RuntimeError("the server process exited before listening")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
        deadline = time.monotonic() + 300
        while httpx.get(url + "/readyz").status_code != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the server process did not become ready")
            time.sleep(0.2)
        return url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def _samples(url: str) -> list[Any]:
    """Every sample on the server's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in fam.samples]


def batch_stats(url: str) -> dict[str, float]:
    values = {s.name: s.value for s in _samples(url) if s.name in ("auditor_batch_size_sum", "auditor_batch_size_count")}
    count = values.get("auditor_batch_size_count", 0.0)
    return {"batches": count, "mean_batch_size": values.get("auditor_batch_size_sum", 0.0) / count if count else 0.0}


def stage_seconds(url: str) -> dict[str, float]:
    """Sum of ``auditor_audit_stage_duration_seconds`` per stage (time the model thread spent on audits)."""
    return {
        s.labels["stage"]: s.value for s in _samples(url) if s.name == "auditor_audit_stage_duration_seconds_sum"
    }


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of process ``pid`` (Linux /proc), keyed ``name[tid]``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}[{tid}]"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def measured_drive(url: str, texts: list[str], clients: int, *, client: str, pid: int | None) -> dict[str, Any]:
    """:func:`drive` plus where the CPU went: the model thread's busy share (stage sums from
    ``/metrics``), this process's (the clients') CPU time and, for a local server, CPU per thread."""
    import resource

    stages0 = stage_seconds(url)
    threads0 = thread_cpu(pid) if pid is not None else {}
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(drive(url, texts, clients, None, client=client))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    stages1 = stage_seconds(url)
    busy = {k: stages1[k] - stages0.get(k, 0.0) for k in stages1}
    out["model_thread_stage_s"] = busy
    out["model_thread_busy_share"] = sum(busy.values()) / out["seconds"]
    out["client_cpu_s"] = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    if pid is not None:
        threads1 = thread_cpu(pid)
        spent = {k: round(v - threads0.get(k, 0.0), 3) for k, v in threads1.items()}
        out["server_thread_cpu_s"] = {k: v for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v > 0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=256, help="texts per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--policy", help="policy file (default: the shipped policies/default.yaml)")
    parser.add_argument(
        "--sae", help="SAE path (default: the policy's library's SAE; 'random' for a random 64-latent SAE at "
        "layer 5, which fits the policies/examples/ policies)",
    )
    parser.add_argument("--batch-max-wait-ms", type=float, default=20.0)
    parser.add_argument("--batch-max-tokens", type=int, default=8192)
    parser.add_argument("--model-workers", type=int, help="the server's model_workers (default: its own choice)")
    parser.add_argument("--url", help="benchmark a running server instead (offline baseline still runs here)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the server in this process (its event loop then shares the GIL with the clients); "
        "default: a separate `auditor serve` process",
    )
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="raw: minimal keep-alive HTTP/1.1 clients (least CPU taken from the server); httpx: httpx.AsyncClient",
    )
    parser.add_argument(
        "--offline-chunks",
        default="64,8",
        help="comma-separated chunk sizes for the offline baseline (64 is what `auditor audit --input` uses); "
        "the fastest is the baseline",
    )
    parser.add_argument(
        "--offline-workers",
        type=int,
        default=2,
        help="also run the offline baseline on this many model workers side by side, as the server does "
        "(1: only on one thread); the fastest of all offline runs is the baseline",
    )
    args = parser.parse_args()

    from auditor.pipeline import Auditor
    from auditor.server.app import create_app
    from auditor.server.background import BackgroundServer
    from auditor.server.settings import Settings

    texts = make_texts(args.texts) * args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="auditor-bench-"))
    policy = args.policy or str(REPO / "policies" / "default.yaml")
    sae = args.sae
    if sae == "random":
        sys.path.insert(0, str(REPO))
        from tests.conftest import make_random_sae

        sae = str(make_random_sae(tmp / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post"))

    result: dict[str, Any] = {"clients": args.clients, "texts": len(texts)}
    auditor = None
    if not args.skip_offline:
        auditor = Auditor.load(sae=sae, policy=policy)
        chunks = [int(c) for c in args.offline_chunks.split(",")]
        workers = None
        if args.offline_workers > 1:
            from auditor.workers import ModelWorkers

            workers = ModelWorkers()
            workers.executor(0).submit(workers.configure, args.offline_workers).result()
        result["offline_before"] = offline_runs(auditor, texts, chunks, workers)

    if args.url:
        result["server"] = measured_drive(args.url, texts, args.clients, client=args.client, pid=None)
        result["server"].update(batch_stats(args.url))
    else:
        flags = {
            "sae": sae,
            "policies": [policy],
            "data_dir": str(tmp / "data"),
            "batch_max_wait_ms": args.batch_max_wait_ms,
            "batch_max_tokens": args.batch_max_tokens,
            "queue_size": max(256, args.clients * 4),
        }
        if args.model_workers:
            flags["model_workers"] = args.model_workers
        if args.in_process:
            with BackgroundServer(create_app(Settings.load(flags=flags, env={}))) as server:
                server.wait_ready()
                result["server"] = measured_drive(server.url, texts, args.clients, client=args.client, pid=None)
                result["server"].update(batch_stats(server.url))
        else:
            serve = ServeProcess(flags)
            with serve as url:
                assert serve.proc is not None
                result["server"] = measured_drive(url, texts, args.clients, client=args.client, pid=serve.proc.pid)
                result["server"].update(batch_stats(url))
    if auditor is not None:
        # Measured before and after the server run; the faster one is the baseline, so a
        # burst of load from other processes cannot flatter the ratio.
        result["offline_after"] = offline_runs(auditor, texts, chunks, workers)
        runs = result["offline_before"] + result["offline_after"]
        result["offline"] = max(runs, key=lambda r: r["texts_per_s"])
        result["ratio"] = result["server"]["texts_per_s"] / result["offline"]["texts_per_s"]
    print(json.dumps(result, indent=2))
    s = result["server"]
    line = (
        f"{args.clients} clients: server {s['texts_per_s']:.1f} texts/s ({s['tokens_per_s']:.0f} tok/s), "
        f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, mean batch {s['mean_batch_size']:.1f}"
    )
    if "ratio" in result:
        best = result["offline"]
        line += (f"; offline {best['texts_per_s']:.1f} texts/s (chunks of {best['chunk']}, {best['workers']} worker(s)); "
                 f"ratio {result['ratio']:.2f}")
    print(line)
    print(
        f"model workers busy {100 * s['model_thread_busy_share']:.0f}% of the run (summed over workers) "
        f"(forward {s['model_thread_stage_s'].get('forward', 0.0):.2f} s); clients' CPU {s['client_cpu_s']:.2f} s"
        + (
            "; server CPU by thread: " + ", ".join(f"{k} {v:.2f} s" for k, v in list(s["server_thread_cpu_s"].items())[:5])
            if "server_thread_cpu_s" in s
            else ""
        )
    )


if __name__ == "__main__":
    main()
