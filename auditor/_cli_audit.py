"""``auditor audit``: features per token (and policy verdicts) for texts, chats and JSONL files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from auditor.errors import ConfigError
from auditor.models.loading import MODEL_DTYPES, parse_device
from auditor.text import AuditInput, audited_text, parse_input

__all__ = ["register", "result_to_json"]

#: Inputs audited per call of Auditor.run when reading a file: bounds memory
#: while leaving the pipeline room to bucket by length.
_CHUNK = 64


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "audit",
        help="show SAE features per token and policy verdicts for a text or a JSONL file",
        description=(
            "Run the model to the SAE hookpoint, encode every content token with the SAE and print "
            "its strongest features (named where the feature library labels them); with --policy, "
            "evaluate the policy and print the verdict."
        ),
    )
    p.add_argument("text", nargs="?", help="the text to audit (or use --input)")
    p.add_argument("--input", metavar="FILE.jsonl", help='one JSON object per line: {"text"} | {"messages"} | {"prompt","completion"}; "-" reads stdin')
    p.add_argument("--chat", action="store_true", help="treat TEXT as a user message and apply the chat template")
    p.add_argument("--json", action="store_true", help="print JSON (one line per input)")
    p.add_argument(
        "--policy", metavar="FILE",
        help="policy YAML to evaluate (its library names the SAE); default: policies/default.yaml "
        "when neither --sae nor --library is given",
    )
    p.add_argument("--no-policy", action="store_true", help="features only, no policy evaluation")
    p.add_argument("--sae", metavar="PATH", help="SAE folder, file, hf:// URI or release id (default: the default library's SAE)")
    p.add_argument("--format", dest="sae_format", metavar="NAME", help="force the SAE format instead of detecting it")
    p.add_argument(
        "--library",
        metavar="PATH|ID",
        help="feature library that names the SAE's latents (with --policy: it must describe the policy's SAE)",
    )
    p.add_argument("--model", metavar="NAME|PATH", help="model id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct; env AUDITOR_MODEL)")
    p.add_argument("--hookpoint", metavar="NAME", help="override the SAE's hookpoint, e.g. blocks.15.hook_resid_post")
    p.add_argument("--top-k", type=int, default=5, help="features shown per token (0: none; default 5)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens kept per input (longer inputs are cut and flagged)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--dtype",
        choices=MODEL_DTYPES,
        help="the model's dtype (default float32 on the CPU, bfloat16 on a GPU); bfloat16 on a CPU with AMX is "
        "much faster, with verdicts that can differ near thresholds (benchmarks/dtype_agreement.py)",
    )
    alerts = p.add_argument_group("alerts (with --policy)")
    alerts.add_argument("--audit-log", metavar="PATH", help="write every alert to this SQLite audit log before printing it")
    alerts.add_argument(
        "--alerts-config", metavar="FILE.yaml",
        help="alerts configuration (log_path, text_mode, cooldown_s, sinks: webhook / alertmanager); "
        "alerts are logged, then delivered before the command exits",
    )
    p.set_defaults(func=run_audit)


def _read_inputs(path: str, stream: TextIO | None = None) -> list[AuditInput]:
    """Parse every line first so a bad line stops the run before any work, with its line number."""
    handle: TextIO
    if path == "-":
        handle = stream or sys.stdin
        lines = handle.read().splitlines()
        where = "<stdin>"
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{path}: no such file (--input expects a JSONL file, one JSON object per line)")
        lines = file.read_text(encoding="utf-8").splitlines()
        where = path
    items: list[AuditInput] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        item = parse_input(obj, where=f"{where}:{n}")
        if item.id is None:
            item = dataclasses.replace(item, id=str(n))
        items.append(item)
    if not items:
        raise ConfigError(f"{where}: no inputs (expected one JSON object per line)")
    return items


def _chunks(items: list[AuditInput], size: int) -> Iterator[list[AuditInput]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def result_to_json(result: Any, *, model: str, sae: str, top_k: int) -> dict[str, Any]:
    """The JSON shape of one audit result (CLI ``--json`` and the server share it)."""
    out: dict[str, Any] = {"id": result.id, "model": model, "sae": sae}
    if top_k > 0:
        out["tokens"] = [
            {
                "token": tf.token,
                "position": tf.position,
                "features": [
                    {"index": i, "activation": round(a, 4), "name": n}
                    for i, a, n in zip(tf.indices, tf.activations, tf.names)
                ],
            }
            for tf in result.top_features
        ]
    out["n_tokens"] = result.n_content_tokens
    out["truncated"] = result.truncated
    if result.verdict is not None:
        out.update(verdict_to_json(result.verdict))
    return out


def verdict_to_json(verdict: Any) -> dict[str, Any]:
    data = verdict.to_dict()
    return {
        "verdict": data.pop("action"),
        "matches": data.pop("matches"),
        "scores": data.pop("scores"),
        "category_scores": data.pop("category_scores"),
        **data,
    }


def _alerts_config(args: argparse.Namespace) -> Any:
    """The alerts configuration the flags ask for, or None."""
    if args.audit_log is None and args.alerts_config is None:
        return None
    if args.policy is None:
        raise ConfigError("--audit-log and --alerts-config need --policy (alerts come from policy rules)")
    from auditor.alerts import AlertsConfig, load_alerts_config

    if args.audit_log is not None:  # a path given on the command line is from the current folder
        config = load_alerts_config(args.alerts_config) if args.alerts_config is not None else AlertsConfig()
        return config.model_copy(update={"log_path": Path(args.audit_log)})
    config = load_alerts_config(args.alerts_config)
    if not config.log_path.is_absolute():
        # A relative log_path in a configuration file lies under the data folder, as for the
        # sidecar, so `auditor alerts list --config FILE` finds the log this audit writes.
        import os

        from auditor.server.settings import Settings

        data_dir = Settings.load(env=os.environ).resolved_data_dir(os.environ)
        config = config.model_copy(update={"log_path": data_dir / config.log_path})
    return config


def _print_human(result: Any, out: TextIO, *, top_k: int) -> None:
    if result.id is not None:
        print(f"== {result.id}", file=out)
    for tf in result.top_features:
        feats = "  ".join(
            f"{n or '#' + str(i)}={a:.2f}" for i, a, n in zip(tf.indices, tf.activations, tf.names)
        )
        print(f"{tf.position:5d} {tf.token!r:>18}  {feats}", file=out)
    if result.truncated:
        print("(input truncated at --max-tokens)", file=out)
    v = result.verdict
    if v is not None:
        print(f"verdict: {v.action}", file=out)
        for m in v.matches:
            drivers = ", ".join(
                f"{e.name} {e.agg}={e.value:.3g} (threshold {e.threshold:.3g})" for e in m.explanation if e.fired
            )
            print(f"  [{m.severity}] {m.rule_id} score={m.score:.2f}: {drivers}", file=out)
        cats = ", ".join(f"{c}={s:.2f}" for c, s in sorted(v.category_scores.items()))
        if cats:
            print(f"category scores: {cats}", file=out)


def run_audit(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.input is None):
        raise ConfigError("give either a TEXT argument or --input FILE.jsonl (not both, not neither)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0, got {args.top_k}")
    parse_device(args.device)  # before the inputs are read and anything loads
    if args.input is not None:
        items = _read_inputs(args.input)
    elif args.chat:
        items = [AuditInput(messages=({"role": "user", "content": args.text},))]
    else:
        items = [AuditInput(text=args.text)]

    from auditor.pipeline import Auditor, default_policy_path

    if args.no_policy and args.policy:
        raise ConfigError("--policy and --no-policy exclude each other")
    no_policy_note = None
    if args.policy is None and not args.no_policy and default_policy_path().is_file():
        if args.sae is None and args.library is None:
            # The embedded default comes with its policy: audit means verdicts too.
            args.policy = str(default_policy_path())
        else:
            # The default policy reads the shipped SAE's latents by its library's names; applied to
            # another SAE or library it would read unrelated latents, so it is left out, and said so.
            given = " and ".join(f"--{flag}" for flag in ("sae", "library") if getattr(args, flag) is not None)
            no_policy_note = (
                f"note: no policy applied, so no verdict: the default policy ({default_policy_path().name}) is for the "
                f"shipped SAE and is used only without --sae and --library (given: {given}); pass --policy FILE "
                "with a policy whose library describes this SAE, or --no-policy for features only"
            )
    alerts_cfg = _alerts_config(args)
    sae_arg = args.sae
    auditor = Auditor.load(
        model=args.model,
        sae=sae_arg,
        sae_format=args.sae_format,
        library=args.library,
        policy=args.policy,
        hookpoint=args.hookpoint,
        device=args.device,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
    )
    if no_policy_note is not None:  # once the parts loaded: an error about them comes alone
        print(no_policy_note, file=sys.stderr)
    model_name = auditor.model.name
    sae_name = sae_arg or (auditor.library.sae.id if auditor.library is not None else "sae")

    if not args.json and args.top_k > 0:
        print(
            f"# {model_name} | SAE {sae_name} at {auditor.hookpoint} | "
            f"top {args.top_k} features per token (library name or #index = activation)",
            file=sys.stdout,
        )
    dispatcher = None
    if alerts_cfg is not None:
        from auditor.alerts import AlertDispatcher

        dispatcher = AlertDispatcher.from_config(alerts_cfg)
        dispatcher.start()

    progress = None
    if args.input is not None:
        from tqdm import tqdm

        progress = tqdm(total=len(items), unit="text", file=sys.stderr, disable=None)
    out = sys.stdout
    try:
        for chunk in _chunks(items, _CHUNK):
            for item, res in zip(chunk, auditor.run(chunk, top_k=args.top_k)):
                if dispatcher is not None and res.verdict is not None and auditor.policy is not None:
                    from auditor.alerts import alerts_from_verdict

                    # Logged (durably) before the verdict is printed.
                    dispatcher.submit(
                        alerts_from_verdict(
                            res.verdict,
                            policy_name=auditor.policy.name,
                            policy_hash=auditor.policy.hash,
                            text=audited_text(item),
                            request_id=res.id,
                        )
                    )
                if args.json:
                    out.write(json.dumps(result_to_json(res, model=model_name, sae=sae_name, top_k=args.top_k)) + "\n")
                else:
                    _print_human(res, out, top_k=args.top_k)
            out.flush()
            if progress is not None:
                progress.update(len(chunk))
    finally:
        if progress is not None:
            progress.close()
        if dispatcher is not None and not dispatcher.close(timeout=30.0):
            print("warning: some alerts were not delivered yet; they stay pending in the audit log", file=sys.stderr)
    return 0

