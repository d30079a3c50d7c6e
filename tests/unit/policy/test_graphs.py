"""Policy evaluations replayed as CUDA graphs (``auditor.policy._graphs``).

On the CPU: the bucketing, and that an evaluation of a batch copied into padded buffers (what a
graph computes on) gives the batch's own rule tensors, whatever an earlier batch left in them.
On a GPU: graph replays give the CPU's verdicts, explanations stay right after later replays,
threads share an engine's graphs (on the default stream and on their own), and
``cuda_graphs = False`` turns them off.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.policy._graphs import EvalGraphs, _Graph, bucket_rows, bucket_tokens
from auditor.policy.engine import PolicyEngine, Verdict
from tests.unit.policy.test_engine import full_batch, make_engine, one_rule, policies, probe_dir, random_inputs  # noqa: F401

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_buckets() -> None:
    assert [bucket_rows(b) for b in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]
    assert [bucket_tokens(t) for t in (1, 15, 16, 17, 100, 128, 129, 256, 257, 512, 513)] == [
        16, 16, 16, 32, 128, 128, 256, 256, 512, 512, 768,
    ]


def test_kept_graphs_are_bounded_by_count_and_tokens() -> None:
    graphs = EvalGraphs(lambda values: (), max_graphs=3, max_tokens=1024)
    cpu = torch.device("cpu")

    def keep(bb: int, tb: int) -> None:
        graphs._graphs[(cpu, bb, tb, 5, False)] = _Graph([], lambda: None, ())
        graphs._evict()

    for bb, tb in ((1, 16), (1, 32), (2, 16), (4, 64)):
        keep(bb, tb)
    assert [k[1:3] for k in graphs._graphs] == [(1, 32), (2, 16), (4, 64)]  # three at most
    keep(8, 256)  # 2,048 tokens: with the others over twice 1,024, the oldest go until it fits
    assert [k[1:3] for k in graphs._graphs] == [(8, 256)]
    graphs._graphs.move_to_end((cpu, 8, 256, 5, False), last=False)
    keep(1, 16)  # the newest stays; the least recently used goes
    assert [k[1:3] for k in graphs._graphs] == [(1, 16)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 5), t=st.integers(1, 20))
def test_padded_buffers_give_the_batchs_own_rule_tensors(probe_dir: Path, policy: dict[str, Any], seed: int, bsz: int, t: int) -> None:
    engine = make_engine(policy, probe_dir)
    full, mask, comp, recon = random_inputs(seed, bsz, t)
    values = (full[..., engine.watched], mask, comp, ~comp, recon if engine.needs_recon_error else None)
    want = engine._compute(*values, None)
    # Buffers as a larger earlier batch would leave them: every padded position looks like a token.
    bufs = [
        None if x is None else torch.full((bucket_rows(bsz), bucket_tokens(t), *x.shape[2:]), 1 if x.dtype == torch.bool else 2.5, dtype=x.dtype)
        for x in values
    ]
    _Graph(bufs, lambda: None, ()).load(values)
    got = engine._graph_outputs(tuple(bufs))  # type: ignore[arg-type]
    for name, w, g in zip(("nodes", "rules", "leaf values", "leaf fired", "holds"), (*want[:4], want.holds.get()), got):
        g = g[:bsz, :t] if g.dim() == 3 else g[:bsz]
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, msg=name)


def same_verdicts(want: list[Verdict], got: list[Verdict]) -> None:
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.action == b.action and [m.rule_id for m in a.matches] == [m.rule_id for m in b.matches]
        assert a.suppressed == b.suppressed and a.scores.keys() == b.scores.keys()
        torch.testing.assert_close(torch.tensor(list(a.scores.values())), torch.tensor(list(b.scores.values())))
        for ma, mb in zip(a.matches, b.matches):
            assert [(e.name, e.fired, e.token_spans) for e in ma.explanation] == [(e.name, e.fired, e.token_spans) for e in mb.explanation]
            torch.testing.assert_close(torch.tensor([e.value for e in ma.explanation]), torch.tensor([e.value for e in mb.explanation]))


def on(device: torch.device, full: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor, recon: torch.Tensor, engine: PolicyEngine) -> Any:
    return full_batch(full.to(device), mask.to(device), comp.to(device), engine, recon.to(device))


@CUDA
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1))
def test_cuda_graph_replays_give_the_cpus_verdicts(probe_dir: Path, policy: dict[str, Any], seed: int) -> None:
    engine = make_engine(policy, probe_dir)
    dev = torch.device("cuda")
    # (3, 12) recurs: captured for the bucket (4, 16), which (4, 9) and (4, 16) then replay; (1, 5)
    # is first eager, then captured for (1, 16).
    shapes = [(3, 12), (3, 12), (4, 9), (4, 16), (1, 5), (1, 5)]
    results = []
    for i, (b, t) in enumerate(shapes):
        full, mask, comp, recon = random_inputs(seed + i, b, t)
        results.append((engine.evaluate(full_batch(full, mask, comp, engine, recon)), engine.evaluate(on(dev, full, mask, comp, recon, engine))))
    assert (engine._graphs.captures, engine._graphs.replays) == (2, 4)
    # Explanations are read only now, after every replay: they read copies, not the graph's buffers.
    for cpu, gpu in results:
        same_verdicts(cpu, gpu)
    # matched() replays the same graphs.
    full, mask, comp, recon = random_inputs(seed, 4, 16)
    want = engine.matched(full_batch(full, mask, comp, engine, recon))
    assert torch.equal(engine.matched(on(dev, full, mask, comp, recon, engine)).cpu(), want)
    assert engine._graphs.replays == 5


@CUDA
def test_cuda_graphs_shared_by_threads_and_switched_off(probe_dir: Path) -> None:
    policy = one_rule(
        {"all": [{"feature": "a.one", "agg": "mean", "threshold": 0.5}, {"feature": "b.three", "threshold": 1.0}]},
        for_tokens=2,
        exceptions=[{"name": "calm", "condition": {"feature": "c.six", "agg": "count_above", "above": 1.0, "threshold": 3.0}}],
    )
    engine = make_engine(policy, probe_dir)
    dev = torch.device("cuda")
    inputs = [random_inputs(seed, 3 + seed % 2, 20 + seed % 12) for seed in range(33)]  # one bucket: (4, 32)
    want = [engine.evaluate(full_batch(f, m, c, engine, r)) for f, m, c, r in inputs]
    for f, m, c, r in inputs[:2]:
        engine.evaluate(on(dev, f, m, c, r, engine))  # the second captures
    got: dict[int, list[Verdict]] = {}

    def work(first: int) -> None:
        # Two threads on the default stream, two on streams of their own.
        with torch.cuda.stream(torch.cuda.current_stream() if first < 2 else torch.cuda.Stream()):
            for i in range(1 + first, len(inputs), 4):
                got[i] = engine.evaluate(on(dev, *inputs[i], engine))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()  # explanations below read what the threads' streams copied out
    assert engine._graphs.captures == 1 and engine._graphs.replays == 33
    for i, verdicts in got.items():
        same_verdicts(want[i], verdicts)

    off = make_engine(policy, probe_dir)
    off.cuda_graphs = False
    for f, m, c, r in inputs[:3]:
        same_verdicts(off.evaluate(full_batch(f, m, c, off, r)), off.evaluate(on(dev, f, m, c, r, off)))
    assert (off._graphs.captures, off._graphs.replays) == (0, 0)
