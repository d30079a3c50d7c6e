"""Benchmark: auditing a streamed completion chunk by chunk, with and without KV-cache reuse.

A chat prompt plus a completion of ``--tokens`` tokens (text from ``datasets/safety-v1``),
released in chunks of ``--chunk`` tokens. After every chunk the policy's verdict on
everything so far is computed in one of three ways:

* ``single``: one ``Auditor.run`` on the whole completion at the end (the floor);
* ``chunked_reuse``: ``Auditor.stream(...).feed(chunk)``, which runs the model only on the
  new tokens and keeps the KV cache of the prefix (and the prefix's encoded features);
* ``chunked_recompute``: ``Auditor.run`` on prompt + completion so far after every chunk.

``chunked_reuse`` is also timed with the kernel reading the float32 weights where it would read
their exact 4-bit form (``skinny.unpacked``; only where some weight has one, as the default
model's do) and with torch's products (``skinny.suspended``).

Then ``--streams`` completions (different texts, the same prompt) are streamed side by side,
the way a sidecar sees concurrent streamed responses, and each round of chunks is audited:

* ``many_single``: the whole completions audited at the end, the faster of one
  ``Auditor.run`` over all of them (packed, batched) and one run per completion (the floor);
* ``many_alone``: every stream fed on its own (``AuditStream.feed``), a forward per chunk;
* ``many_shared``: each round's chunks fed together (``Auditor.feed_streams``): one forward
  over all the streams' new tokens, each stream attending to its own cache;
* ``many_batcher``: every stream a client of the sidecar's micro-batcher (``MicroBatcher.feed``,
  ``--batcher-workers`` model workers, the server's default of two on a CPU), feeding its next
  chunk when the last one's verdict is back: the batches form on their own.

Prints one JSON object and a summary table; the goal is ``chunked / single <= 1.5``, for
one stream (``reuse_vs_single``) and per stream with ``--streams`` streams side by side
(``shared_vs_single``).

    PYTHONPATH=. python benchmarks/streaming.py [--tokens 256] [--chunk 16] [--repeats 2]
        [--streams 16] [--batcher-workers 2] [--policy policies/default.yaml] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python benchmarks/streaming.py`: the repo's benchmarks package

from auditor.pipeline import Auditor  # noqa: E402
from auditor.text import AuditInput  # noqa: E402
from auditor.models import skinny  # noqa: E402
from benchmarks.audit_throughput import round_robin, timed  # noqa: E402
PROMPT = "Write a long, careful answer: how should a small team handle customer data and payments safely?"


def completion_chunks(auditor: Auditor, n_tokens: int, chunk: int, offset: int = 0) -> list[str]:
    """Text chunks of ``chunk`` tokens each that join into a completion of ``n_tokens`` tokens
    (the dataset's texts from the ``offset``-th on, joined)."""
    texts = [
        json.loads(line)["text"]
        for line in (REPO / "datasets" / "safety-v1" / "benign_a.jsonl").read_text().splitlines()
        if line.strip()
    ]
    texts = texts[offset % len(texts) :] + texts[: offset % len(texts)]
    tok = auditor.model.tokenizer
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"][:n_tokens]
    return [tok.decode(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16, help="completions streamed side by side (0: skip)")
    ap.add_argument("--batcher-workers", type=int, default=2, help="model workers of the micro-batcher case (0: skip it)")
    ap.add_argument("--policy", default=str(REPO / "policies" / "default.yaml"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16; default: the model's default on this device)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    auditor = Auditor.load(policy=args.policy, dtype=args.dtype)
    chunks = completion_chunks(auditor, args.tokens, args.chunk)
    messages = ({"role": "user", "content": PROMPT},)
    full = AuditInput(messages=messages, completion="".join(chunks))
    verdicts: dict[str, Any] = {}
    stages: dict[str, dict[str, float]] = {}  # seconds per pipeline stage, last run of each mode

    def single() -> None:
        [res] = auditor.run([full])
        verdicts["single"] = res.verdict
        stages["single"] = auditor.last_timings.as_dict()

    def reuse(key: str = "reuse") -> None:
        stream = auditor.stream(AuditInput(messages=messages))
        totals: dict[str, float] = {}
        for c in chunks:
            res = stream.feed(c)
            for k, v in stream.last_timings.as_dict().items():
                totals[k] = totals.get(k, 0.0) + v
        verdicts[key] = res.verdict
        stages[key] = totals

    def recompute() -> None:
        so_far = ""
        for c in chunks:
            so_far += c
            [res] = auditor.run([AuditInput(messages=messages, completion=so_far)])
        verdicts["recompute"] = res.verdict

    def reuse_torch() -> None:
        with skinny.suspended():
            reuse("reuse_torch_products")

    def reuse_float32() -> None:
        with skinny.unpacked():
            reuse("reuse_float32_weights")

    kernel = skinny.status()
    # How many of the model's linear weights the kernel reads in their 4-bit form (skinny.packed).
    linears = [m.weight for m in auditor.model.model.modules() if isinstance(m, torch.nn.Linear)]
    packed_count = sum(skinny.packed(w) is not None for w in linears) if kernel["available"] else 0
    modes = [single, reuse]
    if kernel["available"]:
        modes += [reuse_float32] if packed_count else []
        modes.append(reuse_torch)
    # In turns, so that load from other processes falls on all of them alike.
    times = dict(zip(modes, round_robin(modes, args.repeats)))
    t_single, t_reuse = times[single], times[reuse]
    t_reuse_float32, t_reuse_torch = times.get(reuse_float32), times.get(reuse_torch)
    t_recompute = timed(recompute, args.repeats)
    [res] = auditor.run([full])
    same, max_score_diff = agreement([(v, verdicts["single"]) for v in verdicts.values()])
    result = {
        "benchmark": "streaming",
        "dtype": str(next(auditor.model.model.parameters()).dtype),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "model": auditor.model.name,
        "policy": auditor.policy.name if auditor.policy else None,
        "sequence_tokens": len(res.tokens),
        "completion_tokens": args.tokens,
        "chunk_tokens": args.chunk,
        "chunks": len(chunks),
        "single_s": t_single,
        "chunked_reuse_s": t_reuse,
        "chunked_recompute_s": t_recompute,
        "reuse_vs_single": t_reuse / t_single,
        "few_row_kernel": kernel,
        "linear_weights_4bit": f"{packed_count} of {len(linears)}",
        "chunked_reuse_float32_weights_s": t_reuse_float32,
        "reuse_float32_weights_vs_single": t_reuse_float32 / t_single if t_reuse_float32 else None,
        "chunked_reuse_torch_products_s": t_reuse_torch,
        "reuse_torch_products_vs_single": t_reuse_torch / t_single if t_reuse_torch else None,
        "recompute_vs_single": t_recompute / t_single,
        "verdicts_agree": same,
        "max_score_abs_diff": max_score_diff,
        "stage_s": stages,
        "shared_stream_forwards": auditor.shared_stream_forwards,
    }
    if args.streams:
        result["many"] = many_streams(
            auditor, messages, args.streams, args.tokens, args.chunk, args.repeats, args.batcher_workers
        )
    print(json.dumps(result, indent=2))
    print()
    print(f"{'mode':<32} {'seconds':>8} {'x single':>9}")
    rows = [("single", t_single), ("chunked, KV reuse", t_reuse)]
    if t_reuse_float32:
        rows.append(("  the same, float32 weights", t_reuse_float32))
    if t_reuse_torch:
        rows.append(("  the same, torch's products", t_reuse_torch))
    for name, t in [*rows, ("chunked, recompute", t_recompute)]:
        print(f"{name:<32} {t:>8.3f} {t / t_single:>8.2f}x")
    print(f"few-row kernel: {'used' if kernel['available'] else 'not used'} ({kernel['detail']}); "
          f"linear weights read in 4-bit form: {result['linear_weights_4bit']}")
    for name in stages:
        print(f"stages ({name}): " + ", ".join(f"{k} {v:.3f} s" for k, v in stages[name].items()))
    if args.streams:
        many = result["many"]
        n = many["streams"]
        print()
        print(f"{n} streams side by side ({many['rounds']} rounds of chunks)")
        floor = many["single_s"]
        for name, key in [
            (f"single audits ({many['single_mode']})", "single_s"),
            ("each stream fed alone", "alone_s"),
            ("fed together (feed_streams)", "shared_s"),
            (f"micro-batcher, {many['batcher_workers']} workers", "batcher_s"),
        ]:
            if key in many:
                print(f"{name:<32} {many[key]:>8.3f} {many[key] / floor:>8.2f}x")
        print("stages (fed together): " + ", ".join(f"{k} {v:.3f} s" for k, v in many["stage_s"]["shared"].items()))
        print(f"verdicts agree: {many['verdicts_agree']}, max score difference {many['max_score_abs_diff']:.2g}")
    return result


def agreement(pairs: Sequence[tuple[Any, Any]]) -> tuple[bool, float]:
    """Whether each ``(verdict, reference)`` pair has the same action and rules, and the largest
    score difference over all pairs."""
    same = all(v is not None and v.action == w.action and sorted(v.scores) == sorted(w.scores) for v, w in pairs)
    diff = max((abs(v.scores[k] - w.scores[k]) for v, w in pairs if v is not None for k in w.scores), default=0.0)
    return same, diff


def many_streams(
    auditor: Auditor,
    messages: tuple[dict[str, str], ...],
    n_streams: int,
    n_tokens: int,
    chunk: int,
    repeats: int,
    batcher_workers: int = 0,
) -> dict[str, Any]:
    """``n_streams`` completions streamed side by side: single audits vs streams fed alone vs together."""
    chunk_lists = [completion_chunks(auditor, n_tokens, chunk, offset=7 * s) for s in range(n_streams)]
    fulls = [AuditInput(messages=messages, completion="".join(c)) for c in chunk_lists]
    rounds = max(len(c) for c in chunk_lists)
    final: dict[str, list[Any]] = {}
    stages: dict[str, dict[str, float]] = {}

    def single_batched() -> None:
        final["batched"] = auditor.run(fulls)

    def single_each() -> None:
        final["each"] = [auditor.run([f])[0] for f in fulls]

    def fed(together: bool) -> None:
        streams = [auditor.stream(AuditInput(messages=messages)) for _ in chunk_lists]
        last: list[Any] = [None] * len(streams)
        totals: dict[str, float] = {}
        for r in range(rounds):
            live = [i for i, c in enumerate(chunk_lists) if r < len(c)]
            if together:
                results = auditor.feed_streams([(streams[i], chunk_lists[i][r]) for i in live])
                timings = [auditor.last_timings]
            else:
                results = [streams[i].feed(chunk_lists[i][r]) for i in live]
                timings = [streams[i].last_timings for i in live]
            for i, res in zip(live, results):
                last[i] = res
            for t in timings:
                for k, v in t.as_dict().items():
                    totals[k] = totals.get(k, 0.0) + v
        key = "shared" if together else "alone"
        final[key] = last
        stages[key] = totals

    batches: list[int] = []

    def batcher_fed() -> None:
        from auditor.server.batcher import MicroBatcher
        from auditor.workers import ModelWorkers

        workers = ModelWorkers()
        if batcher_workers > 1:
            workers.executor(0).submit(workers.configure, batcher_workers).result()

        async def drive() -> list[Any]:
            batcher = MicroBatcher(auditor, max_wait_ms=20, max_tokens=8192, queue_size=256, workers=workers)
            await batcher.start()
            try:

                async def client(chunks: list[str]) -> Any:
                    stream = auditor.stream(AuditInput(messages=messages))
                    res = None
                    for c in chunks:
                        res = await batcher.feed(stream, c)
                    return res

                return list(await asyncio.gather(*(client(c) for c in chunk_lists)))
            finally:
                batches.append(batcher.batches)
                await batcher.stop()

        final["batcher"] = asyncio.run(drive())

    t_batched = timed(single_batched, repeats)
    t_each = timed(single_each, repeats)
    t_alone = timed(lambda: fed(False), repeats)
    t_shared = timed(lambda: fed(True), repeats)
    t_batcher = timed(batcher_fed, repeats) if batcher_workers else None
    t_single = min(t_batched, t_each)
    want = final["each"]
    agree, diff = agreement(
        [(got.verdict, ref.verdict) for key in ("batched", "alone", "shared", "batcher") if key in final
         for got, ref in zip(final[key], want)]
    )
    out = {
        "streams": n_streams,
        "rounds": rounds,
        "tokens": sum(len(r.tokens) for r in want),
        "single_batched_s": t_batched,
        "single_each_s": t_each,
        "single_s": t_single,
        "single_mode": "one batched run" if t_batched <= t_each else "one run each",
        "alone_s": t_alone,
        "shared_s": t_shared,
        "alone_vs_single": t_alone / t_single,
        "shared_vs_single": t_shared / t_single,
        "verdicts_agree": agree,
        "max_score_abs_diff": diff,
        "stage_s": stages,
    }
    if t_batcher is not None:
        out.update(
            batcher_workers=batcher_workers,
            batcher_s=t_batcher,
            batcher_vs_single=t_batcher / t_single,
            batcher_batches=batches[-1],
        )
    return out


if __name__ == "__main__":
    main()
