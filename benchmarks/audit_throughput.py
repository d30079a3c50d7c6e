"""Benchmark: shadow-audit throughput against the model's plain full forward, same texts, same process.

For each batch size, the same chunks of texts (from ``datasets/safety-v1``) go through:

1. ``full_forward``: the plain ``*ForCausalLM`` forward with the LM head (what the watched
   model itself costs to read the text);
2. ``stopped_forward``: the forward stopped after the SAE's hooked layer, no LM head;
3. ``audit``: ``Auditor.run`` end to end (tokenize, stopped forward with the texts packed into
   shared rows when the model passes the packing check, watch-list encode, policy evaluation),
   with its per-stage breakdown from ``Auditor.last_timings`` (each stage's best over the timed calls);
   and again with the policy evaluated by its torch program throughout (``PolicyEngine.host_program``
   off; on a CPU it otherwise goes through its host twin, in C where the kernel library builds) and
   by the host twin's NumPy program (``HostProgram.native`` off), timed in the same rounds;
4. encode variants on the captured activations: watch-list vs full-width encode of the
   loaded SAE (the default is TopK, whose watch-list encode *is* a full encode because top-k
   ranks every latent) and of a random ReLU (``standard``) and JumpReLU SAE of the same
   width, where the watch-list encode multiplies only the watched ``W_enc`` columns.

Prints one JSON object and a summary table. Each measurement is timed after an untimed pass.

    PYTHONPATH=. python benchmarks/audit_throughput.py [--texts 64] [--batch-sizes 1,8,32]
        [--policy policies/default.yaml] [--threads N] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.models import capture, skinny  # noqa: E402
from auditor.pipeline import Auditor  # noqa: E402
from auditor.policy import AuditBatch  # noqa: E402
from auditor.sae import SAE, SAEConfig  # noqa: E402
from auditor.text import AuditInput, TokenBatch, role_masks, tokenize_batch  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.timing import best_time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_texts(n: int) -> list[str]:
    """``n`` texts interleaved across the safety-v1 files (deterministic)."""
    per_file = [
        [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
        for p in sorted((REPO / "datasets" / "safety-v1").glob("*.jsonl"))
    ]
    out: list[str] = []
    i = 0
    while len(out) < n:
        for texts in per_file:
            if i < len(texts) and len(out) < n:
                out.append(texts[i])
        i += 1
    return out


def random_sae(architecture: str, d_in: int, d_sae: int, hookpoint: str, seed: int = 0) -> SAE:
    """A random SAE (unit encoder columns, negative bias so each token fires a subset)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_sae, generator=gen)
    w = w / w.norm(dim=0, keepdim=True)
    tensors = {
        "W_enc": w,
        "b_enc": -torch.rand(d_sae, generator=gen) * 2.0,
        "W_dec": w.T.contiguous(),
        "b_dec": torch.zeros(d_in),
    }
    if architecture == "jumprelu":
        tensors["threshold"] = torch.full((d_sae,), 0.5)
    cfg = SAEConfig(
        architecture=architecture,  # type: ignore[arg-type]
        d_in=d_in,
        d_sae=d_sae,
        metadata={"hook_name": hookpoint, "model_name": "bench"},
    )
    return SAE.from_tensors(cfg, tensors)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Best-of-``repeats`` seconds for ``fn`` after one untimed call (on the CPU)."""
    return best_time(fn, torch.device("cpu"), repeats)


def round_robin(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Best-of-``repeats`` seconds for each of ``fns``, run in turn so that load from
    other processes on a shared machine falls on all of them alike."""
    return [min(times) for times in timing.round_robin(fns, torch.device("cpu"), repeats)]


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--policy", default=str(REPO / "policies" / "default.yaml"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--batch-tokens",
        default="256,512,1024,2048,8192",
        help="token budgets per forward to try for Auditor.run over all texts at once ('' to skip)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    auditor = Auditor.load(policy=args.policy)
    engine = auditor.policy
    assert engine is not None  # benchmark setup, not user input: --policy is always set
    model = auditor.model.model
    tok = auditor.model.tokenizer
    texts = load_texts(args.texts)
    items = [AuditInput(text=t) for t in texts]
    d_in, d_sae = auditor.sae.cfg.d_in, auditor.sae.cfg.d_sae
    saes = {
        f"loaded ({auditor.sae.cfg.architecture})": auditor.sae,
        "random standard (ReLU)": random_sae("standard", d_in, d_sae, auditor.hookpoint),
        "random jumprelu": random_sae("jumprelu", d_in, d_sae, auditor.hookpoint, seed=1),
    }
    watched = engine.watched
    # Each chunk below is one forward of exactly ``batch_size`` rows, whatever the default budget.
    default_budget = auditor.batch_tokens
    auditor.batch_tokens = 1 << 30

    rows: list[dict[str, Any]] = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        # Same chunks for every variant; sorting by length keeps padding equal for all of them.
        order = sorted(range(len(items)), key=lambda i: len(texts[i]))
        groups = chunks([items[i] for i in order], bs)
        batches: list[TokenBatch] = [tokenize_batch(tok, g, max_tokens=auditor.max_tokens) for g in groups]
        n_tokens = sum(int(b.lengths.sum()) for b in batches)
        n_content = sum(b.n_content_tokens for b in batches)

        def full_forward() -> None:
            with torch.inference_mode():
                for b in batches:
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

        def stopped_forward() -> None:
            for b in batches:
                capture(model, b.input_ids, b.attention_mask, [auditor.hookpoint], stop_early=True)

        stage_runs: list[dict[str, float]] = []  # per audit() call: each stage's total over the chunks
        torch_stage_runs: list[dict[str, float]] = []  # the same with the torch evaluation program
        numpy_stage_runs: list[dict[str, float]] = []  # the same with the host program's NumPy twin

        def audit(host_program: bool = True, runs: list[dict[str, float]] = stage_runs, native: bool = True) -> None:
            totals: dict[str, float] = {}
            engine.host_program, engine._numpy.native = host_program, native
            try:
                for g in groups:
                    auditor.run(g)
                    for k, v in auditor.last_timings.as_dict().items():
                        totals[k] = totals.get(k, 0.0) + v
            finally:
                engine.host_program, engine._numpy.native = True, True
            runs.append(totals)

        def audit_torch_eval() -> None:
            # The policy evaluated by its torch program at every batch size (PolicyEngine.host_program
            # off): what the host twin saves, in the same run.
            audit(False, torch_stage_runs)

        def audit_numpy_eval() -> None:
            # The host program in NumPy (up to its size limit; torch's past it), not its C twin.
            audit(True, numpy_stage_runs, native=False)

        products_stage_runs: list[dict[str, float]] = []  # the same with torch's products in every forward

        def audit_torch_products() -> None:
            # The forwards without the few-row kernel (auditor.models.skinny): what it saves, in the same run.
            with skinny.suspended():
                audit(True, products_stage_runs)

        t_full, t_stop, t_audit, t_audit_torch, t_audit_numpy, t_audit_products = round_robin(
            [full_forward, stopped_forward, audit, audit_torch_eval, audit_numpy_eval, audit_torch_products], args.repeats
        )
        # Each stage's best over the timed calls (the first call is the untimed warm-up), like
        # every other time here: load from other processes lands on one call's stages, not all.
        stage_totals = {k: min(run[k] for run in stage_runs[1:]) for k in stage_runs[-1]}
        torch_stage_totals = {k: min(run[k] for run in torch_stage_runs[1:]) for k in torch_stage_runs[-1]}
        numpy_stage_totals = {k: min(run[k] for run in numpy_stage_runs[1:]) for k in numpy_stage_runs[-1]}
        products_stage_totals = {k: min(run[k] for run in products_stage_runs[1:]) for k in products_stage_runs[-1]}

        acts = [auditor.activations(b) for b in batches]
        xs = [a[b.content_mask] for a, b in zip(acts, batches)]  # [N, d_in] per batch

        encode: dict[str, dict[str, float]] = {}
        for name, sae in saes.items():
            with torch.inference_mode():
                t_watch = timed(lambda s=sae: [s.encode(x, features=watched) for x in xs], args.repeats)
                t_all = timed(lambda s=sae: [s.encode(x) for x in xs], args.repeats)
            encode[name] = {"watch_list_s": t_watch, "full_s": t_all}

        feats = []
        with torch.inference_mode():
            for a, b, x in zip(acts, batches, xs):
                f = a.new_zeros((*b.content_mask.shape, watched.numel()))
                f[b.content_mask] = auditor.sae.encode(x, features=watched)
                recon = None
                if engine.needs_recon_error:
                    recon = a.new_zeros(b.content_mask.shape)
                    recon[b.content_mask] = auditor.sae.reconstruction_error(x)
                feats.append((a, b, f, recon))

        def evaluate() -> None:
            with torch.inference_mode():
                for a, b, f, recon in feats:
                    is_completion, is_prompt = role_masks(b.role)
                    engine.evaluate(
                        AuditBatch(
                            features=f,
                            mask=b.content_mask,
                            is_completion=is_completion,
                            is_prompt=is_prompt,
                            recon_error=recon,
                            resid=a if engine.needs_resid else None,
                            tokens=b.tokens,
                        )
                    )

        t_eval = timed(evaluate, args.repeats)
        engine.host_program = False
        try:
            t_eval_torch = timed(evaluate, args.repeats)
        finally:
            engine.host_program = True
        engine._numpy.native = False
        try:
            t_eval_numpy = timed(evaluate, args.repeats)
        finally:
            engine._numpy.native = True
        rows.append(
            {
                "batch_size": bs,
                "batches": len(batches),
                "tokens": n_tokens,
                "content_tokens": n_content,
                "full_forward_s": t_full,
                "stopped_forward_s": t_stop,
                "audit_s": t_audit,
                "audit_stages_s": dict(stage_totals),
                "audit_torch_eval_s": t_audit_torch,
                "audit_stages_torch_eval_s": dict(torch_stage_totals),
                "audit_numpy_eval_s": t_audit_numpy,
                "audit_stages_numpy_eval_s": dict(numpy_stage_totals),
                "audit_torch_products_s": t_audit_products,
                "audit_stages_torch_products_s": dict(products_stage_totals),
                "policy_eval_s": t_eval,
                "policy_eval_torch_s": t_eval_torch,
                "policy_eval_numpy_s": t_eval_numpy,
                "encode": encode,
                "full_forward_tok_s": n_tokens / t_full,
                "stopped_forward_tok_s": n_tokens / t_stop,
                "audit_tok_s": n_tokens / t_audit,
                "audit_vs_full_forward": t_full / t_audit,
                "audit_torch_products_vs_full_forward": t_full / t_audit_products,
            }
        )

    # Token budget per forward for one Auditor.run over every text (the pipeline's own bucketing).
    budgets = [int(b) for b in args.batch_tokens.split(",") if b]
    tuning: list[dict[str, Any]] = []
    if budgets:
        saved = (default_budget, auditor.max_tokens)
        n_all = sum(int(b.lengths.sum()) for b in [tokenize_batch(tok, items, max_tokens=auditor.max_tokens)])

        def run_with(budget: int) -> Callable[[], Any]:
            def go() -> None:
                auditor.batch_tokens = budget
                auditor.max_tokens = min(saved[1], budget)
                auditor.run(items)

            return go

        times = round_robin([run_with(b) for b in budgets], args.repeats)
        auditor.batch_tokens, auditor.max_tokens = saved
        tuning = [{"batch_tokens": b, "seconds": t, "tok_s": n_all / t} for b, t in zip(budgets, times)]

    result = {
        "benchmark": "audit_throughput",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "model": auditor.model.name,
        "hookpoint": auditor.hookpoint,
        "sae": {"architecture": auditor.sae.cfg.architecture, "d_sae": d_sae, "k": auditor.sae.cfg.k},
        "policy": engine.name,
        "watched_latents": int(watched.numel()),
        "needs_resid": engine.needs_resid,
        "texts": len(texts),
        "rows": rows,
        "batch_tokens_tuning": tuning,
    }
    print(json.dumps(result, indent=2))
    print()
    hdr = (
        f"{'batch':>5} {'tokens':>6} {'full fwd tok/s':>14} {'stopped tok/s':>13} {'audit tok/s':>11} {'audit/full':>10}"
        f" {'torch products':>15}"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['tokens']:>6} {r['full_forward_tok_s']:>14.0f} {r['stopped_forward_tok_s']:>13.0f} "
            f"{r['audit_tok_s']:>11.0f} {r['audit_vs_full_forward']:>9.2f}x {r['audit_torch_products_vs_full_forward']:>14.2f}x"
        )
    print(f"(torch products: the audit with the few-row kernel suspended; kernel {skinny.status()['detail']})")
    print()
    print(f"{'batch':>5} {'stage':<36} {'seconds':>8} {'% of audit fwd':>14}")
    for r in rows:
        fwd = r["audit_stages_s"].get("forward", r["stopped_forward_s"])
        for k, v in r["audit_stages_s"].items():
            print(f"{r['batch_size']:>5} {'audit.' + k:<36} {v:>8.4f} {100 * v / fwd:>13.2f}%")
        pv = r["audit_stages_torch_products_s"]
        share = 100 * (pv["encode"] + pv["evaluate"]) / pv["forward"]
        print(f"{r['batch_size']:>5} {'audit.forward (torch products)':<36} {pv['forward']:>8.4f}   encode+evaluate {share:.2f}%")
        tv = r["audit_stages_torch_eval_s"]
        print(f"{r['batch_size']:>5} {'audit.evaluate (torch program)':<36} {tv['evaluate']:>8.4f} {100 * tv['evaluate'] / tv['forward']:>13.2f}%")
        nv = r["audit_stages_numpy_eval_s"]
        print(f"{r['batch_size']:>5} {'audit.evaluate (NumPy program)':<36} {nv['evaluate']:>8.4f} {100 * nv['evaluate'] / nv['forward']:>13.2f}%")
        print(f"{r['batch_size']:>5} {'policy eval (alone)':<36} {r['policy_eval_s']:>8.4f} {100 * r['policy_eval_s'] / fwd:>13.2f}%")
        print(f"{r['batch_size']:>5} {'policy eval (alone, torch program)':<36} {r['policy_eval_torch_s']:>8.4f} {100 * r['policy_eval_torch_s'] / fwd:>13.2f}%")
        print(f"{r['batch_size']:>5} {'policy eval (alone, NumPy program)':<36} {r['policy_eval_numpy_s']:>8.4f} {100 * r['policy_eval_numpy_s'] / fwd:>13.2f}%")
        for name, e in r["encode"].items():
            print(f"{r['batch_size']:>5} {'watch-list ' + name:<36} {e['watch_list_s']:>8.4f} {100 * e['watch_list_s'] / fwd:>13.2f}%")
            print(f"{r['batch_size']:>5} {'full ' + name:<36} {e['full_s']:>8.4f} {100 * e['full_s'] / fwd:>13.2f}%")
    if tuning:
        print()
        print(f"{'batch_tokens':>12} {'run(all) tok/s':>14}")
        for t in tuning:
            print(f"{t['batch_tokens']:>12} {t['tok_s']:>14.0f}")
    return result


if __name__ == "__main__":
    main()
