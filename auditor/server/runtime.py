"""What a running sidecar holds: the auditor, the policy store, the alert dispatcher, the batcher.

:func:`load_runtime` builds it (slow: it loads the model) and
:meth:`Runtime.audit` is the one audit path every route uses: count tokens
(413 over the limit), queue for the next micro-batch, record verdict metrics,
log and fan out alerts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from auditor.errors import AuditorError, ConfigError
from auditor.pipeline import default_policy_path
from auditor.server.batcher import MicroBatcher
from auditor.workers import ModelWorkers, auto_workers
from auditor.server.errors import BadRequestError, NotFoundError, ServerError, TooLargeError
from auditor.server.settings import Settings
from auditor.server.sse import Broadcaster
from auditor.text import AuditInput, audited_text, render, sink_token_id

if TYPE_CHECKING:
    import httpx

    from auditor.alerts import Alert, AlertDispatcher
    from auditor.metrics import AuditorMetrics
    from auditor.pipeline import Auditor, AuditResult
    from auditor.policy import PolicyEngine, PolicyStore, Verdict

__all__ = ["Runtime", "load_runtime", "NO_POLICY_NOTE"]

_log = logging.getLogger("auditor.server")

NO_POLICY_NOTE = (
    "no policy loaded: every verdict is 'allow' and scores are empty; "
    "pass --policy FILE (or AUDITOR_POLICIES) or add policies/default.yaml"
)


# ``auditor_errors_total`` kinds of the server errors whose code says more than the metric needs.
_FAILURE_KINDS = {"audit_timeout": "timeout"}


@dataclass
class Runtime:
    """Loaded state of one sidecar."""

    settings: Settings
    metrics: AuditorMetrics
    auditor: Auditor
    store: PolicyStore | None
    dispatcher: AlertDispatcher
    batcher: MicroBatcher
    alerts: Broadcaster
    http: httpx.AsyncClient | None = None
    sae_name: str = "sae"
    prep: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditor-prep")
    )

    # ------------------------------------------------------------ policies

    @property
    def policy_note(self) -> str | None:
        return NO_POLICY_NOTE if self.store is None else None

    def engine(self, name: str | PolicyEngine | None) -> PolicyEngine | None:
        """The policy called ``name`` (or the default); None when no policy is loaded. An engine
        (one this method returned before) is returned as it is: a request that audits more than
        once (a prompt, then its completion) resolves its policy once and keeps that version,
        whatever reloads happen meanwhile."""
        if name is not None and not isinstance(name, str):
            return name
        if self.store is None:
            if name is not None:
                raise NotFoundError(f"unknown policy {name!r}: {NO_POLICY_NOTE}")
            return None
        try:
            return self.store.current(name)
        except AuditorError as exc:
            raise NotFoundError(exc.message) from None

    # ------------------------------------------------------------ auditing

    def count_tokens(self, items: Sequence[AuditInput]) -> list[int]:
        """Tokens of each input as the pipeline will see them (chat template and sink token included)."""
        tok = self.auditor.model.tokenizer
        sink = sink_token_id(tok)
        counts = []
        for item in items:
            rendered, _spans, needs_sink = render(tok, item)
            n = len(tok(rendered, add_special_tokens=False)["input_ids"])
            counts.append(n + (1 if needs_sink and sink is not None else 0))
        return counts

    async def audit(
        self,
        items: Sequence[AuditInput],
        *,
        policy: str | PolicyEngine | None = None,
        top_k: int = 0,
        source: str = "any",
        request_id: str | None = None,
    ) -> tuple[list[AuditResult], PolicyEngine | None]:
        """Audit ``items`` under one policy (a name, or an engine from :meth:`engine`); verdict
        metrics and alerts are recorded here."""
        engine = self.engine(policy)
        loop = asyncio.get_running_loop()
        try:
            try:
                counts = await loop.run_in_executor(self.prep, self.count_tokens, items)
            except AuditorError as exc:
                raise BadRequestError(exc.message) from None
            limit = self.settings.max_tokens
            for i, n in enumerate(counts):
                if n > limit:
                    where = f"input {i}" if len(items) > 1 else "the input"
                    raise TooLargeError(
                        f"{where} has {n} tokens; the sidecar audits at most {limit} tokens per input "
                        "(--max-tokens, AUDITOR_MAX_TOKENS)"
                    )
            results = await self.batcher.audit(
                items, engine, top_k=top_k, n_tokens=sum(counts), timeout_s=self.settings.request_timeout_s
            )
        except Exception as exc:
            self.count_failure(exc)  # counts the auditor's failures only, not a client's bad input
            raise
        if engine is not None:
            await self.record([r.verdict for r in results], items, engine, source=source, request_id=request_id)
        return results, engine

    def count_failure(self, exc: BaseException) -> None:
        """Count an audit that failed inside the auditor (``auditor_errors_total`` by kind);
        a client's error (a bad input, an unknown policy) is not counted."""
        if isinstance(exc, ServerError):
            if exc.type != "auditor_error" and exc.status < 500:
                return
            kind = _FAILURE_KINDS.get(exc.code, exc.code)
        elif isinstance(exc, AuditorError):
            return
        else:
            kind = "internal"
        self.metrics.auditor_errors.labels(kind=kind).inc()

    async def record(
        self,
        verdicts: Sequence[Verdict | None],
        items: Sequence[AuditInput],
        engine: PolicyEngine,
        *,
        source: str,
        request_id: str | None,
        count_verdicts: bool = True,
    ) -> None:
        """Count verdicts, write alerts for matched rules to the audit log and stream them.

        ``count_verdicts=False``: count the matched rules but not the verdicts (a streamed
        completion's chunks, whose one verdict is counted when the stream ends)."""
        from auditor.alerts import alerts_from_verdict

        alerts: list[Alert] = []
        for verdict, item in zip(verdicts, items):
            if verdict is None:
                continue
            if count_verdicts:
                self.metrics.observe_verdict(engine.name, verdict)
            else:
                self.metrics.observe_matches(engine.name, verdict.matches)
            if verdict.matches:
                alerts.extend(
                    alerts_from_verdict(
                        verdict,
                        policy_name=engine.name,
                        policy_hash=engine.hash,
                        source=source,  # type: ignore[arg-type]
                        text=audited_text(item, completion_only=True),
                        request_id=request_id or item.id,
                    )
                )
        if not alerts:
            return
        try:
            stored = await asyncio.get_running_loop().run_in_executor(self.prep, self.dispatcher.submit, alerts)
        except Exception:  # the log failing must not fail the audit; the verdict stands
            _log.exception("could not write %d alert(s) to the audit log", len(alerts))
            return
        self.metrics.alerts_logged.inc(len(stored))
        for alert in stored:
            self.alerts.publish(json.loads(alert.model_dump_json()))

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        if self.store is not None:
            self.store.stop()
        await self.batcher.stop()
        if self.http is not None:
            await self.http.aclose()
        self.prep.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(None, self.dispatcher.close, 5.0)


# transformers resolves its lazy imports without a lock, so two apps loading in
# one process (tests, benchmarks) must not import and load at the same time.
_LOAD_LOCK = threading.Lock()


def load_runtime(
    settings: Settings,
    metrics: AuditorMetrics,
    env: Mapping[str, str] | None = None,
    workers: ModelWorkers | None = None,
) -> Runtime:
    """Load model, SAE, library, policies and the alert pipeline (blocking; run it off the event loop).

    ``workers``: the model workers the batcher will use; call this on their worker 0, so that
    torch keeps one OpenMP pool for the loading thread and the first worker (see
    :class:`~auditor.workers.ModelWorkers`). They are configured here, once the model's
    device is known (``model_workers`` setting).
    """
    with _LOAD_LOCK:
        return _load_runtime(settings, metrics, env, workers)


def _load_runtime(
    settings: Settings, metrics: AuditorMetrics, env: Mapping[str, str] | None, workers: ModelWorkers | None
) -> Runtime:
    import torch

    from auditor.alerts import AlertDispatcher
    from auditor.features import load_library
    from auditor.models import load_model
    from auditor.pipeline import Auditor, check_fit, resolve_library
    from auditor.policy import PolicyStore
    from auditor.sae import load_sae

    from auditor.models.loading import parse_device

    parse_device(settings.device)  # before the SAE loads onto it
    store: PolicyStore | None = None
    paths = list(settings.policies)
    if not paths and default_policy_path().is_file():
        paths = [str(default_policy_path())]
    if paths:
        store = PolicyStore(paths, default=settings.default_policy)
        store.on_reload(lambda result: _on_reload(metrics, store, result))
        metrics.policy_reloads.labels(result="success").inc()
        metrics.policy_reload_ok.set(1)
        metrics.set_policy(store.hash, store.names, store.engines.values())
    else:
        _log.warning(NO_POLICY_NOTE)
        metrics.set_policy("", [])

    # The default policy first: without --library, its library is the one used.
    engines = [] if store is None else [store.current(), *(e for e in store.engines.values() if e is not store.current())]
    library = resolve_library(
        load_library(settings.library) if settings.library else None, engines, sae_given=settings.sae is not None
    )
    if settings.sae is not None:
        sae = load_sae(settings.sae, format=settings.sae_format, device=settings.device, dtype="float32")
        sae_name = sae_path = settings.sae
    elif library is not None:
        sae_path = str(library.resolve_path(library.sae.path or ""))
        sae = load_sae(sae_path, device=settings.device, dtype="float32")
        sae_name = library.sae.id
    else:  # pragma: no cover - the branches above always give one
        raise ConfigError("no SAE: pass --sae or --library")
    # The parts must fit before the model loads (Auditor checks the library again, with the model's name).
    if store is not None:
        # On a GPU, --compile also compiles the policies' evaluation (on a CPU it is slower compiled).
        compile_program = settings.compile and torch.device(settings.device).type == "cuda"
        admit = _admit(sae, library, settings.hookpoint, sae_path, settings.cuda_graphs, compile_program, settings.device)
        for engine in store.engines.values():
            admit(engine)
        store.check = admit  # a reload that no longer fits the SAE is refused, the old set stays
    check_fit(sae, library=library, hookpoint=settings.hookpoint, sae_name=sae_path)  # an explicit --library
    model = load_model(settings.model, device=settings.device, dtype=settings.dtype, compile=settings.compile)
    n_workers = settings.model_workers or auto_workers(torch.device(model.device).type, torch.get_num_threads())
    if workers is not None:
        workers.configure(n_workers)  # on its worker 0, this thread
    else:  # loaded on a caller's thread: leave its torch threads alone
        workers = ModelWorkers()
        workers.executor(0).submit(workers.configure, n_workers).result()
    _log.info(
        "model workers: %d x %s torch thread(s)", workers.n, workers.threads or torch.get_num_threads()
    )
    auditor = Auditor(
        model,
        sae,
        hookpoint=settings.hookpoint,
        library=library,
        max_tokens=settings.max_tokens,
        batch_tokens=settings.batch_max_tokens,
    )
    # Decide packing now (one small forward), not on the first request.
    _log.info("packed forwards: %s", "on" if auditor.pack else "off (the model's packed activations differ)")
    dispatcher = AlertDispatcher.from_config(settings.alerts_config(env), on_delivery=metrics.on_delivery)
    metrics.prime_sinks(dispatcher.sink_names)
    dispatcher.start()
    batcher = MicroBatcher(
        auditor,
        max_wait_ms=settings.batch_max_wait_ms,
        max_tokens=settings.batch_max_tokens,
        queue_size=settings.queue_size,
        metrics=metrics,
        workers=workers,
    )
    if store is not None and settings.policy_watch_s > 0:
        store.watch(settings.policy_watch_s)
    return Runtime(
        settings=settings,
        metrics=metrics,
        auditor=auditor,
        store=store,
        dispatcher=dispatcher,
        batcher=batcher,
        alerts=Broadcaster(),
        sae_name=sae_name,
    )


def _admit(
    sae: Any, library: Any, hookpoint: str | None, sae_path: str, cuda_graphs: bool, compile_program: bool | str = False,
    device: str = "cpu",
) -> Callable[[Any], None]:
    """A check that a policy engine fits the loaded SAE at the hookpoint the auditor reads
    (:func:`~auditor.pipeline.check_fit` with the auditor's ``library`` and ``hookpoint``, so an
    SAE file that names no hookpoint takes the library's, as the auditor does); an engine that
    passes takes the server's ``cuda_graphs`` setting and, on a GPU, ``compile`` (loaded and reloaded
    engines alike; a compiled engine compiles on ``device`` before it serves, not on the first audits)."""
    from auditor.pipeline import check_fit

    def check(engine: Any) -> None:
        check_fit(sae, library=library, policy=engine, hookpoint=hookpoint, sae_name=sae_path)
        engine.cuda_graphs, engine.compile_program = cuda_graphs, compile_program
        if compile_program:
            engine.warm_up(device)

    return check


def _on_reload(metrics: AuditorMetrics, store: PolicyStore | None, result: Any) -> None:
    metrics.policy_reloads.labels(result="success" if result.ok else "failure").inc()
    metrics.policy_reload_ok.set(1 if result.ok else 0)
    # An operator tailing the log sees an edit taken or refused, not only the metrics.
    if not result.ok:
        _log.warning(
            "policy reload refused, the previous set (%s) stays in service:\n  %s",
            result.hash[:12],
            "\n  ".join(e.message for e in result.errors),
        )
    elif result.changed:
        # The result's own policies: a later reload may have swapped another set in by now.
        _log.info("policies reloaded: %s (set %s)", ", ".join(result.names), result.hash[:12])

    if result.ok and store is not None:
        status = store.status()  # the set as of this reload or a later one, read once
        metrics.set_policy(status.hash, list(status.engines), status.engines.values())
