"""The evaluation's tensor program compiled (``PolicyEngine.compile_program``).

Traced with dynamic shapes into one graph per engine (and one for batches of a single row), it
gives the eager verdicts, explanations and decisions; inductor's code does too; engines keep
their compilations apart (dynamo's recompilation limit is per code object); a backend that fails
leaves the engine evaluating eagerly, with one warning; hookpoint probes stay eager. On a GPU, the
compiled program is what a CUDA graph captures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.policy.engine import PolicyEngine
from tests.unit.policy.test_engine import full_batch, make_engine, one_rule, policies, probe_dir, random_inputs  # noqa: F401
from tests.unit.policy.test_graphs import on, same_verdicts

SHAPES = [(3, 12), (1, 5), (4, 9), (2, 1), (1, 17), (2, 0)]

RICH = {
    "rules": [
        {
            "id": "sustained",
            "severity": "high",
            "category": "alpha",
            "for_tokens": 2,
            "condition": {"all": [{"feature": "a.one", "agg": "mean", "threshold": 0.5}, {"feature": "b.three", "threshold": 1.0}]},
            "exceptions": [{"name": "calm", "condition": {"feature": "c.six", "agg": "count_above", "above": 1.0, "threshold": 3.0}}],
        },
        {
            "id": "either",
            "severity": "medium",
            "category": "beta",
            "scope": "completion",
            "condition": {"any": [{"feature": "a.two", "agg": "fraction_above", "above": 0.5, "threshold": 0.3}, {"not": {"feature": "b.four", "threshold": 2.0}}]},
        },
    ]
}


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is, counting graphs and runs."""

    def __init__(self) -> None:
        self.graphs = self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1

        def run(*args: Any) -> Any:
            self.runs += 1
            return gm.forward(*args)

        return run


def compare(eager: PolicyEngine, compiled: PolicyEngine, seed: int, device: torch.device = torch.device("cpu")) -> int:
    """Compare verdicts and decisions over :data:`SHAPES`; the number of matches compared."""
    matches = 0
    for i, (b, t) in enumerate(SHAPES):
        full, mask, comp, recon = random_inputs(seed + i, b, t)
        want = eager.evaluate(full_batch(full, mask, comp, eager, recon))
        got = compiled.evaluate(on(device, full, mask, comp, recon, compiled))
        same_verdicts(want, got)
        matches += sum(len(v.matches) for v in want)
        assert torch.equal(compiled.matched(on(device, full, mask, comp, recon, compiled)).cpu(), eager.matched(full_batch(full, mask, comp, eager, recon)))
    return matches


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1))
def test_the_traced_program_gives_the_eager_verdicts(probe_dir: Path, policy: dict[str, Any], seed: int) -> None:
    backend = CountingBackend()
    eager, compiled = make_engine(policy, probe_dir), make_engine(policy, probe_dir)
    compiled.compile_program = backend
    compare(eager, compiled, seed)
    # Every evaluation ran the compiled program (evaluate and matched for each shape); dynamic
    # shapes: a row count of 1 is specialized, the others share one graph; one token is padded to two.
    assert not compiled._program_failed and backend.runs == 2 * len(SHAPES)
    assert backend.graphs == 2


def test_inductor_code_gives_the_eager_verdicts(probe_dir: Path) -> None:
    eager, compiled = make_engine(RICH, probe_dir), make_engine(RICH, probe_dir)
    compiled.compile_program = True
    assert compare(eager, compiled, 7) > 0  # verdicts with matches and explanations were compared
    assert compiled._program is not None and not compiled._program_failed


def test_engines_compile_apart(probe_dir: Path) -> None:
    # Dynamo allows 8 compilations per code object: ten engines sharing one would fall back to eager.
    backend = CountingBackend()
    engines = []
    for i in range(10):
        engine = make_engine(one_rule({"feature": "a.one", "threshold": 0.25 + i / 4}), probe_dir)
        engine.compile_program = backend
        engines.append(engine)
    full, mask, comp, recon = random_inputs(3, 3, 12)
    for engine in engines:
        engine.evaluate(full_batch(full, mask, comp, engine, recon))
    assert backend.graphs == backend.runs == 10 and not any(e._program_failed for e in engines)


def test_warm_up_compiles_before_the_first_audit(probe_dir: Path) -> None:
    backend = CountingBackend()
    engine = make_engine(RICH, probe_dir)
    engine.compile_program = backend
    engine.warm_up()
    assert backend.graphs == 2  # one row, several rows
    compiled_before = backend.graphs
    eager = make_engine(RICH, probe_dir)
    for i, (b, t) in enumerate([(1, 7), (3, 12), (5, 30)]):
        full, mask, comp, recon = random_inputs(20 + i, b, t)
        same_verdicts(eager.evaluate(full_batch(full, mask, comp, eager, recon)), engine.evaluate(full_batch(full, mask, comp, engine, recon)))
    assert backend.graphs == compiled_before and backend.runs == 2 + 3


def test_a_failing_compiler_leaves_the_engine_eager(probe_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("no compiler here")

    eager, compiled = make_engine(RICH, probe_dir), make_engine(RICH, probe_dir)
    compiled.compile_program = broken
    with caplog.at_level(logging.WARNING, logger="auditor.policy.engine"):
        compare(eager, compiled, 11)
    assert compiled._program_failed and len(calls) == 1  # tried once, then eager
    warnings = [r.getMessage() for r in caplog.records if "cannot be compiled" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0] and "'test'" in warnings[0]


def test_hookpoint_probes_stay_eager(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from auditor.policy.engine import AuditBatch
    from auditor.policy.probes import save_probe

    g = np.random.default_rng(1)
    clf = LogisticRegression().fit(g.normal(size=(40, 6)), g.integers(0, 2, 40))
    save_probe(clf, tmp_path / "resid.json", inputs="hookpoint", pool="mean")
    backend = CountingBackend()
    engine = make_engine(one_rule({"probe": {"path": "resid.json", "threshold": 0.5}}), tmp_path)
    engine.compile_program = backend
    feats = torch.zeros(2, 4, engine.watched.numel())
    mask = torch.ones(2, 4, dtype=torch.bool)
    resid = torch.from_numpy(g.normal(size=(2, 4, 6)).astype(np.float32))
    verdicts = engine.evaluate(AuditBatch(feats, mask, ~mask, resid=resid))
    assert len(verdicts) == 2 and backend.graphs == backend.runs == 0


def test_the_steering_engine_keeps_the_settings(probe_dir: Path) -> None:
    policy = {"rules": [
        {**RICH["rules"][0], "actions": ["alert", {"steer": {"feature": "a.one", "mode": "clamp", "value": 0.0}}]},
        RICH["rules"][1],
    ]}
    engine = make_engine(policy, probe_dir)
    engine.cuda_graphs, engine.compile_program = False, "aot_eager"
    sub = engine.steering_engine
    assert sub is not None and sub is not engine
    assert (sub.cuda_graphs, sub.compile_program) == (False, "aot_eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_replay_the_compiled_program(probe_dir: Path) -> None:
    eager, compiled = make_engine(RICH, probe_dir), make_engine(RICH, probe_dir)
    compiled.compile_program = True
    dev = torch.device("cuda")
    for _ in range(2):  # the second time round, each bucket's graph is captured and replayed
        compare(eager, compiled, 5, dev)
    assert not compiled._program_failed and compiled._graphs.captures >= 3 and compiled._graphs.replays >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_of_larger_batches_for_a_compiled_program(probe_dir: Path) -> None:
    dev = torch.device("cuda")
    full, mask, comp, recon = random_inputs(1, 16, 1024)  # 16,384 padded tokens
    for compiled, limit, captures in ((False, None, 0), (True, None, 1), (True, 8192, 0), (False, 16384, 1)):
        engine = make_engine(RICH, probe_dir)
        engine.compile_program, engine.graph_max_tokens = compiled, limit
        for _ in range(2):  # seen, then captured when allowed
            same_verdicts(engine.evaluate(full_batch(full, mask, comp, engine, recon)), engine.evaluate(on(dev, full, mask, comp, recon, engine)))
        assert engine._graphs.captures == captures, (compiled, limit)


def test_running_out_of_memory_is_not_a_compilation_failure(probe_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An evaluation that runs out of device memory (one very large batch) raised from the compiled
    # program and was taken for a compiler that fails: the engine then evaluated eagerly for good,
    # with its graphs' smaller limit and a warning that its evaluation "cannot be compiled".
    class OutOfMemoryOnce(CountingBackend):
        def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            run = super().__call__(gm, example_inputs)

            def maybe_fail(*args: Any) -> Any:
                if self.runs == 1:
                    self.runs += 1
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                return run(*args)

            return maybe_fail

    backend = OutOfMemoryOnce()
    eager, compiled = make_engine(RICH, probe_dir), make_engine(RICH, probe_dir)
    compiled.compile_program = backend
    full, mask, comp, recon = random_inputs(5, 3, 12)
    compiled.evaluate(full_batch(full, mask, comp, compiled, recon))  # compiles, runs
    with caplog.at_level(logging.WARNING, logger="auditor.policy.engine"):
        with pytest.raises(torch.OutOfMemoryError):
            compiled.evaluate(full_batch(full, mask, comp, compiled, recon))
    assert not compiled._program_failed and not [r for r in caplog.records if "cannot be compiled" in r.getMessage()]
    runs = backend.runs
    same_verdicts(eager.evaluate(full_batch(full, mask, comp, eager, recon)), compiled.evaluate(full_batch(full, mask, comp, compiled, recon)))
    assert backend.runs == runs + 1  # compiled still


def test_warm_up_covers_batches_of_one_token(probe_dir: Path) -> None:
    # Sizes of 1 are specialized: after warm_up, a batch of one-token texts (or of empty texts,
    # evaluated as one masked token) compiled again (tens of seconds on a GPU) on its first audit.
    backend = CountingBackend()
    engine = make_engine(RICH, probe_dir)
    engine.compile_program = backend
    engine.warm_up()
    eager = make_engine(RICH, probe_dir)
    for i, (b, t) in enumerate([(1, 1), (3, 1), (2, 0), (1, 0), (4, 4)]):
        full, mask, comp, recon = random_inputs(40 + i, b, t)
        same_verdicts(eager.evaluate(full_batch(full, mask, comp, eager, recon)), engine.evaluate(full_batch(full, mask, comp, engine, recon)))
        assert torch.equal(engine.matched(full_batch(full, mask, comp, engine, recon)), eager.matched(full_batch(full, mask, comp, eager, recon)))
    assert backend.graphs == 2 and not engine._program_failed
