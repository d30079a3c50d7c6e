"""Benchmark: what ``Auditor.run`` adds to the stopped forwards it runs, end to end, on a GPU.

The Llama-3.1-8B shape of ``gpu_llama8b.py`` (random weights, bf16), a 131k-latent ReLU SAE and
the random 100-rule policy, audited through the product's own path: ``Auditor.run`` on
``--buckets`` buckets of ``--batch`` texts of ``--seq`` tokens each (a word-level tokenizer
built here gives each text exactly that many tokens). Timed in turns, best of ``--repeats``:

- ``forwards``: the same buckets' stopped forwards alone (the ids already on the device);
- ``run_overlapped``: ``Auditor.run`` as shipped, each bucket's device work (forward, watch-list
  encode, the policy's decision and the copies to the host) queued before the previous bucket's
  verdicts are built, so the host's Python runs while the GPU computes;
- ``run_in_turn``: ``Auditor.run`` with ``overlap_buckets = False``;
- ``run_cast_rows``: ``run_overlapped`` with the watch-list encode as before the bfloat16 split
  (the rows cast to float32, the GEMM on CUDA's float32 cores); the two runs' verdicts are
  compared too;
- ``batches_ahead``: what the sidecar does on a GPU (``MicroBatcher.hand_off``): each bucket a
  batch of its own, ``Auditor.launch``-ed (tokenizing included) before the previous batch's
  results are built.

What a run adds, as a share of the forwards: ``(run - tokenize - forwards) / forwards``, where
``tokenize`` is the run's own tokenizer time (``StageTimings``), which happens before any forward
(the best run by that difference; the GPU figures in RESULTS.md up to the fourteenth session's
subtract the fastest tokenizing of any run instead);
for ``batches_ahead``, ``(time - forwards) / forwards``, as its tokenizing overlaps the GPU too.
It also lists the CUDA synchronizations one bucket's launch makes (``torch.cuda`` sync debug
mode, with the source line of each): the launch should wait for the device only before its
forward is queued. ``--compile-policy`` compiles the policy's program as ``auditor serve
--compile`` does. Prints one JSON object and a table.

    python benchmarks/audit_pipeline.py [--buckets 4] [--batch 32] [--seq 512] [--repeats 3] [--compile-policy]
    python benchmarks/audit_pipeline.py --tiny      # a 4-layer model on the CPU: a smoke test
    python benchmarks/audit_pipeline.py --compare-traces DIR/run/trace.json DIR/forwards/trace.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.models import wrap_model  # noqa: E402
from auditor.models.capture import capture  # noqa: E402
from auditor.pipeline import Auditor  # noqa: E402
from auditor.text import AuditInput  # noqa: E402
from auditor.policy.compile import compile_policy  # noqa: E402
from auditor.policy.engine import PolicyEngine  # noqa: E402
from auditor.sae import sae as sae_module  # noqa: E402
from benchmarks.gpu_llama8b import LLAMA_31_8B, TINY, build_model, random_sae  # noqa: E402
from benchmarks.policy_eval import random_library, random_policy  # noqa: E402
from benchmarks.timing import round_robin  # noqa: E402

def word_tokenizer(words: int) -> Any:
    """A fast tokenizer with one token per word ``w0`` .. ``w{words-1}`` (ids 2 ..), ``<s>`` as BOS
    and ``<pad>``: texts of N words are N content tokens plus BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<pad>")


def random_engine(width: int, hook: str, model: str) -> PolicyEngine:
    """``gpu_llama8b``'s random 100-rule policy, its library describing this SAE (which the
    auditor checks)."""
    rng = random.Random(0)
    library = random_library(rng, 400)
    library = library.model_copy(update={"sae": library.sae.model_copy(update={"d_sae": width, "hookpoint": hook, "model": model})})
    policy = random_policy(rng, library.names, 100)
    return PolicyEngine(policy, library, compile_policy(policy, library, base_dir=".", path="<audit-pipeline>"))


def verdicts_agree(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """How far two runs' verdicts on the same texts agree: texts with the same action and matched
    rules, and the largest difference of a rule's score relative to the score (the random
    policy's scores reach 10^4)."""
    same, diff = 0, 0.0
    for x, y in zip(a, b):
        vx, vy = x.verdict, y.verdict
        same += (vx.action, [m.rule_id for m in vx.matches]) == (vy.action, [m.rule_id for m in vy.matches])
        for k in set(vx.scores) & set(vy.scores):
            scale = max(abs(vx.scores[k]), abs(vy.scores[k]), 1e-6)
            diff = max(diff, abs(vx.scores[k] - vy.scores[k]) / scale)
    return {"texts": len(a), "same_rules": same, "max_score_rel_diff": diff}


def launch_syncs(auditor: Auditor, items: list[AuditInput], stacks: list[str] | None = None) -> list[str]:
    """The source lines of the CUDA synchronizations one bucket's launch makes (empty off CUDA);
    ``stacks`` collects the Python stack of each."""
    if auditor.device.type != "cuda":
        return []
    from auditor.pipeline import StageTimings
    from auditor.text import tokenize_batch

    batch = tokenize_batch(auditor.model.tokenizer, items, max_tokens=auditor.max_tokens)
    torch.cuda.synchronize(auditor.device)
    seen: list[str] = []

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" in str(message):
            seen.append(f"{Path(filename).parent.name}/{Path(filename).name}:{lineno}")
            if stacks is not None:
                stacks.append("".join(traceback.format_stack(limit=14)[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            launched = auditor._launch_batch(batch, 0, auditor.policy, StageTimings())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(auditor.device)
    assert launched.pending is not None
    launched.pending.verdicts()
    return sorted(set(seen))


class GcPauses:
    """Python's garbage collections while installed: each one's generation and seconds, and a
    ``gc.genN`` region in profiler traces (a pause of the host that no operator shows)."""

    def __init__(self) -> None:
        from torch.profiler import record_function

        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0
        self._region: Any = None
        self._record = record_function

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            self._region = self._record(f"gc.gen{info['generation']}")
            self._region.__enter__()
        else:
            if self._region is not None:
                self._region.__exit__(None, None, None)
                self._region = None
            self.pauses.append((int(info["generation"]), time.perf_counter() - self._start))

    def summary(self) -> dict[str, Any]:
        by_gen: dict[str, dict[str, float]] = {}
        for g, sec in self.pauses:
            d = by_gen.setdefault(f"gen{g}", {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            d["count"] += 1
            d["total_ms"] += sec * 1e3
            d["max_ms"] = max(d["max_ms"], sec * 1e3)
        return by_gen


def labelled(auditor: Auditor) -> None:
    """Name each bucket's launch and result building in profiler traces (on this object only)."""
    from torch.profiler import record_function

    for name in ("_launch_batch", "_finish_batch"):
        method = getattr(auditor, name)

        def wrapped(*a: Any, _method: Any = method, _name: str = name, **kw: Any) -> Any:
            with record_function(f"auditor.{_name.strip('_')}"):
                return _method(*a, **kw)

        setattr(auditor, name, wrapped)


def trace(fn: Any, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """Profile ``fn()`` (host and device), write the Chrome trace to ``out_dir/trace.json``, and
    measure how busy the GPU was: its kernels' and copies' time (overlaps merged) over the span
    from the first to the last of them, and the longest idle gaps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "trace.json"
    prof.export_chrome_trace(str(path))
    events = read_trace(path)
    n = len(device_events(events))
    if not n:
        return {"trace": str(path), "device_spans": 0}
    gaps = idle_gaps(events, most=12)
    return {
        "trace": str(path), "device_spans": n, "span_ms": gaps["span_ms"],
        "busy_ms": gaps["span_ms"] - gaps["idle_ms"], "idle_ms": gaps["idle_ms"],
        "idle_share": gaps["idle_ms"] / gaps["span_ms"], "longest_gaps_ms": [(round(g["ms"], 3), g["before"]) for g in gaps["longest"]],
    }


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace (``.json`` or ``.json.gz``)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def device_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU kernels, copies and memsets among a trace's events."""
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def compare_traces(run_trace: Path, forwards_trace: Path) -> dict[str, Any]:
    """The device time of what a run adds to its forwards: per kernel name, the run's total time
    less the forwards' where the run has more launches of it (its own kernels: encode, decision,
    copies), against the forwards' whole device time. Comparing totals of every kernel instead
    would mostly measure the forwards' run-to-run spread (about 1%)."""
    traces = {"run": read_trace(run_trace), "forwards": read_trace(forwards_trace)}  # each read once
    by_name: dict[str, dict[str, list[float]]] = {}
    for key, events in traces.items():
        for e in device_events(events):
            by_name.setdefault(e["name"], {"run": [], "forwards": []})[key].append(float(e.get("dur", 0.0)))
    rows = []
    for name, d in by_name.items():
        extra = len(d["run"]) - len(d["forwards"])
        if extra > 0:
            rows.append({"kernel": name[:100], "extra_launches": extra, "ms": (sum(d["run"]) - sum(d["forwards"])) / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    forwards_ms = sum(sum(d["forwards"]) for d in by_name.values()) / 1e3
    added = sum(r["ms"] for r in rows)
    return {"forwards_device_ms": forwards_ms, "run_only_ms": added, "run_only_share": added / forwards_ms if forwards_ms else 0.0,
            "largest": rows[:12], "run_gaps": idle_gaps(traces["run"]), "forwards_gaps": idle_gaps(traces["forwards"])}


def host_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The host side among a trace's events: operators, CUDA runtime calls and labelled regions."""
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")]


def idle_gaps(events: list[dict[str, Any]], most: int = 8) -> dict[str, Any]:
    """How long the GPU stood idle in a trace: in all (overlaps merged) and its longest gaps, each
    with where it fell (ms from the first device event), the device events on either side and
    what the host was doing meanwhile (its longest events overlapping the gap)."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"]) for e in device_events(events))
    if not spans:
        return {"span_ms": 0.0, "idle_ms": 0.0, "longest": []}
    gaps, end, before = [], spans[0][0], ""
    for start, stop, name in spans:
        if start > end:
            gaps.append({"ms": (start - end) / 1e3, "at_ms": (end - spans[0][0]) / 1e3, "after": before[:60], "before": name[:60],
                         "from": end, "to": start})
        if stop > end:
            end, before = stop, name
    gaps.sort(key=lambda g: -g["ms"])
    host = host_events(events)
    for g in gaps[:most]:
        lo, hi = g.pop("from"), g.pop("to")
        during = [(min(hi, float(e["ts"]) + float(e.get("dur", 0.0))) - max(lo, float(e["ts"])), e) for e in host
                  if float(e["ts"]) < hi and float(e["ts"]) + float(e.get("dur", 0.0)) > lo]
        during.sort(key=lambda x: -x[0])
        g["host"] = [f"{e['name'][:50]} ({float(e.get('dur', 0.0)) / 1e3:.2f} ms)" for ov, e in during[:6] if ov > 0.05 * (hi - lo)]
    for g in gaps[most:]:
        g.pop("from"), g.pop("to")
    return {"span_ms": (end - spans[0][0]) / 1e3, "idle_ms": sum(g["ms"] for g in gaps), "longest": gaps[:most]}


def print_comparison(c: dict[str, Any]) -> None:
    print(f"kernels only the run has: {c['run_only_ms']:.2f} ms against the forwards' {c['forwards_device_ms']:.1f} ms "
          f"of device time ({100 * c['run_only_share']:.2f}%); the largest:")
    for r in c["largest"][:8]:
        print(f"  {r['ms']:8.3f} ms  x{r['extra_launches']:<3} {r['kernel'][:90]}")
    for key in ("run_gaps", "forwards_gaps"):
        g = c[key]
        print(f"{key.split('_')[0]}: the GPU idle {g['idle_ms']:.1f} ms of {g['span_ms']:.1f}; longest gaps:")
        for gap in g["longest"][:5]:
            print(f"  {gap['ms']:.3f} ms at {gap['at_ms']:.1f} ms: {gap['after'][:45]} -> {gap['before'][:45]}")
            if gap.get("host") and gap["ms"] >= 1.0:
                print(f"      host meanwhile: {'; '.join(gap['host'])}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model and a small SAE, for a CPU smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512, help="tokens per text (BOS included)")
    ap.add_argument("--width", type=int, default=131072)
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-policy", action="store_true")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the model, SAE and policy are loaded, "
                    "as auditor serve does")
    ap.add_argument("--trace", type=Path, default=None, metavar="DIR", help="after the timings, profile one overlapped "
                    "run and one of the forwards alone; write their Chrome traces and the syncs' stacks to DIR")
    ap.add_argument("--compare-traces", type=Path, nargs=2, default=None, metavar=("RUN", "FORWARDS"),
                    help="only compare two traces that --trace wrote (.json or .json.gz): the device time of the "
                    "kernels only the run has, against the forwards'")
    args = ap.parse_args(argv)
    if args.compare_traces is not None:
        c = compare_traces(*args.compare_traces)
        print(json.dumps(c, indent=2))
        print()
        print_comparison(c)
        return c
    device = torch.device(args.device)
    cfg = TINY if args.tiny else LLAMA_31_8B
    seq, width = (min(args.seq, 64), 8192) if args.tiny else (args.seq, args.width)
    layer = min(args.layer, cfg["num_hidden_layers"] - 2)
    hook = f"blocks.{layer}.hook_resid_post"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = build_model(cfg, device, dtype)
    words = min(4000, cfg["vocab_size"] - 2)
    tokenizer = word_tokenizer(words)
    sae = random_sae(cfg["hidden_size"], width, hook, device, torch.float32)
    engine = random_engine(width, hook, "llama-3.1-8b-shaped")
    engine.compile_program = bool(args.compile_policy)
    # One bucket per --batch texts: the token budget holds a bucket's padded tokens exactly.
    auditor = Auditor(wrap_model(model, tokenizer, name="llama-3.1-8b-shaped"), sae, hookpoint=hook,
                      library=engine.library, policy=engine, max_tokens=seq, batch_tokens=args.batch * seq, pack=False)
    n = args.buckets * args.batch
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, words, (n, seq - 1), generator=gen).tolist()
    items = [AuditInput(text=" ".join(f"w{w}" for w in row), id=str(i)) for i, row in enumerate(words)]
    ids = tokenizer([it.text for it in items], return_tensors="pt")["input_ids"].to(device)
    assert ids.shape == (n, seq), ids.shape

    def forwards() -> None:
        for b in range(args.buckets):
            rows = slice(b * args.batch, (b + 1) * args.batch)
            capture(model, ids[rows], None, [hook], stop_early=True)  # no padding: no mask, as the run's

    tokenized: dict[str, list[float]] = {}  # each run's own tokenizer seconds, by variant
    matches: list[int] = []

    def batches_ahead() -> None:
        # What the sidecar does on a GPU (MicroBatcher.hand_off): each batch is its own launch,
        # queued (tokenized included) before the previous batch's results are built.
        auditor.overlap_buckets = True
        prev = None
        for b in range(args.buckets):
            launched = auditor.launch(items[b * args.batch : (b + 1) * args.batch])
            if prev is not None:
                prev.results()
            prev = launched
        assert prev is not None
        prev.results()

    def run(overlap: bool, key: str = "run_overlapped") -> list[Any]:
        auditor.overlap_buckets = overlap
        results = auditor.run(items)
        tokenized.setdefault(key, []).append(auditor.last_timings.tokenize)
        matches.append(sum(len(r.verdict.matches) for r in results if r.verdict is not None))
        return results

    def run_cast() -> list[Any]:
        # The watch-list encode as before the split: the bfloat16 rows cast to float32 first,
        # the GEMM on CUDA's float32 cores.
        saved = sae_module._SPLIT_DEVICES
        sae_module._SPLIT_DEVICES = frozenset()
        try:
            return run(True, "run_cast_rows")
        finally:
            sae_module._SPLIT_DEVICES = saved

    if args.gc_freeze:
        # What a long-running sidecar does once it has loaded (auditor serve): what exists now
        # is never traversed by the collector again.
        gc.collect()
        gc.freeze()
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    t_start = time.perf_counter()
    engine.warm_up(device)
    for overlap in (True, False):  # untimed: graphs are seen, then captured
        run(overlap)
    warm_s = time.perf_counter() - t_start
    agreement = verdicts_agree(run(True), run_cast())
    variants = {"forwards": forwards, "run_overlapped": lambda: run(True), "run_in_turn": lambda: run(False, "run_in_turn"),
                "batches_ahead": batches_ahead, "run_cast_rows": run_cast}
    tokenized.clear()
    pauses.pauses.clear()
    times = dict(zip(variants, round_robin(list(variants.values()), device, args.repeats, warm_up=False)))
    gc_timed = pauses.summary()
    t_fwd = min(times["forwards"])
    t_tok = min(min(v) for v in tokenized.values())
    stacks: list[str] = []
    syncs = launch_syncs(auditor, items[: args.batch], stacks)
    traced: dict[str, Any] = {}
    if args.trace is not None:
        labelled(auditor)
        traced["run_overlapped"] = trace(lambda: run(True), device, args.trace / "run")
        traced["forwards"] = trace(forwards, device, args.trace / "forwards")
        (args.trace / "sync_stacks.txt").write_text("\n\n".join(stacks))
        if device.type == "cuda":
            traced["compared"] = compare_traces(args.trace / "run" / "trace.json", args.trace / "forwards" / "trace.json")
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "buckets": args.buckets, "batch": args.batch, "seq": seq,
        "width": width, "layer": layer, "rules": len(engine.compiled.rules), "compile_policy": bool(args.compile_policy),
        "matches_per_text": matches[-1] / n, "warm_up_s": warm_s, "times_s": times, "tokenize_s": t_tok,
        "forwards_s": t_fwd, "launch_syncs": syncs, "traces": traced, "split_vs_cast_rows": agreement,
        "gc_freeze": bool(args.gc_freeze), "gc_pauses_timed": gc_timed, "objects_tracked": len(gc.get_objects()),
        "split_encode": sae._splits(torch.zeros(1, cfg["hidden_size"], dtype=dtype, device=device)),
    }
    for key in ("run_overlapped", "run_in_turn", "run_cast_rows"):
        # Each timed run less its own tokenizing (before its first forward, and as noisy as any
        # host work), the best of them.
        t, tok = min(zip(times[key], tokenized[key]), key=lambda pair: pair[0] - pair[1])
        out[f"{key}_s"] = t
        out[f"{key}_added_share"] = (t - tok - t_fwd) / t_fwd
    out["batches_ahead_s"] = min(times["batches_ahead"])
    out["batches_ahead_added_share"] = (out["batches_ahead_s"] - t_fwd) / t_fwd  # tokenizing included
    gc.callbacks.remove(pauses)
    print(json.dumps(out, indent=2))
    print(f"\n{out['device']}: {args.buckets} buckets of {args.batch} x {seq} tokens, {width:,}-latent ReLU SAE at "
          f"{hook}, {out['rules']} rules ({out['matches_per_text']:.1f} matches a text)"
          f"{', program compiled' if args.compile_policy else ''}")
    print(f"{'':22} {'seconds':>9} {'added (share of the forwards)':>30}")
    print(f"{'forwards alone':22} {t_fwd:9.4f}")
    print(f"{'tokenize (in a run)':22} {t_tok:9.4f}")
    for key, label in (("run_overlapped", "run, overlapped"), ("run_in_turn", "run, bucket by bucket"),
                       ("run_cast_rows", "run, float32 encode")):
        print(f"{label:22} {out[key + '_s']:9.4f} {100 * out[key + '_added_share']:29.2f}%")
    print(f"{'batches launched ahead':22} {out['batches_ahead_s']:9.4f} {100 * out['batches_ahead_added_share']:29.2f}%"
          "  (tokenizing included)")
    print(f"syncs in one launch: {', '.join(syncs) if syncs else 'none'}")
    print(f"garbage collections during the timed runs ({'after gc.freeze(), ' if args.gc_freeze else ''}"
          f"{out['objects_tracked']:,} objects tracked): " + (", ".join(
              f"{g} {d['count']:.0f}x, {d['total_ms']:.1f} ms in all, longest {d['max_ms']:.1f} ms" for g, d in sorted(gc_timed.items()))
              or "none"))
    print(f"watch-list encode on the tensor cores (split weights): {out['split_encode']}; against the rows cast to float32: "
          f"{agreement['same_rules']}/{agreement['texts']} texts with the same action and rules, largest relative score "
          f"difference {agreement['max_score_rel_diff']:.1e}")
    if "compared" in traced:
        print_comparison(traced["compared"])
    for key, t in traced.items():
        if t.get("device_spans"):
            print(f"traced {key}: GPU idle {100 * t['idle_share']:.2f}% of {t['span_ms']:.1f} ms; longest gaps (ms): "
                  f"{', '.join(str(g) for g, _ in t['longest_gaps_ms'][:6])}")
    return out


if __name__ == "__main__":
    main()
