"""Benchmark: which thread runs torch matters (how the server's model workers are set up).

torch's OpenMP pool belongs to the thread that first runs a parallel op in it. A process that
loads the model on one thread and audits on another ends up with two pools, and on a small
CPU the idle pool's spinning workers take cores from the busy one. Each case runs in a fresh
process: 256 short texts audited in arrival-order chunks of 8 (what the sidecar's batches look
like) with the default model, SAE and policy.

1. ``main``: load and audit on the main thread (one pool);
2. ``load-main-audit-worker``: load on the main thread, audit on a worker thread (two pools; what
   the server did before it loaded on its model thread);
3. ``worker``: load and audit on the same worker thread (one pool; what the server does now);
4. ``worker+busy``: as 3, plus a thread doing short bursts of Python work every 4 ms (an event
   loop answering requests);
5. ``two-workers``: the server's default on a CPU: ``ModelWorkers`` loads on worker 0, then two
   workers with half the torch threads each take the chunks in turn, side by side on the one
   model (hooks isolated per thread);
6. ``two-workers+busy``: as 5, next to the bursty thread.

Prints one JSON object and a table (texts/s, best of ``--repeats``).

    PYTHONPATH=. python benchmarks/model_thread.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CASES = ["main", "load-main-audit-worker", "worker", "worker+busy", "two-workers", "two-workers+busy"]


def run_case(case: str, repeats: int) -> float:
    """Texts/s of one case (in this process; call it in a fresh one)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(REPO / "benchmarks"))
    from server_load import audit_chunks, make_texts

    from auditor.text import AuditInput

    items = [AuditInput(text=t) for t in make_texts(256)]
    holder: dict[str, Any] = {}

    def load() -> None:
        from auditor.pipeline import Auditor

        holder["auditor"] = Auditor.load()

    def audit() -> float:
        aud = holder["auditor"]
        t0 = time.perf_counter()
        for i in range(0, len(items), 8):
            aud.run(items[i : i + 8])
        return len(items) / (time.perf_counter() - t0)

    worker = ThreadPoolExecutor(max_workers=1)
    on_main = case == "main"
    run: Any = None
    if case.startswith("two-workers"):
        from auditor.workers import ModelWorkers

        workers = ModelWorkers()
        workers.executor(0).submit(load).result()
        workers.executor(0).submit(workers.configure, 2).result()

        def audit_two() -> float:
            t0 = time.perf_counter()
            audit_chunks(holder["auditor"], [items[i : i + 8] for i in range(0, len(items), 8)], workers)
            return len(items) / (time.perf_counter() - t0)

        run = audit_two
    elif case in ("main", "load-main-audit-worker"):
        load()
    else:
        worker.submit(load).result()
    stop = threading.Event()
    if case.endswith("+busy"):

        def busy() -> None:
            while not stop.is_set():
                for _ in range(100):
                    json.dumps({"a": list(range(20))})
                time.sleep(0.004)

        threading.Thread(target=busy, daemon=True).start()
    if run is None:
        run = audit if on_main else (lambda: worker.submit(audit).result())
    run()  # untimed pass
    best = max(run() for _ in range(repeats))
    stop.set()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    args = ap.parse_args()
    if args.case:
        print(json.dumps({"texts_per_s": run_case(args.case, args.repeats)}))
        return
    out: dict[str, Any] = {"benchmark": "model_thread", "chunk": 8, "texts": 256, "cases": {}}
    for case in CASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        out["cases"][case] = json.loads(proc.stdout.strip().splitlines()[-1])["texts_per_s"]
    print(json.dumps(out, indent=2))
    print()
    for case, tps in out["cases"].items():
        print(f"{case:<24} {tps:6.1f} texts/s")


if __name__ == "__main__":
    main()
