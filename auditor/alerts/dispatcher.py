"""Fan alerts out to the sinks without ever losing one or blocking the audit.

:meth:`AlertDispatcher.submit` writes the alerts to the :class:`AuditLog`
(durable, with one pending delivery record per sink) and then offers them to a
bounded in-memory queue per sink; it never touches the network. One worker
thread per sink delivers batches, retrying with capped exponential backoff and
jitter. The log, not the queue, is the source of truth: when a queue is full
or a sink stays down, the alerts simply wait in the log as pending, and the
worker re-reads them from there (oldest first) once the sink answers again,
including after a restart of the process.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Literal

from auditor.alerts.config import AlertsConfig, DedupField
from auditor.alerts.log import AuditLog
from auditor.alerts.model import Alert
from auditor.alerts.sinks import DeliveryError, Sink, build_sink

__all__ = ["AlertDispatcher", "DeliveryResult", "DispatcherStats", "SinkStats", "backoff_delay"]

_log = logging.getLogger(__name__)

DeliveryResult = Literal["success", "failure", "retry", "dropped"]
"""Per alert: ``success`` accepted by the sink; ``retry`` an attempt failed and
will be repeated; ``failure`` retries exhausted, the alert waits in the log for
the sink to recover; ``dropped`` the sink rejected it for good (4xx), it stays
in the log marked dropped (see :meth:`AuditLog.requeue`)."""

_POLL_S = 0.5  # longest a worker sleeps before re-checking for close, ticks and backlog
_SWEEP_S = 30.0  # idle workers re-check the log this often for pending alerts
_COOLDOWN_PRUNE_AT = 4096


def backoff_delay(failures: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (>= 1).

    The ceiling doubles from ``initial_s`` per failure up to ``max_s``; the delay is
    drawn uniformly from ``[ceiling / 2, ceiling]`` ("equal jitter"), so senders
    recovering together spread out but never retry at once.
    """
    ceiling = min(max_s, initial_s * 2.0 ** min(max(failures, 1) - 1, 60))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass
class SinkStats:
    """Counters of one sink (alerts, not requests)."""

    delivered: int = 0
    """Accepted by the sink."""
    retries: int = 0
    """Failed attempts that were repeated."""
    failed: int = 0
    """Alerts whose retries ran out; they wait in the log until the sink recovers."""
    dropped: int = 0
    """Rejected by the sink for good (kept in the log, marked dropped)."""
    overflowed: int = 0
    """Not queued in memory because the queue was full; delivered later from the log."""
    tick_failures: int = 0
    """Failed periodic requests (Alertmanager re-sends)."""
    queued: int = 0
    """Alerts in the in-memory queue now."""
    pending: int = 0
    """Alerts pending for this sink in the log now (includes the queued ones)."""
    down: bool = False
    """True while the sink is failing and alerts are parked in the log."""
    last_error: str | None = None
    """The latest delivery error."""


@dataclass
class DispatcherStats:
    """A snapshot of :class:`AlertDispatcher` counters."""

    submitted: int = 0
    """Alerts handed to :meth:`AlertDispatcher.submit`."""
    logged: int = 0
    """Alerts written to the audit log."""
    suppressed: int = 0
    """Alerts suppressed by the cooldown (not logged)."""
    suppressed_by_rule: dict[str, int] = field(default_factory=dict)
    """``suppressed`` split by rule id."""
    pruned: int = 0
    """Alerts deleted by retention (``retention_days`` / ``max_alerts``)."""
    sinks: dict[str, SinkStats] = field(default_factory=dict)
    """Per-sink counters, by sink name."""


class AlertDispatcher:
    """Durable, non-blocking delivery of alerts to sinks.

    Example::

        log = AuditLog("alerts.sqlite3")
        with AlertDispatcher(log, [WebhookSink("http://127.0.0.1:8080/hook")]) as dispatcher:
            dispatcher.submit(alerts)      # returns once the alerts are on disk

    Args:
        log: the audit log (the dispatcher does not close it unless built by :meth:`from_config`).
        sinks: the sinks; names must be unique and stable across restarts.
        queue_size: in-memory queue per sink.
        batch_size: most alerts per request.
        max_attempts: attempts per batch before the sink counts as down.
        retry_initial_s, retry_max_s: backoff start and cap (the delay doubles, with jitter).
        cooldown_s, dedup_by: suppress an alert when one with the same rule and
            ``dedup_by`` fields was emitted less than ``cooldown_s`` ago (0 disables).
        on_delivery: called as ``on_delivery(sink_name, result)`` once per alert and outcome.
        clock: monotonic seconds, for the cooldown.
        rng: source of backoff jitter.
    """

    def __init__(
        self,
        log: AuditLog,
        sinks: Sequence[Sink],
        *,
        queue_size: int = 1000,
        batch_size: int = 100,
        max_attempts: int = 5,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        cooldown_s: float = 0.0,
        dedup_by: Sequence[DedupField] = ("request_id", "text_sha256"),
        on_delivery: Callable[[str, DeliveryResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        retention_days: float | None = None,
        max_alerts: int | None = None,
        prune_interval_s: float = 3600.0,
    ) -> None:
        names = [s.name for s in sinks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sink names must be unique; repeated: {', '.join(duplicates)}")
        if queue_size < 1 or batch_size < 1 or max_attempts < 1:
            raise ValueError("queue_size, batch_size and max_attempts must be >= 1")
        self.log = log
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.cooldown_s = cooldown_s
        self.dedup_by = tuple(dedup_by)
        self.on_delivery = on_delivery
        self._clock = clock
        self._rng = rng or random.Random()
        self._owns_log = False
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._started = False
        self._closed = False
        self._lock = threading.Lock()
        self._last_emit: dict[tuple[object, ...], float] = {}
        self._stats = DispatcherStats()
        self._workers = [_SinkWorker(self, sink, queue_size) for sink in sinks]
        self.retention_days = retention_days
        self.max_alerts = max_alerts
        self.prune_interval_s = prune_interval_s
        self._last_prune: float | None = None

    @classmethod
    def from_config(
        cls,
        config: AlertsConfig,
        *,
        on_delivery: Callable[[str, DeliveryResult], None] | None = None,
    ) -> AlertDispatcher:
        """Open the configured log and sinks; the dispatcher closes the log on :meth:`close`."""
        log = AuditLog(config.log_path, text_mode=config.text_mode)
        try:
            sinks = [build_sink(s) for s in config.sinks]
        except BaseException:
            log.close()
            raise
        dispatcher = cls(
            log,
            sinks,
            queue_size=config.queue_size,
            batch_size=config.batch_size,
            max_attempts=config.max_attempts,
            retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
            cooldown_s=config.cooldown_s,
            dedup_by=config.dedup_by,
            on_delivery=on_delivery,
            retention_days=config.retention_days,
            max_alerts=config.max_alerts,
            prune_interval_s=config.prune_interval_s,
        )
        dispatcher._owns_log = True
        return dispatcher

    @property
    def sink_names(self) -> list[str]:
        """Names of the sinks, in order."""
        return [w.sink.name for w in self._workers]

    def start(self) -> None:
        """Start one worker per sink; alerts left pending in the log are delivered first."""
        if self._started:
            return
        self._started = True
        self.prune()
        now = datetime.now(timezone.utc)
        for worker in self._workers:
            sink = worker.sink
            if sink.active_window_s:
                since = now - timedelta(seconds=sink.active_window_s)
                sink.restore(self.log.delivered_since(sink.name, since))
            if self.log.pending_count(sink.name):
                worker.flag_backlog()
            worker.thread.start()

    def submit(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Log ``alerts`` durably and queue them for every sink; never waits on a sink.

        Returns the alerts as logged (cooldown-suppressed ones left out, text per
        the log's ``text_mode``), once they are committed to disk.
        """
        if self._closed or self._closing.is_set():
            raise RuntimeError("AlertDispatcher.submit after close()")
        incoming = list(alerts)
        kept, previous = self._apply_cooldown(incoming)
        try:
            stored = self.log.append(kept, sinks=self.sink_names)
        except BaseException:
            self._undo_cooldown(previous)
            raise
        with self._lock:
            self._stats.submitted += len(incoming)
            self._stats.logged += len(stored)
        for worker in self._workers:
            worker.offer(stored)
        if self._last_prune is not None and self._clock() - self._last_prune >= self.prune_interval_s:
            self.prune()
        return stored

    def prune(self) -> int:
        """Apply ``retention_days`` / ``max_alerts`` to the log now; returns the alerts deleted."""
        if self.retention_days is None and self.max_alerts is None:
            return 0
        self._last_prune = self._clock()
        cutoff = None
        if self.retention_days is not None:
            cutoff = datetime.now(timezone.utc) - timedelta(days=self.retention_days)
        deleted = self.log.prune(older_than=cutoff, keep_last=self.max_alerts)
        with self._lock:
            self._stats.pruned += deleted
        return deleted

    def _dedup_key(self, alert: Alert) -> tuple[object, ...]:
        parts: list[object] = [alert.rule_id]
        for name in self.dedup_by:
            value = getattr(alert, name)
            parts.append(tuple(sorted(value.items())) if isinstance(value, dict) else value)
        return tuple(parts)

    def _apply_cooldown(self, alerts: list[Alert]) -> tuple[list[Alert], dict[tuple[object, ...], float | None]]:
        if self.cooldown_s <= 0:
            return alerts, {}
        now = self._clock()
        kept: list[Alert] = []
        previous: dict[tuple[object, ...], float | None] = {}
        with self._lock:
            for alert in alerts:
                key = self._dedup_key(alert)
                last = self._last_emit.get(key)
                if last is not None and now - last < self.cooldown_s:
                    self._stats.suppressed += 1
                    by_rule = self._stats.suppressed_by_rule
                    by_rule[alert.rule_id] = by_rule.get(alert.rule_id, 0) + 1
                    continue
                previous.setdefault(key, last)
                self._last_emit[key] = now
                kept.append(alert)
            if len(self._last_emit) > _COOLDOWN_PRUNE_AT:
                self._last_emit = {k: t for k, t in self._last_emit.items() if now - t < self.cooldown_s}
        return kept, previous

    def _undo_cooldown(self, previous: dict[tuple[object, ...], float | None]) -> None:
        # The alerts were not logged, so they must not silence their next occurrence.
        with self._lock:
            for key, last in previous.items():
                if last is None:
                    self._last_emit.pop(key, None)
                else:
                    self._last_emit[key] = last

    def stats(self) -> DispatcherStats:
        """A snapshot of the counters (queue and log depths read now)."""
        with self._lock:
            snapshot = replace(
                self._stats,
                suppressed_by_rule=dict(self._stats.suppressed_by_rule),
                sinks={w.sink.name: replace(w.stats) for w in self._workers},
            )
        for worker in self._workers:
            entry = snapshot.sinks[worker.sink.name]
            entry.queued = worker.queue.qsize()
            entry.pending = self.log.pending_count(worker.sink.name) if not self._closed else 0
            entry.down = worker.down
        return snapshot

    def close(self, timeout: float = 10.0) -> bool:
        """Deliver what is queued or pending (up to ``timeout`` seconds), then stop.

        Returns True when every sink was drained. Whatever is not delivered stays
        pending in the log and goes out on the next start. A sink that is down
        is not waited for.
        """
        if self._closed:
            return True
        self._closing.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.thread.is_alive():
                worker.thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        for worker in self._workers:
            if worker.thread.is_alive():
                # A request in flight ends within the sink's HTTP timeout.
                worker.thread.join(_POLL_S + 10.0)
        if self._started:
            drained = all(w.drained and not w.thread.is_alive() for w in self._workers)
        else:
            drained = not any(self.log.pending_count(name) for name in self.sink_names)
        for worker in self._workers:
            if not worker.thread.is_alive():
                worker.sink.close()
        self._closed = True
        if self._owns_log and not any(w.thread.is_alive() for w in self._workers):
            self.log.close()
        return drained

    def __enter__(self) -> AlertDispatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by the workers ---------------------------------------------------

    def _report(self, sink: str, result: DeliveryResult, n: int) -> None:
        if self.on_delivery is None:
            return
        for _ in range(n):
            try:
                self.on_delivery(sink, result)
            except Exception:
                # A broken metrics hook must not stop deliveries.
                _log.exception("alerts: on_delivery hook failed")

    def _backoff(self, failures: int) -> float:
        return backoff_delay(failures, self.retry_initial_s, self.retry_max_s, self._rng)


class _SinkWorker:
    """The thread that owns one sink: queue in, batches out, bookkeeping in the log."""

    def __init__(self, dispatcher: AlertDispatcher, sink: Sink, queue_size: int) -> None:
        self.d = dispatcher
        self.sink = sink
        self.queue: queue.Queue[Alert] = queue.Queue(maxsize=queue_size)
        self.stats = SinkStats()
        self.failures = 0  # consecutive failed attempts, for the backoff
        self.drained = False
        self._next_tick = float("inf")
        self._next_sweep = float("inf")
        self._flag_lock = threading.Lock()
        self._backlog = False
        self._generation = 0  # bumped whenever the log gains alerts the queue does not hold
        self.thread = threading.Thread(target=self._run, name=f"alerts-{sink.name}", daemon=True)

    @property
    def down(self) -> bool:
        return self.failures > 0

    def flag_backlog(self) -> None:
        with self._flag_lock:
            self._backlog = True
            self._generation += 1

    def offer(self, alerts: Sequence[Alert]) -> None:
        overflow = 0
        for alert in alerts:
            try:
                self.queue.put_nowait(alert)
            except queue.Full:
                overflow += 1
        if overflow:
            # Already pending in the log; the worker fetches them from there.
            self.flag_backlog()
            with self.d._lock:
                self.stats.overflowed += overflow

    # -- the loop --------------------------------------------------------------

    def _run(self) -> None:
        tick_every = self.sink.tick_interval_s
        self._next_tick = time.monotonic() + tick_every if tick_every else float("inf")
        self._next_sweep = time.monotonic() + _SWEEP_S
        while not self.d._abort.is_set():
            try:
                if not self._step():
                    return
            except Exception:
                # E.g. the log file locked by another process for too long: the alerts
                # are safe in the log, so wait and carry on from there.
                _log.exception("alerts: worker for sink %r failed; retrying", self.sink.name)
                self.flag_backlog()
                if self.d._abort.wait(self.d.retry_max_s):
                    return

    def _step(self) -> bool:
        """One turn of the worker loop; False when the worker should stop."""
        now = time.monotonic()
        if now >= self._next_tick and self.sink.tick_interval_s:
            self._tick()
            self._next_tick = time.monotonic() + self.sink.tick_interval_s
        if self._backlog:
            return self._step_backlog()
        if self.d._closing.is_set() and self.queue.empty():
            self.drained = not self._backlog
            return False
        batch = self._take(min(_POLL_S, max(0.0, self._next_tick - now)))
        if not batch:
            if time.monotonic() >= self._next_sweep:
                # Safety net: alerts pending in the log that no queue holds (say, after a
                # failed bookkeeping write) are picked up from there.
                self._next_sweep = time.monotonic() + _SWEEP_S
                if self.d.log.pending_count(self.sink.name):
                    self.flag_backlog()
            return True
        # Skip alerts a backlog pass already delivered from the log.
        still = self.d.log.pending_ids(self.sink.name, [a.id for a in batch])
        batch = [a for a in batch if a.id in still]
        if batch and not self._deliver(batch, self.d.max_attempts):
            self.flag_backlog()
            if self.d._closing.is_set() or self.d._abort.wait(self.d._backoff(self.failures)):
                return False
        return True

    def _step_backlog(self) -> bool:
        """One pass over the log's pending alerts; False when the worker should stop."""
        # Everything queued is also pending in the log, which is read oldest first.
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        with self._flag_lock:
            generation = self._generation
        batch = self.d.log.pending(self.sink.name, limit=self.d.batch_size)
        if not batch:
            with self._flag_lock:
                if generation == self._generation:
                    self._backlog = False
            return True
        # One attempt per pass: a down sink is probed at the capped backoff, not hammered.
        if self._deliver(batch, 1, parked=True):
            return True
        if self.d._closing.is_set():
            return False
        return not self.d._abort.wait(self.d._backoff(self.failures))

    def _take(self, timeout: float) -> list[Alert]:
        try:
            first = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.d.batch_size:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _tick(self) -> None:
        try:
            self.sink.tick()
        except DeliveryError as exc:
            with self.d._lock:
                self.stats.tick_failures += 1
                self.stats.last_error = str(exc)
        except Exception:
            _log.exception("alerts: periodic work of sink %r failed", self.sink.name)

    def _deliver(self, batch: list[Alert], attempts: int, *, parked: bool = False) -> bool:
        """Send ``batch``; True when nothing of it is left pending for this sink.

        ``parked``: the alerts already count as failed (read back from the log),
        so a failed attempt is reported as ``retry``, not again as ``failure``.
        """
        name = self.sink.name
        ids = [a.id for a in batch]
        error: str = ""
        for attempt in range(1, attempts + 1):
            try:
                self.sink.send(batch)
            except DeliveryError as exc:
                if not exc.retryable:
                    return self._rejected(batch, exc, parked)
                error = str(exc)
            except Exception as exc:
                # A sink bug (e.g. a payload it cannot encode) will not fix itself by retrying.
                _log.exception("alerts: sink %r failed unexpectedly", name)
                return self._rejected(batch, exc, parked)
            else:
                self.d.log.mark_delivered(name, ids)
                self.failures = 0
                with self.d._lock:
                    self.stats.delivered += len(batch)
                self.d._report(name, "success", len(batch))
                return True
            self.failures += 1
            with self.d._lock:
                self.stats.last_error = error
            if attempt == attempts or self.d._closing.is_set():
                break
            with self.d._lock:
                self.stats.retries += len(batch)
            self.d._report(name, "retry", len(batch))
            if self.d._abort.wait(self.d._backoff(self.failures)):
                break
        _log.warning("alerts: %d alert(s) for sink %r wait in the log: %s", len(batch), name, error)
        self.d.log.mark_failed(name, ids, error)
        if parked:
            with self.d._lock:
                self.stats.retries += len(batch)
            self.d._report(name, "retry", len(batch))
        else:
            with self.d._lock:
                self.stats.failed += len(batch)
            self.d._report(name, "failure", len(batch))
        return False

    def _rejected(self, batch: list[Alert], exc: Exception, parked: bool) -> bool:
        if len(batch) > 1:
            # Find the alert(s) the receiver refuses instead of dropping the whole batch.
            return all(self._deliver([alert], 1, parked=parked) for alert in batch)
        _log.error("alerts: sink %r rejected alert %s for good: %s", self.sink.name, batch[0].id, exc)
        self.d.log.mark_dropped(self.sink.name, [batch[0].id], str(exc))
        with self.d._lock:
            self.stats.dropped += 1
            self.stats.last_error = str(exc)
        self.d._report(self.sink.name, "dropped", 1)
        return True
