"""``auditor generate`` (steered generation, side by side with the default) and ``auditor export-control-vector``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import textwrap
from typing import Any, TextIO

from auditor.errors import ConfigError, SteeringError

__all__ = ["register", "run_generate", "run_export"]


def _limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-abs-value", type=float, default=200.0, help="largest |value| for clamp and add (default 200)")
    p.add_argument("--min-scale", type=float, default=-10.0, help="smallest scale factor (default -10)")
    p.add_argument("--max-scale", type=float, default=10.0, help="largest scale factor (default 10)")
    p.add_argument("--max-interventions", type=int, default=16, help="most interventions per request (default 16)")


def _sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", metavar="PATH", help="SAE folder, file, hf:// URI or release id (default: the library's SAE)")
    p.add_argument("--library", metavar="PATH|ID", help="feature library that names the SAE's latents")
    p.add_argument("--hookpoint", metavar="NAME", help="override the SAE's hookpoint")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    g = sub.add_parser(
        "generate",
        help="generate a completion while steering SAE features, optionally next to the default one",
        description=(
            "Generate with the auditor's model, applying interventions at the SAE hookpoint on every "
            "position (KV cache on). --steer takes NAME=MODE:VALUE[@active|@all] with MODE clamp, scale "
            "or add; NAME is a library feature name or a latent index (1234 or #1234). With --compare "
            "the default completion is generated alongside and both are printed with the steered "
            "features' activation per token."
        ),
    )
    g.add_argument("prompt", help="the user message (or, with --raw, the text to continue)")
    g.add_argument("--steer", action="append", default=[], metavar="SPEC", help="an intervention, e.g. deception.pretend_to_be=clamp:0 (repeatable)")
    g.add_argument("--compare", action="store_true", help="also generate without steering and print both side by side")
    g.add_argument("--raw", action="store_true", help="continue PROMPT as plain text instead of a chat user message")
    g.add_argument("--system", metavar="TEXT", help="system message for the chat (default: the template's own)")
    g.add_argument("--max-tokens", type=int, default=40, help="new tokens at most (default 40)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--policy", metavar="FILE", help="policy YAML; its steer actions switch on when their rule fires")
    g.add_argument("--model", metavar="NAME|PATH", help="model id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    _sae_args(g)
    _limit_args(g)
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.set_defaults(func=run_generate)

    e = sub.add_parser(
        "export-control-vector",
        help="write additive steering as a llama.cpp control-vector GGUF file",
        description=(
            "Write sum(c * W_dec[i]) (in the model's activation units) as a llama.cpp control vector "
            "(direction.N for the SAE's layer), so llama.cpp servers can apply the steering with "
            "--control-vector FILE without the sidecar in the forward path. Only add is a fixed vector."
        ),
    )
    e.add_argument("--steer", action="append", required=True, metavar="NAME=add:C", help="feature and coefficient (repeatable)")
    e.add_argument("--output", "-o", required=True, metavar="FILE.gguf", help="where to write the GGUF file")
    e.add_argument("--model-hint", metavar="TEXT", help="controlvector.model_hint (default: the SAE's model name)")
    e.add_argument(
        "--model", metavar="NAME|PATH",
        help="the model llama.cpp will steer, whose layer count and width the SAE's hookpoint must fit: a .gguf file, "
        "a folder or a Hub id; only its configuration is read (default: embedded SmolLM2-135M-Instruct; env AUDITOR_MODEL)",
    )
    _sae_args(e)
    _limit_args(e)
    e.set_defaults(func=run_export)


def _limits(args: argparse.Namespace) -> Any:
    from auditor.steering.interventions import SteeringLimits

    return SteeringLimits(
        max_abs_value=args.max_abs_value,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        max_interventions=args.max_interventions,
    )


def run_generate(args: argparse.Namespace) -> int:
    from auditor.models import parse_device
    from auditor.pipeline import Auditor
    from auditor.steering.generate import generate
    from auditor.text import AuditInput

    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    parse_device(args.device)
    limits = _limits(args)
    if args.raw:
        item = AuditInput(prompt=args.prompt)
    else:
        msgs = ({"role": "system", "content": args.system},) if args.system else ()
        item = AuditInput(messages=(*msgs, {"role": "user", "content": args.prompt}))
    auditor = Auditor.load(
        model=args.model, sae=args.sae, library=args.library, policy=args.policy, hookpoint=args.hookpoint, device=args.device
    )
    result = generate(
        auditor,
        item,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        interventions=args.steer,
        compare=args.compare,
        stop=args.stop,
        limits=limits,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result_to_json(result)))
    else:
        print_result(result, sys.stdout, compare=args.compare)
    return 0


def result_to_json(result: Any) -> dict[str, Any]:
    """The JSON shape of a :class:`GenerationResult` (the CLI's ``--json``; the server may reuse it)."""
    from auditor._cli_audit import verdict_to_json

    data: dict[str, Any] = {
        "text": result.text,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "steered": result.steered,
        "interventions": result.interventions,
        "feature_traces": result.feature_traces,
        "steered_traces": result.steered_traces,
        "triggered": [dataclasses.asdict(t) for t in result.triggered],
        "prompt_tokens": result.prompt_tokens,
    }
    if result.default_text is not None:
        data.update(
            {
                "default_text": result.default_text,
                "default_tokens": result.default_tokens,
                "default_traces": result.default_traces,
                "default_finish_reason": result.default_finish_reason,
            }
        )
    if result.verdict is not None:
        data["verdict"] = verdict_to_json(result.verdict)
    return data


def _columns(left: str, right: str, width: int) -> list[str]:
    lines_l = [w for para in left.splitlines() or [""] for w in (textwrap.wrap(para, width) or [""])]
    lines_r = [w for para in right.splitlines() or [""] for w in (textwrap.wrap(para, width) or [""])]
    n = max(len(lines_l), len(lines_r))
    lines_l += [""] * (n - len(lines_l))
    lines_r += [""] * (n - len(lines_r))
    return [f"{a:<{width}} | {b}" for a, b in zip(lines_l, lines_r)]


def print_result(result: Any, out: TextIO, *, compare: bool) -> None:
    """Human output: the completion(s), then each steered feature's activation per token."""
    total = max(60, min(shutil.get_terminal_size((120, 24)).columns, 160))
    steer_desc = ", ".join(result.interventions) or "no requested interventions"
    if compare:
        col = (total - 3) // 2
        print(*_columns(f"STEERED ({steer_desc})", "DEFAULT", col), sep="\n", file=out)
        print("-" * col + "-+-" + "-" * col, file=out)
        print(*_columns(result.text, result.default_text or "", col), sep="\n", file=out)
    else:
        print(f"STEERED ({steer_desc})", file=out)
        print(result.text, file=out)
    print(f"[finish: {result.finish_reason}" + (f" / default: {result.default_finish_reason}" if compare else "") + "]", file=out)
    for t in result.triggered:
        print(f"policy rule {t.rule_id} switched on {', '.join(t.interventions)} at completion token {t.token}", file=out)
    if result.verdict is not None:
        print(f"verdict: {result.verdict.action} ({', '.join(m.rule_id for m in result.verdict.matches) or 'no rule matched'})", file=out)
    if not result.feature_traces:
        return
    names = list(result.feature_traces)
    print("\nactivation per token (measured -> after steering)" + (" | default" if compare else ""), file=out)
    n = max(len(result.tokens), len(result.default_tokens or []) if compare else 0)
    for i in range(n):
        cells = []
        tok = result.tokens[i] if i < len(result.tokens) else ""
        for name in names:
            tr, st = result.feature_traces[name], result.steered_traces[name]
            cells.append(f"{name} {tr[i]:7.2f} -> {st[i]:7.2f}" if i < len(tr) else " " * (len(name) + 19))
        line = f"{i:4d} {tok!r:>14}  " + "  ".join(cells)
        if compare and result.default_tokens is not None and result.default_traces is not None:
            dtok = result.default_tokens[i] if i < len(result.default_tokens) else ""
            dvals = "  ".join(
                f"{result.default_traces[name][i]:7.2f}" if i < len(result.default_traces[name]) else "       "
                for name in names
            )
            line += f"  | {dtok!r:>14}  {dvals}"
        print(line, file=out)


def run_export(args: argparse.Namespace) -> int:
    from auditor._output import check_output_file
    from auditor.features import load_library
    from auditor.models import check_sae_compatible, model_shape
    from auditor.pipeline import _default_library, check_fit
    from auditor.sae import load_sae
    from auditor.steering.control_vector import control_vector, write_control_vector
    from auditor.steering.interventions import resolve_interventions

    check_output_file(args.output)  # before loading the SAE
    lib = load_library(args.library) if args.library else (None if args.sae else _default_library())
    if args.sae:
        sae_name = args.sae
    elif lib is None or lib.sae.path is None:
        raise ConfigError("no SAE given, and the library does not say where its SAE is (no sae.path); pass --sae PATH")
    else:
        sae_name = str(lib.resolve_path(lib.sae.path))
    sae = load_sae(sae_name)
    hookpoint = check_fit(sae, library=lib, hookpoint=args.hookpoint, sae_name=sae_name)
    # The layer must exist in the model the file is for (direction.N of a missing layer is silently useless).
    check_sae_compatible(model_shape(args.model), sae.cfg.d_in, hookpoint)
    slots = resolve_interventions(args.steer, library=lib, d_sae=sae.cfg.d_sae, limits=_limits(args))
    wrong = [s for s in slots if s.mode != "add" or s.positions != "all"]
    if wrong:
        raise SteeringError(
            f"{wrong[0].label}={wrong[0].mode}: a control vector is a fixed addition on every token; "
            "only NAME=add:C (on all positions) can be exported, clamp and scale need the sidecar"
        )
    cv = control_vector(sae, [(s.index, s.value) for s in slots], hookpoint=hookpoint, model_hint=args.model_hint)
    path = write_control_vector(cv, args.output)
    [(layer, vec)] = cv.directions.items()
    print(
        f"wrote {path}: direction.{layer} ({vec.shape[0]} values, norm {float((vec.astype('float64') ** 2).sum() ** 0.5):.4g}) "
        f"for {', '.join(f'{s.label}={s.value:g}' for s in slots)}; use: llama-server --control-vector {path}"
    )
    return 0
