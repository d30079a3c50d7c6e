"""Model workers: threads that share one loaded model and run its forwards side by side.

The sidecar runs every piece of model work on them (``auditor.server.batcher``). On a CPU two
workers with half the torch threads each get more done than one worker with all of them on the
sidecar's short batches (8 texts: +12%, ``benchmarks/model_thread.py``); on chunks of 64 texts,
what ``auditor audit --input`` runs, they gain nothing (``benchmarks/server_load.py``'s offline
runs: larger GEMMs use both threads well), so the CLI keeps one thread. Their hooks are isolated per thread
(:func:`~auditor.models.hooks.isolate_this_thread`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["ModelWorkers", "auto_workers"]

T = TypeVar("T")


def auto_workers(device: str, threads: int) -> int:
    """Model workers when the settings name none: 2 on a CPU with 2+ torch threads, else 1.

    On a CPU, two workers with half the threads each audit 12% more texts per second than one
    worker with all of them, 21% more next to a bursty event loop (2-core VM,
    ``benchmarks/model_thread.py``): one-thread GEMMs on short batches waste less time in OpenMP
    barriers, and a worker the event loop preempts stalls only itself. A GPU runs one worker
    (its kernels share one stream; the batcher overlaps its batches with the host's work by
    building their results on another thread, ``MicroBatcher.hand_off``).
    """
    return 2 if device == "cpu" and threads >= 2 else 1


def _call(threads: int | None, fn: Callable[..., T], *args: Any) -> T:
    """On a worker: ``fn(*args)`` with ``threads`` torch threads (None: as they are)."""
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return fn(*args)


def _start_worker(threads: int | None) -> None:
    from auditor.models.hooks import isolate_this_thread

    isolate_this_thread()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class ModelWorkers:
    """The threads that run torch in the sidecar: one loads the model, ``n`` audit and generate.

    Worker 0 exists from the start (load on it: torch's OpenMP pool belongs to the thread that
    uses it, and a thread that loads and another that audits would bring two pools whose
    spinning workers take each other's cores). :meth:`configure` then sets how many workers share
    the model and how many torch threads each gets. A job that starts while every other worker is
    idle runs with all the threads (a lone request is as fast as on one worker); one that starts
    beside running work, with its share. Every worker is isolated for hooks: its forwards see
    only the hooks it installed itself, so workers never see each other's captures or steering.

    Example::

        workers = ModelWorkers()
        model = await loop.run_in_executor(workers.executor(0), load)
        workers.configure(2)                      # on worker 0, after the model is on its device
        out = await workers.run(fn, *args)        # on whichever worker is idle
        i = await workers.acquire()               # or reserve one, then run on it
        out = await workers.start(i, fn, *args)
        workers.release(i)
        workers.shutdown()
    """

    def __init__(self) -> None:
        self._pools = [ThreadPoolExecutor(1, "auditor-model-0", initializer=_start_worker, initargs=(None,))]
        self._idle: asyncio.Queue[int] | None = None
        self.threads: int | None = None
        """torch threads per worker while others run (None: torch's default, all cores)."""
        self.total_threads: int | None = None
        """torch threads of a job that starts while every other worker is idle."""

    @property
    def n(self) -> int:
        return len(self._pools)

    def configure(self, n: int, threads: int | None = None) -> None:
        """``n`` workers of ``threads`` torch threads each (default: the cores split evenly).

        Call it on worker 0 (it sets that thread's own count) before the first :meth:`run`.
        """
        import torch

        if n < 1:
            raise ValueError(f"model workers must be at least 1, got {n}")
        if n > 1 or threads is not None:
            self.total_threads = torch.get_num_threads()
            threads = threads or max(1, self.total_threads // n)
            torch.set_num_threads(threads)
            self.threads = threads
        for i in range(len(self._pools), n):
            self._pools.append(
                ThreadPoolExecutor(1, f"auditor-model-{i}", initializer=_start_worker, initargs=(self.threads,))
            )

    def executor(self, i: int) -> ThreadPoolExecutor:
        return self._pools[i]

    def _queue(self) -> asyncio.Queue[int]:
        if self._idle is None:
            # Last in, first out, worker 0 on top: a job that finds every worker idle runs on
            # the thread that loaded the model (another thread's OpenMP pool runs the same
            # forwards ~25% slower, benchmarks/model_thread.py), and the worker that just
            # finished takes the next job while its threads are awake and its caches warm.
            self._idle = asyncio.LifoQueue()
            for i in reversed(range(self.n)):
                self._idle.put_nowait(i)
        return self._idle

    async def acquire(self) -> int:
        """Wait for an idle worker and reserve it (waiters are served first come, first served)."""
        return await self._queue().get()

    def release(self, i: int) -> None:
        self._queue().put_nowait(i)

    @property
    def idle(self) -> int:
        """Workers idle now (not counting one just acquired)."""
        return self._queue().qsize()

    def start(self, i: int, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Start ``fn(*args)`` on worker ``i`` (acquired): with all the torch threads when every
        other worker is idle now, else with its share. Call it on the event loop."""
        threads = self.total_threads if self.n > 1 and self.idle == self.n - 1 else self.threads
        return asyncio.get_running_loop().run_in_executor(self._pools[i], functools.partial(_call, threads, fn, *args))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the next idle worker."""
        i = await self.acquire()
        try:
            return await self.start(i, fn, *args)
        finally:
            self.release(i)

    def shutdown(self, wait: bool = True) -> None:
        for pool in self._pools:
            pool.shutdown(wait=wait, cancel_futures=True)
