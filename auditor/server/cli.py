"""``auditor serve`` (the sidecar) and ``auditor alerts list|export`` (the durable audit log)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from auditor.errors import ConfigError
from auditor.models.loading import MODEL_DTYPES

__all__ = ["register", "run_serve", "run_alerts"]

_SEVERITIES = ("info", "low", "medium", "high", "critical")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the auditing sidecar (audit API, OpenAI-compatible proxy, metrics)",
        description=(
            "Serve the audit API, the OpenAI-compatible routes (proxied to --upstream or answered by "
            "the sidecar's own model), the LiteLLM guardrail route and Prometheus metrics. Settings "
            "come from flags, then AUDITOR_* environment variables, then --config FILE, then defaults."
        ),
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config file (keys are the setting names; env AUDITOR_CONFIG)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--model", help="model id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sae", help="SAE folder, file, hf:// URI or release id")
    p.add_argument("--sae-format", help="force the SAE format")
    p.add_argument("--library", help="feature library path or id")
    p.add_argument("--hookpoint", help="override the SAE's hookpoint")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, help="the model's dtype (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the model's decoder layers and, on a GPU, the policies' evaluation "
        "(for GPUs: faster audits, slower start and decoding)"
    )
    p.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="once loaded, exclude everything then alive from Python's garbage collections (gc.freeze; default on): "
        "full collections stop walking the model's objects, which paused the server for up to 0.3 s",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on a GPU, replay the steering hook's decode step while generating, and policy evaluations of "
        "recurring batch shapes, as CUDA graphs (default on)",
    )
    p.add_argument("--policy", dest="policies", action="append", metavar="PATH", help="policy file or folder (repeatable)")
    p.add_argument("--default-policy", help="policy used when a request names none")
    p.add_argument("--policy-watch", dest="policy_watch_s", type=float, metavar="SECONDS", help="reload policies on file change, polling this often")
    p.add_argument("--upstream", metavar="URL", help="OpenAI-compatible server to proxy to (vLLM, llama.cpp, ...)")
    p.add_argument("--stream-mode", choices=["hold", "chunked"], help="streaming: hold back and audit before release (default) or release audited chunks")
    p.add_argument("--stream-chunk-chars", type=int, help="characters per audited chunk in chunked stream mode")
    p.add_argument("--fail-mode", choices=["open", "closed"], help="when the auditor itself fails: let requests through (open) or answer 503 (closed, default)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (413 above)")
    p.add_argument("--max-tokens", type=int, help="most tokens per audited input (413 above)")
    p.add_argument(
        "--batch-max-wait-ms",
        type=float,
        help="longest wait for more requests to join a micro-batch (only while fewer have arrived than were in flight "
        "for the last batch; default 20)",
    )
    p.add_argument("--batch-max-tokens", type=int, help="most tokens per micro-batched forward")
    p.add_argument(
        "--model-workers",
        type=int,
        metavar="N",
        help="threads running audits and generation side by side on the one model, each with its share of the CPU "
        "threads (default 2 on a CPU with 2+ cores, 1 on a GPU)",
    )
    p.add_argument("--queue-size", type=int, help="audit requests that may wait (503 + Retry-After above)")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, metavar="SECONDS", help="longest an audit may take")
    p.add_argument("--max-generate-tokens", type=int, help="most tokens the sidecar's own model generates per request")
    p.add_argument("--auth-all-routes", action="store_true", default=None, help="require AUDITOR_API_TOKEN on every route (not only mutating ones)")
    p.add_argument("--data-dir", help="where the audit log lives")
    p.add_argument("--viewer-index", metavar="FILE", help="feature index for the /ui/ pages (default: beside the library)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    # Each setting's flag as spelt on the command line, for errors ("--policy-watch", not the setting's name).
    flag_names = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings and a.dest in _SERVE_FLAGS}
    p.set_defaults(func=run_serve, flag_names=flag_names)

    a = sub.add_parser("alerts", help="query or export the durable audit log")
    asub = a.add_subparsers(dest="alerts_command", metavar="COMMAND")
    asub.required = True
    for name, helptext in (("list", "print matching alerts, newest first"), ("export", "write matching alerts as JSON lines")):
        q = asub.add_parser(name, help=helptext)
        q.add_argument("--log", metavar="FILE", help="audit log file (default: the server's, from --config / AUDITOR_* settings)")
        q.add_argument("--config", metavar="FILE.yaml", help="sidecar config file to read the log path from")
        q.add_argument("--since", help="ISO time or a duration ago: 15m, 2h, 7d")
        q.add_argument("--until", help="ISO time (exclusive)")
        q.add_argument("--rule", dest="rule_id", action="append", help="rule id (repeatable)")
        q.add_argument("--severity", action="append", choices=_SEVERITIES, help="exact severity (repeatable)")
        q.add_argument("--min-severity", choices=_SEVERITIES, help="this severity or worse")
        q.add_argument("--category", action="append", help="category (repeatable)")
        q.add_argument("--request-id", help="the audited request's id")
        if name == "list":
            q.add_argument("--limit", type=int, default=50, help="most alerts shown (default 50)")
            q.add_argument("--json", action="store_true", help="print one JSON object per line")
        else:
            q.add_argument("--output", "-o", default="-", metavar="FILE.jsonl", help="output file (default stdout)")
        q.set_defaults(func=run_alerts)
    pr = asub.add_parser(
        "prune", help="delete old alerts (never ones still pending delivery); the server can do it itself: retention_days"
    )
    pr.add_argument("--log", metavar="FILE", help="audit log file (default: the server's, from --config / AUDITOR_* settings)")
    pr.add_argument("--config", metavar="FILE.yaml", help="sidecar config file to read the log path from")
    pr.add_argument("--older-than", help="delete alerts created before this: a duration ago (30d, 12h) or an ISO time")
    pr.add_argument("--keep-last", type=int, metavar="N", help="keep only the newest N alerts")
    pr.set_defaults(func=run_alerts)


_SERVE_FLAGS = (
    "host port model sae sae_format library hookpoint device dtype compile cuda_graphs gc_freeze policies default_policy policy_watch_s upstream "
    "stream_mode stream_chunk_chars fail_mode max_body_bytes max_tokens batch_max_wait_ms batch_max_tokens model_workers "
    "queue_size request_timeout_s max_generate_tokens auth_all_routes data_dir viewer_index log_level"
).split()


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from auditor.server.app import create_app
    from auditor.server.background import AuditorServer
    from auditor.server.settings import Settings

    flags = {name: getattr(args, name, None) for name in _SERVE_FLAGS}
    settings = Settings.load(flags=flags, env=os.environ, config_file=args.config, flag_names=args.flag_names)
    from auditor.models.loading import parse_device

    parse_device(settings.device)  # a GPU this host lacks fails now, not after the server starts
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    def on_ready(runtime: Any) -> None:
        if settings.gc_freeze:
            _freeze_loaded(runtime, thaw_on_reload=settings.compile)

    app = create_app(settings, env=os.environ, on_load_error=on_load_error, on_ready=on_ready)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    server = AuditorServer(config)
    server.run()
    if failed:
        exc = failed[0]
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def _freeze_loaded(runtime: Any, *, thaw_on_reload: bool) -> None:
    """Move what loading left alive into Python's permanent generation (``gc.freeze``), which
    full collections skip; this process is the sidecar's own.

    The policies loaded then are frozen with the rest, and a reload replaces them. Frozen objects
    are never collected as cycles, but a policy engine is no cycle: once a reload drops the last
    reference to the one it replaced, it is freed, device memory included (its graph cache refers
    back to it weakly). A compiled program (``--compile``) does refer back to its engine, so with
    ``thaw_on_reload`` the first successful reload unfreezes the heap: the engines it replaced go
    with the next full collection, which from then on walks the model's objects again.
    """
    import gc

    gc.collect()
    gc.freeze()
    store = getattr(runtime, "store", None)
    if store is not None and thaw_on_reload:

        def thaw(result: Any) -> None:
            if result.ok and gc.get_freeze_count():
                gc.unfreeze()

        store.on_reload(thaw)


def _parse_time(value: str | None, flag: str, now: datetime | None = None) -> datetime | None:
    if value is None:
        return None
    from auditor.alerts.log import parse_time

    try:
        return parse_time(value, now=now)
    except ValueError as exc:
        raise ConfigError(f"{flag} {exc}") from None


def run_alerts(args: argparse.Namespace) -> int:
    from auditor.alerts import AuditLog
    from auditor.alerts.log import check_time_range
    from auditor.server.settings import Settings

    if args.log:
        path = Path(args.log)
    else:
        settings = Settings.load(env=os.environ, config_file=args.config)
        path = settings.alerts_config(os.environ).log_path
    if not path.is_file():
        raise ConfigError(f"{path}: no audit log there (pass --log FILE, or --config of the server that wrote it)")
    if args.alerts_command == "prune":
        if args.older_than is None and args.keep_last is None:
            raise ConfigError("alerts prune needs --older-than (e.g. 30d) and/or --keep-last N")
        if args.keep_last is not None and args.keep_last < 0:
            raise ConfigError(f"--keep-last must be >= 0, got {args.keep_last}")
        cutoff = _parse_time(args.older_than, "--older-than")
        with AuditLog(path) as log:
            before = log.count()
            deleted = log.prune(older_than=cutoff, keep_last=args.keep_last)
        print(f"deleted {deleted} of {before} alert(s) from {path}")
        return 0
    now = datetime.now(timezone.utc)  # one "now" for both: --since 1h --until 1h is an empty range, not a reversed one
    filters: dict[str, Any] = {
        "since": _parse_time(args.since, "--since", now),
        "until": _parse_time(args.until, "--until", now),
        "rule_id": args.rule_id,
        "severity": args.severity,
        "min_severity": args.min_severity,
        "category": args.category,
        "request_id": args.request_id,
    }
    check_time_range(filters["since"], filters["until"], names=("--since", "--until"))  # before the log opens
    out = None
    if args.alerts_command == "export" and args.output != "-":
        from auditor._output import output_file

        out = output_file(args.output)  # before the log is opened
    with AuditLog(path) as log:
        if args.alerts_command == "export":
            if out is None:
                n = log.export_jsonl(sys.stdout, **filters)
            else:
                try:
                    n = log.export_jsonl(out, **filters)
                except OSError as exc:
                    raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
            print(f"exported {n} alert(s)", file=sys.stderr)
            return 0
        if args.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {args.limit}")
        for alert in log.query(**filters, limit=args.limit, descending=True):
            if args.json:
                print(alert.model_dump_json())
            else:
                when = alert.created_at.strftime("%Y-%m-%d %H:%M:%S")
                print(f"{when}  {alert.severity:<8} {alert.rule_id:<28} {alert.action:<5} score={alert.score:.2f}  {alert.policy_name}")
    return 0
