"""Micro-batching: concurrent audit requests share one forward.

Requests are put on a bounded :class:`asyncio.Queue`; a collector task on the
event loop takes the first waiting job, then keeps taking more until the next
job would push the batch over ``max_tokens``, or the queue is empty and either
the batch holds as many jobs as were in flight when the previous batch started
(closed-loop clients whose answers just went out are about to send again) or
``max_wait_ms`` has passed since a worker was free for it; it runs the batch on an idle
model worker (:class:`ModelWorkers`). With ``n`` workers a batch takes (and waits for)
at most ``1/n`` of the jobs in flight, so the workers' batches stay even. While every
worker is busy, new requests queue up and form the next batch, so under load batches
fill without any extra wait. The bound
counts every admitted request that has not finished (waiting, collected or
running), so it caps the latency a new request can face; over it,
:meth:`MicroBatcher.submit` raises
:class:`~auditor.server.errors.OverloadedError` (503 + ``Retry-After``) at once.

Chunks of streamed audits (:meth:`MicroBatcher.feed`) are jobs too: the chunks of the
concurrent streams in one batch share one forward (:meth:`Auditor.feed_streams`), so a
sidecar watching many streamed completions reads the weights once per round of chunks,
not once per stream.

All model work (loading, audits, generation, streams) runs on the model workers: threads
that share the model's weights, each with its own share of torch's CPU threads and hooks
that only its own forwards see (:func:`~auditor.models.hooks.isolate_this_thread`). On a GPU
(one worker) a batch's results are built on a host thread while the worker queues the next
batch (:attr:`MicroBatcher.hand_off`), so the GPU computes while the host's Python runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from auditor.server.errors import AuditTimeoutError, OverloadedError
from auditor.workers import ModelWorkers

if TYPE_CHECKING:
    from auditor.metrics import AuditorMetrics
    from auditor.pipeline import Auditor, AuditResult, AuditStream, LaunchedRun
    from auditor.policy import PolicyEngine
    from auditor.text import AuditInput

__all__ = ["AuditJob", "MicroBatcher"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


def _fail_shutting_down(job: AuditJob) -> None:
    if not job.future.done():
        job.future.set_exception(OverloadedError("the auditor is shutting down", retry_after_s=5))


@dataclass(eq=False)
class AuditJob:
    """One request's inputs, audited together under one policy, or one chunk of a streamed audit."""

    items: Sequence[AuditInput]
    engine: PolicyEngine | None
    top_k: int
    n_tokens: int
    future: asyncio.Future[list[AuditResult]]
    enqueued: float = field(default_factory=time.perf_counter)
    feed: tuple[AuditStream, str] | None = None
    """``(stream, chunk)`` for a chunk of a streamed audit (``items`` is then empty)."""


@dataclass(eq=False)
class _LaunchedGroup:
    """A group of a batch whose results are still to be built (:attr:`MicroBatcher.hand_off`)."""

    run: LaunchedRun
    members: list[int]
    """The group's jobs, by their place in the batch."""


class MicroBatcher:
    """Collect audit jobs into batches and run them on the model workers.

    Example::

        batcher = MicroBatcher(auditor, max_wait_ms=5, max_tokens=8192, queue_size=256)
        await batcher.start()
        results = await batcher.audit([AuditInput(text="hi")], engine, top_k=0, n_tokens=3, timeout_s=30)
        await batcher.stop()
    """

    def __init__(
        self,
        auditor: Auditor,
        *,
        max_wait_ms: float,
        max_tokens: int,
        queue_size: int,
        metrics: AuditorMetrics | None = None,
        workers: ModelWorkers | None = None,
    ) -> None:
        self.auditor = auditor
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_tokens = max_tokens
        self.queue_size = queue_size
        self.metrics = metrics
        # The workers that loaded the model, ideally (see ModelWorkers); one otherwise.
        self.workers = workers if workers is not None else ModelWorkers()
        self._queue: asyncio.Queue[AuditJob] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running_batches: set[asyncio.Task[None]] = set()
        self._carry: AuditJob | None = None
        self._admitted = 0
        self._recent_in_flight = 1  # jobs admitted when the last batch started
        self.batches = 0
        """Forwards run so far (for tests and the benchmark)."""
        self.hand_off: bool = auditor.device.type == "cuda"
        """Whether a batch's results are built off its model worker (default: on a GPU). The
        worker queues the batch's device work (:meth:`Auditor.launch`) and is free again; a host
        thread waits for that work and builds the verdicts while the worker tokenizes and queues
        the next batch, so the GPU computes while the host's Python runs. On a CPU, where the
        work is done when it is queued, the worker builds them itself."""
        self._host: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Admitted jobs not finished yet (waiting, collected or running)."""
        return self._admitted

    async def start(self) -> None:
        """Start the collector task on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(), name="auditor-batcher")
        if self.metrics is not None:
            self.metrics.queue_capacity.set(self.queue_size)
            self.metrics.model_workers.set(self.workers.n)

    async def stop(self) -> None:
        """Stop collecting, fail waiting jobs, let running batches finish and shut the workers down."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _fail_shutting_down(self._queue.get_nowait())
        if self._carry is not None:
            _fail_shutting_down(self._carry)
        self._carry = None
        if self._running_batches:
            await asyncio.gather(*self._running_batches, return_exceptions=True)
        self.workers.shutdown(wait=True)
        if self._host is not None:
            self._host.shutdown(wait=True)
            self._host = None

    def submit(
        self,
        items: Sequence[AuditInput],
        engine: PolicyEngine | None,
        *,
        top_k: int,
        n_tokens: int,
        feed: tuple[AuditStream, str] | None = None,
    ) -> AuditJob:
        """Queue a job; raises :class:`OverloadedError` when the queue is full.

        A stream's chunk (``feed``) is admitted even then: its stream was admitted when its
        request was, and refusing it would cut an answer off halfway; it still counts toward
        the bound for the requests that come after it.
        """
        if self._queue is None:
            raise OverloadedError("the auditor is not running", retry_after_s=5)
        if feed is None and self._admitted >= self.queue_size:
            raise OverloadedError(
                f"the audit queue is full ({self.queue_size} requests admitted, queue_size); retry shortly",
                retry_after_s=1,
            )
        job = AuditJob(items, engine, top_k, n_tokens, asyncio.get_running_loop().create_future(), feed=feed)
        self._admitted += 1
        job.future.add_done_callback(self._finished)
        self._queue.put_nowait(job)
        self._gauge()
        return job

    def _finished(self, _future: asyncio.Future[list[AuditResult]]) -> None:
        self._admitted -= 1
        self._gauge()

    async def audit(
        self,
        items: Sequence[AuditInput],
        engine: PolicyEngine | None,
        *,
        top_k: int,
        n_tokens: int,
        timeout_s: float,
    ) -> list[AuditResult]:
        """Audit ``items`` in the next batch; raises on overload or after ``timeout_s``."""
        job = self.submit(items, engine, top_k=top_k, n_tokens=n_tokens)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            # The collector skips a job whose future is done, so cancelling frees its slot.
            job.future.cancel()
            raise AuditTimeoutError(f"the audit did not finish within {timeout_s:g} s (request_timeout_s)") from None
        finally:
            self._observe(job)

    async def feed(self, stream: AuditStream, chunk: str) -> AuditResult:
        """Feed ``chunk`` to a streamed audit in the next batch; the verdict on the stream so far.

        Feeds of concurrent streams that land in one batch share one forward
        (:meth:`Auditor.feed_streams`). A stream's feeds must not overlap (await each). The
        chunk is audited even if the caller stops waiting (the stream stays consistent), so
        there is no timeout, and a full queue does not refuse it (see :meth:`submit`).
        """
        job = self.submit([], stream.engine, top_k=0, n_tokens=stream.estimate_new_tokens(chunk), feed=(stream, chunk))
        try:
            [result] = await asyncio.shield(job.future)
        finally:
            self._observe(job)
        return result

    def _observe(self, job: AuditJob) -> None:
        """Record ``job``'s time from admission to now (answered, failed or given up on)."""
        if self.metrics is not None:
            self.metrics.audit_duration.observe(time.perf_counter() - job.enqueued)

    async def run_model(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the next idle model worker (generation, streamed audits, the viewer)."""
        return await self.workers.run(fn, *args)

    # ------------------------------------------------------------------ internals

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)

    async def _next(self, timeout: float | None) -> AuditJob | None:
        assert self._queue is not None  # set in start()
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first.future.done():
                continue
            batch = [first]
            try:
                worker = await self.workers.acquire()
            except BaseException:
                self._carry = first  # stop() fails it
                raise
            if first.future.done():  # given up on (timed out) while it waited for the worker
                self.workers.release(worker)
                continue
            # Closed-loop clients whose answers just went out are about to send again: wait for
            # as many jobs as were in flight when the last batch started. With several workers,
            # a batch takes (and waits for) only its worker's share of the jobs in flight, so
            # the workers' batches stay even instead of one carrying most clients and the
            # other a straggler or two.
            target, share = self._recent_in_flight, None
            if self.workers.n > 1:
                share = -(-max(self._recent_in_flight, self._admitted) // self.workers.n)
                target = share
            try:
                await self._fill(loop, batch, target, share)
            except BaseException:
                self.workers.release(worker)
                for job in batch:
                    _fail_shutting_down(job)
                raise
            self._recent_in_flight = self._admitted
            self.batches += 1
            task = loop.create_task(self._dispatch(worker, batch))
            self._running_batches.add(task)
            task.add_done_callback(self._running_batches.discard)

    async def _fill(self, loop: asyncio.AbstractEventLoop, batch: list[AuditJob], target: int, share: int | None) -> None:
        """Add jobs to ``batch`` (one job so far): up to ``share`` jobs and the token budget,
        waiting (at most ``max_wait_ms`` from now) while it holds fewer than ``target``."""
        tokens = batch[0].n_tokens
        # The wait counts from now, when a worker is ready for the batch: jobs left over from
        # a full batch head the next one, and it still waits for the clients that are about to
        # return (counting from their arrival sent such leftovers out alone, and the workers'
        # batches split into ever smaller ones). A lone client never waits (target 1).
        deadline = loop.time() + self.max_wait_s
        while tokens < self.max_tokens and (share is None or len(batch) < share):
            timeout = deadline - loop.time() if len(batch) < target else 0.0
            job = await self._next(timeout)
            if job is None:
                break
            if job.future.done():
                continue
            if tokens + job.n_tokens > self.max_tokens:
                self._carry = job  # heads the next batch
                break
            batch.append(job)
            tokens += job.n_tokens

    async def _dispatch(self, worker: int, batch: list[AuditJob]) -> None:
        try:
            outcomes = await self.workers.start(worker, self._run, batch)
        except Exception as exc:  # the executor itself failed (shutdown)
            outcomes = [exc] * len(batch)
        finally:
            self.workers.release(worker)
        for launched in {id(o): o for o in outcomes if isinstance(o, _LaunchedGroup)}.values():
            # Built off the worker (hand_off): one host thread, so batches finish in order.
            if self._host is None:
                self._host = ThreadPoolExecutor(1, "auditor-host")
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(self._host, launched.run.results)
            except Exception as exc:
                _log.exception("audit batch failed")
                for i in launched.members:
                    outcomes[i] = exc
                continue
            if self.metrics is not None:
                self.metrics.observe_stages(launched.run.timings.as_dict())
            self._deliver(batch, launched.members, results, outcomes)
        for job, outcome in zip(batch, outcomes):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                assert not isinstance(outcome, _LaunchedGroup)  # every launched group was built above
                job.future.set_result(outcome)

    def _run(self, batch: list[AuditJob]) -> list[list[AuditResult] | BaseException | _LaunchedGroup]:
        """On a model worker: one ``Auditor.run`` (``Auditor.launch`` with :attr:`hand_off`) per
        (policy, top_k) group of the batch and one ``Auditor.feed_streams`` for its stream chunks."""
        groups: dict[tuple[int, int], list[int]] = {}
        feeds: list[int] = []
        for i, job in enumerate(batch):
            if job.feed is not None:
                feeds.append(i)
            else:
                groups.setdefault((id(job.engine), job.top_k), []).append(i)
        out: list[list[AuditResult] | BaseException | _LaunchedGroup] = [[] for _ in batch]
        if feeds:
            self._run_feeds(batch, feeds, out)
        n_items = sum(len(job.items) or 1 for job in batch)
        if self.metrics is not None:
            self.metrics.batch_size.observe(n_items)
            self.metrics.batch_tokens.observe(sum(job.n_tokens for job in batch))
        for members in groups.values():
            jobs = [batch[i] for i in members]
            items = [item for job in jobs for item in job.items]
            engine, top_k = jobs[0].engine, jobs[0].top_k
            if self.hand_off:
                run = self._attempt(
                    "audit batch", members, out,
                    lambda: self.auditor.launch(items, top_k=top_k, policy=engine, evaluate=engine is not None), observe=False,
                )
                if run is not None:
                    launched = _LaunchedGroup(run, members)
                    for i in members:
                        out[i] = launched
                continue
            results = self._attempt(
                "audit batch", members, out, lambda: self.auditor.run(items, top_k=top_k, policy=engine, evaluate=engine is not None)
            )
            if results is not None:
                self._deliver(batch, members, results, out)
        return out

    def _deliver(
        self, batch: list[AuditJob], members: list[int], results: list[AuditResult], out: list[Any]
    ) -> None:
        """A group's results, split among its jobs (``out[members]``), and counted."""
        if self.metrics is not None:
            self.metrics.tokens_audited.inc(sum(r.n_content_tokens for r in results))
        pos = 0
        for i in members:
            n = len(batch[i].items)
            out[i] = results[pos : pos + n]
            pos += n

    def _run_feeds(self, batch: list[AuditJob], feeds: list[int], out: list[Any]) -> None:
        """Stream chunks of ``batch[feeds]``: one ``feed_streams`` call, split where a stream comes again."""
        calls: list[list[int]] = [[]]
        for i in feeds:
            stream = batch[i].feed[0]  # type: ignore[index]
            if any(batch[j].feed[0] is stream for j in calls[-1]):  # type: ignore[index]
                calls.append([])
            calls[-1].append(i)
        for call in calls:
            feeds_now = [batch[i].feed for i in call]
            results = self._attempt("streamed audit batch", call, out, lambda: self.auditor.feed_streams(feeds_now))  # type: ignore[arg-type]
            for i, result in zip(call, results or []):
                out[i] = [result]

    def _attempt(self, what: str, members: list[int], out: list[Any], fn: Callable[[], T], *, observe: bool = True) -> T | None:
        """``fn()`` with its stage timings observed (``observe``), or None with its exception as
        every member's outcome."""
        try:
            results = fn()
        except Exception as exc:
            _log.exception("%s failed", what)
            for i in members:
                out[i] = exc
            return None
        if observe and self.metrics is not None:
            self.metrics.observe_stages(self.auditor.last_timings.as_dict())
        return results
